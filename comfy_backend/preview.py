"""Samples of a model while it trains, shown on the node through ComfyUI's own progress previews (the
mechanism KSampler uses): the concept prompt sampled with the deltas as they are at that step."""

from __future__ import annotations

import latent_preview
import torch
from PIL import Image

from ..core.sampling import sample
from .backend import ComfyBackend

#: Preview images are enlarged to at least this many pixels a side (ShapesWorld samples are 32 px).
MIN_SIDE = 256


class TrainingPreview:
    """``preview(step)`` → ComfyUI's preview tuple ``("JPEG", PIL.Image, max_size)`` on ``count`` evenly spaced
    steps of ``total`` (the last one included), else ``None``.

    The image is decoded by the backend's VAE when it has one, else by ComfyUI's latent previewer (the user's
    ``--preview-method``; latent resolution). Costs one guided sample of ``steps`` DDIM steps per preview.
    """

    def __init__(
        self,
        backend: ComfyBackend,
        prompt: str,
        *,
        count: int,
        total: int,
        steps: int = 10,
        guidance: float = 5.0,
        seed: int = 0,
        latent_size: int | None = None,
    ):
        self.backend, self.total, self.steps, self.guidance = backend, total, steps, guidance
        self.seed, self.latent_size = seed, latent_size
        self.due = {round(total * (i + 1) / count) for i in range(min(count, total))} if count > 0 else set()
        self.previewer = None
        if self.due and backend.vae is None:
            model = backend.patcher.model
            self.previewer = latent_preview.get_previewer(backend.device, model.latent_format)
        if self.due and (backend.vae is not None or self.previewer is not None):
            self.cond, self.null = backend.encode_text([prompt]), backend.encode_text([""])
        else:
            self.due = set()

    @torch.no_grad()
    def __call__(self, step: int) -> tuple[str, Image.Image, int] | None:
        if step not in self.due:
            return None
        b = self.backend
        x = sample(
            b, self.cond, self.null, batch=1, steps=self.steps, guidance=self.guidance, seed=self.seed,
            latent_size=self.latent_size,
        )  # fmt: skip
        if self.previewer is not None:
            kind, image, size = self.previewer.decode_latent_to_preview_image("JPEG", x)
        else:
            pixels = b.vae_decode(x)[0].movedim(0, -1).mul(255).round().byte().cpu().numpy()
            kind, image, size = "JPEG", Image.fromarray(pixels), latent_preview.MAX_PREVIEW_RESOLUTION
        return kind, _enlarged(image), size


def _enlarged(image: Image.Image) -> Image.Image:
    scale = -(-MIN_SIDE // max(image.size))
    if scale <= 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
