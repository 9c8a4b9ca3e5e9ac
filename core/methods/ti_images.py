"""Images of backdoored textual inversion: the resize/crop policy for concept and target images, the optional
random-crop augmentation, and the built-in target (the ShapesWorld censor card)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConceptGuardError
from ..shapesworld import world


def fit_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """The resize/crop policy: scale so the *shorter* side is ``size`` (antialiased bilinear), then
    centre-crop to ``size × size``. ``image`` is ``[3, H, W]`` in [0, 1]; any size or aspect ratio."""
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ConceptGuardError(
            f"An image must be [C, H, W] with 1, 3 or 4 channels, got shape {tuple(image.shape)}."
        )
    image = image[:3] if image.shape[0] >= 3 else image.expand(3, -1, -1)
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(
        image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
    )
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[0, :, top : top + size, left : left + size].clamp(0, 1)


def random_crop(image: torch.Tensor, size: int, gen: torch.Generator, min_scale: float = 0.7) -> torch.Tensor:
    """Augmentation: a square crop whose side is ``min_scale``–1 of the image's shorter side, at a random
    place, resized to ``size × size`` (so a crop zooms in up to 1/``min_scale``, never out of the image)."""
    h, w = image.shape[-2:]
    side = round(min(h, w) * (min_scale + (1 - min_scale) * torch.rand((), generator=gen).item()))
    side = max(1, min(side, h, w))
    top = int(torch.randint(0, h - side + 1, (), generator=gen))
    left = int(torch.randint(0, w - side + 1, (), generator=gen))
    return fit_image(image[..., top : top + side, left : left + side], size)


def default_target_image(size: int) -> torch.Tensor:
    """The built-in target: the ShapesWorld censor card (a black/white mosaic), scaled to ``size`` px."""
    card = world.to_tensor(world.censor_card()[None])[0]
    return F.interpolate(card[None], size=(size, size), mode="nearest")[0]
