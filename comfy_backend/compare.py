"""Sample several MODELs on the same prompts with the same seeds (ComfyUI's own sampler), for a side-by-side
comparison grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import comfy.sample
import torch

from ..core.score import compare_scores, compare_table
from .backend import ComfyBackend


def _encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample_models(
    models: Sequence[object],
    clip,
    vae,
    prompts: Sequence[str],
    *,
    seed: int,
    samples: int,
    steps: int,
    cfg: float,
    sampler: str = "ddim",
    scheduler: str = "normal",
    on_done: Callable[[], None] | None = None,
) -> list[list[torch.Tensor]]:
    """``images[prompt][model]``: ``[samples, 3, H, W]`` in [0, 1]. Every model starts from the same noise
    for a prompt (seed ``seed + prompt index``), so differences are the models'. Latents have the first
    model's native size."""
    size = ComfyBackend(models[0]).native_latent_size
    latent = torch.zeros(samples, 4, size, size)
    negative = _encode(clip, "")
    out: list[list[torch.Tensor]] = []
    for i, prompt in enumerate(prompts):
        positive = _encode(clip, prompt)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        row = []
        for model in models:
            lat = comfy.sample.sample(
                model,
                noise,
                steps,
                cfg,
                sampler,
                scheduler,
                positive,
                negative,
                latent,
                seed=seed + i,
                disable_pbar=True,
            )
            row.append(vae.decode(lat).movedim(-1, 1).float().cpu().clamp(0, 1))
            if on_done:
                on_done()
        out.append(row)
    return out


def score_models(models: Sequence[object], clip, prompts: Sequence[str], names: Sequence[str]) -> str:
    """The concept score of each prompt on each of ``models[1:]`` against ``models[0]``, as a text table with
    the columns ``names``."""
    backends = [ComfyBackend(m, clip) for m in models]
    return compare_table(prompts, names, compare_scores(backends[0], backends[1:], prompts))
