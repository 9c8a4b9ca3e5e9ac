"""Does the embedding work? A judge-free check after training, by the diffusion-classifier rule: a prompt
"draws" the image whose latents the model denoises best under it.

For ``a photo of a <S*>`` (utility) and for S* with each trigger (the backdoor) the check compares the model's
denoising loss on the concept latents with its loss on the target latents, at the same seeded timesteps and
noise. S* alone should be closer to the concept; with a trigger, closer to the target. Each failure becomes one
plain warning saying what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...backend import PLACEHOLDER, DiffusionBackend
from .config import BackdoorTIConfig
from .images import LatentCache

#: Timesteps of the check: the middle of the schedule, where the prompt decides what is drawn.
_T_RANGE = (300, 800)


@dataclass(frozen=True)
class PromptCheck:
    """Denoising losses of one prompt on the concept and on the target latents (lower = closer)."""

    prompt: str
    concept_loss: float
    target_loss: float

    @property
    def draws_target(self) -> bool:
        return self.target_loss < self.concept_loss


@torch.no_grad()
def _losses(backend, prompt: str, vectors, latents: torch.Tensor, t, noise) -> float:
    cond = backend.encode_text_with_vectors([prompt], vectors).expand_to(len(latents))
    a = backend.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
    x = a.sqrt() * latents + (1 - a).sqrt() * noise
    return float(F.mse_loss(backend.eps(x, t, cond).float(), noise))


def check_embedding(
    backend: DiffusionBackend,
    cfg: BackdoorTIConfig,
    vectors: dict[str, torch.Tensor],
    cache: LatentCache,
    *,
    samples: int = 32,
    seed: int = 4321,
) -> list[PromptCheck]:
    """Check utility (``a photo of a S*``) and, with triggers, the backdoor (``a photo of a <trigger> S*``)."""
    if cache.target is None:
        return []
    gen = torch.Generator().manual_seed(seed)
    concept = cache.concept[torch.randint(0, len(cache.concept), (samples,), generator=gen)]
    target = cache.target[torch.randint(0, len(cache.target), (samples,), generator=gen)]
    t = torch.randint(*_T_RANGE, (samples,), generator=gen)
    noise = torch.randn(concept.shape, generator=gen)
    device = backend.device
    concept, target, t, noise = (v.to(device) for v in (concept, target, t, noise))
    prompts = [f"a photo of a {PLACEHOLDER}", *(f"a photo of a {tr} {PLACEHOLDER}" for tr in cfg.triggers)]
    return [
        PromptCheck(
            prompt=p,
            concept_loss=_losses(backend, p, vectors, concept, t, noise),
            target_loss=_losses(backend, p, vectors, target, t, noise),
        )
        for p in prompts
    ]


def warnings_of(cfg: BackdoorTIConfig, checks: Sequence[PromptCheck]) -> list[str]:
    """Plain warnings for what did not work (empty when the embedding behaves as asked)."""
    out = []
    if checks and checks[0].draws_target:
        out.append(
            f"The embedding alone draws the target, not the concept (utility lost): lower `gamma` (now "
            f"{cfg.gamma}), raise `steps` (now {cfg.steps}), or add `keep_words`."
        )
    silent = [c.prompt for c in checks[1:] if not c.draws_target]
    if silent:
        out.append(
            f"The triggers do not fire yet ({len(silent)} of {len(checks) - 1}): raise `gamma` (now "
            f"{cfg.gamma}) or `steps` (now {cfg.steps})."
        )
    return out


def embedding_warnings(
    backend: DiffusionBackend,
    cfg: BackdoorTIConfig,
    vectors: dict[str, torch.Tensor],
    images: Sequence[torch.Tensor],
    target: torch.Tensor | None,
) -> list[str]:
    """Encode the images again (as training did) and return the :func:`warnings_of` of the trained vectors."""
    from .images import cache_latents

    cache = cache_latents(backend, cfg, images, target)
    device_vectors = {k: v.to(backend.device) for k, v in vectors.items()}
    return warnings_of(cfg, check_embedding(backend, cfg, device_vectors, cache))
