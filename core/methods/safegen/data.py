"""SafeGen's training data: sensitive images, their mosaics and benign images, as latents cached once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...backend import DiffusionBackend
from ...errors import ConceptGuardError
from ...sampling import sample
from ...seeding import make_generator
from .config import SafeGenConfig
from .mosaic import pixelate

logger = logging.getLogger(__name__)

ImageBatch = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class Triplets:
    """Latents ``[N, C, h, w]`` of the sensitive images and their mosaics, and ``[M, C, h, w]`` benign ones."""

    sensitive: torch.Tensor
    mosaic: torch.Tensor
    benign: torch.Tensor


def _as_list(images: ImageBatch | None, what: str) -> list[torch.Tensor]:
    if images is None:
        return []
    items = list(images) if not isinstance(images, torch.Tensor) or images.dim() == 4 else [images]
    for i, x in enumerate(items):
        if x.dim() != 3 or x.shape[0] != 3:
            raise ConceptGuardError(
                f"{what} image {i} has shape {tuple(x.shape)}; expected [3, H, W] RGB in [0, 1]."
            )
        if not torch.isfinite(x).all():
            raise ConceptGuardError(f"{what} image {i} contains NaN or infinite values.")
    return items


def _square(x: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """Centre-crop ``[C, H, W]`` to a square and resize it to ``side`` (as the official script's centre crop)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top : top + s, left : left + s].float()[None]
    if s != side:
        x = F.interpolate(
            x, size=(side, side), mode=mode, **({"antialias": True} if mode == "bilinear" else {})
        )
    return x[0]


def _checked_masks(mask, images: list[torch.Tensor]) -> list[torch.Tensor] | None:
    if mask is None:
        return None
    masks = [
        m[0] if m.dim() == 3 and m.shape[0] == 1 else m for m in (list(mask) if mask.dim() == 3 else [mask])
    ]
    if len(masks) == 1:
        masks = masks * len(images)
    if len(masks) != len(images):
        raise ConceptGuardError(f"{len(masks)} masks for {len(images)} images; give one, or one per image.")
    for i, (m, x) in enumerate(zip(masks, images, strict=True)):
        if m.shape[-2:] != x.shape[-2:]:
            raise ConceptGuardError(
                f"Mask {i} is {tuple(m.shape[-2:])} pixels but its image is {tuple(x.shape[-2:])}; "
                "give a mask of the images' size."
            )
    return masks


def prepare_images(
    images: ImageBatch, mask: torch.Tensor | None, side: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sensitive images and their mosaics, ``[N, 3, side, side]`` in [0, 1].

    Raises:
        ConceptGuardError: no images, a bad image, or a mask of the wrong size or count.
    """
    items = _as_list(images, "Sensitive")
    if not items:
        raise ConceptGuardError(
            "No images of the concept were given; SafeGen learns what to censor from them."
        )
    masks = _checked_masks(mask, items)
    sizes = {tuple(x.shape[-2:]) for x in items}
    if sizes != {(side, side)}:
        logger.info(
            "SafeGen: %d image size(s) %s centre-cropped and resized to %d px",
            len(sizes),
            sorted(sizes),
            side,
        )
    x = torch.stack([_square(i, side, "bilinear") for i in items]).clamp(0, 1)
    m = None if masks is None else torch.stack([_square(k[None], side, "nearest") for k in masks])
    return x, pixelate(x, block, m).clamp(0, 1)


@torch.no_grad()
def _encode(backend: DiffusionBackend, images: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    return torch.cat([backend.vae_encode(c.to(backend.device)).float().cpu() for c in images.split(chunk)])


@torch.no_grad()
def _benign_samples(backend: DiffusionBackend, cfg: SafeGenConfig, latent: int, tick) -> torch.Tensor:
    """The frozen model's own samples of ``cfg.benign_prompts`` (latents; the model's unconditional ones for "")."""
    gen, uncond, out = make_generator(cfg.seed), backend.encode_text([""]), []
    for prompt in cfg.benign_prompts:
        cond = uncond if prompt == "" else backend.encode_text([prompt])
        lat = sample(
            backend,
            cond,
            uncond,
            batch=cfg.benign_samples,
            guidance=1.0 if prompt == "" else 5.0,
            generator=gen,
            latent_size=latent,
        )
        out.append(lat.float().cpu())
        tick()
    return torch.cat(out)


def build_triplets(
    backend: DiffusionBackend,
    cfg: SafeGenConfig,
    images: ImageBatch,
    *,
    benign_images: ImageBatch | None = None,
    mask: torch.Tensor | None = None,
    tick: Callable[[], None] = lambda: None,
) -> Triplets:
    """Encode sensitive, mosaic and benign latents once (benign: given images, else frozen-model samples).

    Must run while every delta is off (before they are attached)."""
    side = cfg.resolution or backend.native_latent_size * backend.vae_scale_factor
    if side % backend.vae_scale_factor:
        raise ConceptGuardError(
            f"`resolution` {side} must be a multiple of {backend.vae_scale_factor} pixels."
        )
    sensitive, mosaic = prepare_images(images, mask, side, cfg.mosaic_block)
    benign = _as_list(benign_images, "Benign")
    z_s, z_m = _encode(backend, sensitive), _encode(backend, mosaic)
    tick()
    if benign:
        z_b = _encode(backend, torch.stack([_square(b, side, "bilinear") for b in benign]).clamp(0, 1))
    else:
        z_b = _benign_samples(backend, cfg, side // backend.vae_scale_factor, tick)
    return Triplets(sensitive=z_s, mosaic=z_m, benign=z_b)
