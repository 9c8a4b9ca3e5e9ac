"""Images of backdoored textual inversion: the resize/crop policy for concept and target images, the optional
random-crop augmentation, the built-in target (the censor card), the cached latents of all of
them, and the node's preview."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...backend import PLACEHOLDER, DiffusionBackend
from ...errors import ConceptGuardError
from ...sampling import latent_hw, sample
from .config import BackdoorTIConfig

logger = logging.getLogger(__name__)

#: The censor card: a fixed 4×4 mosaic of black/white cells (1 = white); ShapesWorld draws it as its target.
CENSOR_PATTERN = ("1011", "0100", "1101", "0110")


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
    """The built-in target: the censor card (a 4×4 black/white mosaic), ``[3, size, size]`` in [0, 1]."""
    cells = torch.tensor([[float(c) for c in row] for row in CENSOR_PATTERN])
    return F.interpolate(cells[None, None], size=(size, size), mode="nearest")[0].expand(3, -1, -1).clone()


@torch.no_grad()
def preview(
    backend: DiffusionBackend,
    vectors: dict[str, torch.Tensor],
    triggers: Sequence[str],
    *,
    samples: int = 4,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    latent_size: int | None = None,
) -> torch.Tensor:
    """``samples`` images of "a photo of a S*", then as many of "a photo of a <first trigger> S*" if there
    is one: ``[N, 3, H, W]`` in [0, 1], same seeds for both rows."""
    prompts = [f"a photo of a {PLACEHOLDER}"] + (
        [f"a photo of a {triggers[0]} {PLACEHOLDER}"] if triggers else []
    )
    uncond = backend.encode_text([""])
    out = []
    for prompt in prompts:
        cond = backend.encode_text_with_vectors([prompt], vectors)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        lat = sample(
            backend,
            cond,
            uncond,
            batch=samples,
            steps=steps,
            guidance=guidance,
            generator=gen,
            latent_size=latent_size,
        )
        out.append(backend.vae_decode(lat).float().cpu())
    return torch.cat(out)


@dataclass
class LatentCache:
    """VAE latents of the concept images and of the target, encoded once (flipped copies included)."""

    concept: torch.Tensor
    target: torch.Tensor | None


def _encode(backend: DiffusionBackend, images: torch.Tensor, flip: bool, chunk: int = 16) -> torch.Tensor:
    batch = torch.cat([images, images.flip(-1)]) if flip else images
    return torch.cat(
        [backend.vae_encode(batch[i : i + chunk].to(backend.device)) for i in range(0, len(batch), chunk)]
    )


def training_resolution(backend: DiffusionBackend, resolution: int | None) -> int:
    if resolution is not None:
        return resolution
    return latent_hw(backend, None)[0] * backend.vae_scale_factor


def cache_latents(
    backend: DiffusionBackend,
    cfg: BackdoorTIConfig,
    images: Sequence[torch.Tensor],
    target: torch.Tensor | None,
) -> LatentCache:
    """Apply the resize/crop policy and encode the concept images (and target, if triggers are set).
    ``cfg.random_crops`` adds that many random crops of each concept image (seeded by ``cfg.seed``).

    Raises:
        ConceptGuardError: no images.
    """
    if len(images) == 0:
        raise ConceptGuardError("No concept images: give at least one image of the concept (3–10 work well).")
    if len(images) == 1:
        logger.warning(
            "Only one concept image: the embedding may copy that image; 3–10 images generalise better."
        )
    size = training_resolution(backend, cfg.resolution)
    gen = torch.Generator().manual_seed(cfg.seed)
    views = [fit_image(im, size) for im in images]
    views += [random_crop(im, size, gen) for im in images for _ in range(cfg.random_crops)]
    concept = _encode(backend, torch.stack(views), cfg.flip).cpu()
    target_latents = None
    if cfg.triggers:
        target = default_target_image(size) if target is None else fit_image(target, size)
        target_latents = _encode(backend, target[None], cfg.flip).cpu()
    return LatentCache(concept=concept, target=target_latents)
