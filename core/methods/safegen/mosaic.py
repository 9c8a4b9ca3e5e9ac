"""The censoring target of SafeGen: pixelate images by a block size, optionally only inside a mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import ConceptGuardError


def pixelate(images: torch.Tensor, block: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mosaic ``images`` ``[B, 3, H, W]`` (any range) with ``block``-pixel cells.

    Each cell becomes the mean colour of its pixels (cells at the right and bottom edges may be
    smaller when ``block`` does not divide the size). With ``mask`` (``[B, H, W]``, ``[B, 1, H, W]`` or
    ``[H, W]``, 1 = censor) the mosaic replaces the image only there, blended by the mask's value.

    Raises:
        ConceptGuardError: ``block`` < 1, or a mask whose size differs from the images'.
    """
    if images.dim() != 4:
        raise ConceptGuardError(f"`images` must be [B, C, H, W], got shape {tuple(images.shape)}.")
    if block < 1:
        raise ConceptGuardError(f"`mosaic_block` must be >= 1 pixel, got {block}.")
    h, w = images.shape[-2:]
    cells = (math.ceil(h / block), math.ceil(w / block))
    pad = (0, cells[1] * block - w, 0, cells[0] * block - h)
    x = images.float()
    # Pool over real pixels only: pad, average, and divide by the share of real pixels per cell.
    ones = F.pad(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device), pad)
    means = F.avg_pool2d(F.pad(x, pad), block) / F.avg_pool2d(ones, block)
    mosaic = means.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :h, :w]
    if mask is None:
        return mosaic.to(images.dtype)
    m = _as_mask(mask, images)
    return (x * (1 - m) + mosaic * m).to(images.dtype)


def _as_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    m = mask.float().to(images.device)
    if m.dim() == 2:
        m = m[None]
    if m.dim() == 3:
        m = m[:, None]
    if m.shape[-2:] != images.shape[-2:]:
        raise ConceptGuardError(
            f"The mask is {tuple(m.shape[-2:])} pixels but the images are {tuple(images.shape[-2:])}; "
            "give a mask of the images' size."
        )
    if m.shape[0] not in (1, images.shape[0]):
        raise ConceptGuardError(
            f"{m.shape[0]} masks for {images.shape[0]} images; give one, or one per image."
        )
    return m.clamp(0, 1)
