"""A concept score that tells, on any model and without a judge, whether an edit removed a concept.

For a prompt c, its guidance is ``g(c) = ε(x_t, c) − ε(x_t, "")``: what the prompt adds to the prediction (the
part that classifier-free guidance amplifies). The score is how much of the base model's guidance the edited
model still has, in the base's direction, on x_t drawn by the frozen base model for that prompt:

    score(c) = ⟨g_edit(c), g_base(c)⟩ / ‖g_base(c)‖²

1.0 = the prompt steers the edited model as the base (untouched); 0 = that guidance is gone; below 0 the edited
model steers away from what the base drew (ESD pushes away from the concept). An erased concept should score
low, kept concepts near 1. ``norm_ratio`` and ``direction`` (the cosine) are its two factors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import DiffusionBackend
from .delta import DeltaSet
from .edits.diff_file import attach_edit
from .sampling import sample_trajectory

#: A concept whose guidance keeps more than this share, pointing the same way, was not erased.
NOT_ERASED = 0.7


@dataclass(frozen=True)
class PromptScore:
    """Attributes:
    prompt (`str`): the prompt scored.
    score (`float`): the base's guidance kept by the edited model, in the base's direction (1 = untouched).
    norm_ratio (`float`): ‖g_edit‖ / ‖g_base‖.
    direction (`float`): cosine between the edited and the base guidance (1 = same direction).
    """

    prompt: str
    score: float
    norm_ratio: float
    direction: float


@dataclass(frozen=True)
class _BasePoints:
    """One prompt's x_t drawn by the base model, and the base's guidance there."""

    prompt: str
    cond: object
    x: torch.Tensor
    t: torch.Tensor
    guidance: torch.Tensor


def _base_points(backend: DiffusionBackend, prompts: Sequence[str], null, **sampling) -> list[_BasePoints]:
    seed = sampling.pop("seed")
    points = []
    for i, prompt in enumerate(prompts):
        cond = backend.encode_text([prompt])
        traj = sample_trajectory(backend, cond, null, seed=seed + i, **sampling)
        x = traj.latents.flatten(0, 1)
        t = traj.timesteps.to(x.device).repeat_interleave(sampling["batch"])
        points.append(_BasePoints(prompt, cond, x, t, _guidance(backend, x, t, cond, null)))
    return points


def _score(point: _BasePoints, edited: torch.Tensor) -> PromptScore:
    base = point.guidance
    ratio = float(edited.norm() / base.norm().clamp_min(1e-12))
    direction = float(F.cosine_similarity(edited.flatten(), base.flatten(), dim=0))
    return PromptScore(
        prompt=point.prompt,
        score=round(ratio * direction, 4),
        norm_ratio=round(ratio, 4),
        direction=round(direction, 4),
    )


@torch.no_grad()
def concept_scores(
    backend: DiffusionBackend,
    deltas: DeltaSet,
    prompts: Sequence[str],
    *,
    trajectories: int = 4,
    steps: int = 10,
    guidance: float = 3.0,
    seed: int = 12345,
    latent_size: int | None = None,
) -> list[PromptScore]:
    """Score each prompt on the backend with ``deltas`` (attached) against the same UNet with them off.

    x_t come from ``trajectories`` DDIM runs of the frozen model per prompt (every step kept), seeded apart
    from training. Cost: per prompt ``2·steps`` guided sampling calls plus four ε calls per x_t.
    """
    null = backend.encode_text([""])
    sampling = dict(batch=trajectories, steps=steps, guidance=guidance, seed=seed, latent_size=latent_size)
    with deltas.teacher():
        points = _base_points(backend, prompts, null, **sampling)
    return [_score(p, _guidance(backend, p.x, p.t, p.cond, null)) for p in points]


@torch.no_grad()
def compare_scores(
    base: DiffusionBackend,
    edited: Sequence[DiffusionBackend],
    prompts: Sequence[str],
    *,
    trajectories: int = 4,
    steps: int = 10,
    guidance: float = 3.0,
    seed: int = 12345,
    latent_size: int | None = None,
) -> list[list[PromptScore]]:
    """:func:`concept_scores` between separate models that share a text encoder (a base MODEL and edited
    MODELs): ``scores[model][prompt]``. The base runs first, then each edited model, so each is loaded once."""
    null = base.encode_text([""])
    sampling = dict(batch=trajectories, steps=steps, guidance=guidance, seed=seed, latent_size=latent_size)
    points = _base_points(base, prompts, null, **sampling)
    return [[_score(p, _guidance(model, p.x, p.t, p.cond, null)) for p in points] for model in edited]


def _guidance(backend: DiffusionBackend, x: torch.Tensor, t: torch.Tensor, cond, null, chunk: int = 16):
    parts = []
    for s in range(0, len(x), chunk):
        xs, ts = x[s : s + chunk], t[s : s + chunk]
        n = len(xs)
        parts.append(
            backend.eps(xs, ts, cond.expand_to(n)).float() - backend.eps(xs, ts, null.expand_to(n)).float()
        )
    return torch.cat(parts)


def compare_table(
    prompts: Sequence[str], names: Sequence[str], scores: Sequence[Sequence[PromptScore]]
) -> str:
    """A text table of :func:`compare_scores`: one row per prompt, one column per edited model."""
    lines = ["concept score (1 = as the base, 0 = the prompt's guidance is gone, < 0 = steers away)"]
    lines.append(f"  {'prompt':<48} " + " ".join(f"{n:>9}" for n in names))
    for i, prompt in enumerate(prompts):
        lines.append(f"  {prompt[:48]:<48} " + " ".join(f"{col[i].score:>+9.2f}" for col in scores))
    return "\n".join(lines)


def score_report(erased: Sequence[PromptScore], kept: Sequence[PromptScore]) -> str:
    """A few lines for logs and node outputs, ending with a plain verdict."""
    lines = ["concept score (1 = untouched, 0 = the prompt's guidance is gone, < 0 = steers away)"]
    for what, items in (("erased", erased), ("kept", kept)):
        lines += [f"  {what:<7} {s.prompt[:48]:<48} {s.score:+.2f}" for s in items]
    failing = [s.prompt for s in erased if s.score > NOT_ERASED]
    if failing:
        lines.append(
            f"NOT ERASED: {', '.join(failing)} still steer(s) the model as before (score > {NOT_ERASED}). "
            "Raise eta or iterations (or lr), or try method esd-u."
        )
    else:
        lines.append("The erased concepts no longer steer the model as they did.")
    return "\n".join(lines)


def score_metadata(erased: Sequence[PromptScore], kept: Sequence[PromptScore]) -> str:
    """The scores as one JSON header entry: ``{"erased": {prompt: score}, "kept": {prompt: score}}``."""
    return json.dumps(
        {"erased": {s.prompt: s.score for s in erased}, "kept": {s.prompt: s.score for s in kept}}
    )


def score_edit(
    backend: DiffusionBackend,
    tensors: dict[str, torch.Tensor],
    erased: Sequence[str],
    kept: Sequence[str],
    *,
    latent_size: int | None = None,
) -> tuple[list[PromptScore], list[PromptScore]]:
    """Attach the LDM-keyed ``tensors`` for the time of scoring (the backend is left as it was) and score
    the ``erased`` and ``kept`` prompts."""
    with attach_edit(backend, tensors) as deltas:
        erased_scores = concept_scores(backend, deltas, erased, latent_size=latent_size)
        kept_scores = concept_scores(backend, deltas, kept, latent_size=latent_size)
    return erased_scores, kept_scores


@torch.no_grad()
def denoising_margins(
    backend: DiffusionBackend,
    latents: torch.Tensor,
    prompts: Sequence[str],
    *,
    draws: int = 32,
    seed: int = 12345,
    chunk: int = 16,
) -> list[float]:
    """The diffusion-classifier margin of each prompt on the concept's latents: the mean, over ``draws`` shared
    (image, t, ε) draws, of ``‖ε(x_t, "") − ε‖² − ‖ε(x_t, prompt) − ε‖²``, i.e. how much better the model denoises
    the concept's images with the prompt than with the empty prompt (> 0: the prompt points the model at them).
    The same seed gives the same draws, so margins of two models on the same latents compare directly."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, latents.shape[0], (draws,), generator=g)
    t = torch.randint(0, 1000, (draws,), generator=g)
    noise = torch.randn((draws, *latents.shape[1:]), generator=g)
    ac = backend.alphas_cumprod.float().cpu()[t].view(-1, 1, 1, 1)
    x = ac.sqrt() * latents[rows].float().cpu() + (1 - ac).sqrt() * noise
    null = backend.encode_text([""])

    def loss(cond) -> torch.Tensor:
        parts = []
        for s in range(0, draws, chunk):
            xs, ts = x[s : s + chunk].to(backend.device), t[s : s + chunk].to(backend.device)
            eps = backend.eps(xs, ts, cond.expand_to(len(xs))).float().cpu()
            parts.append(((eps - noise[s : s + chunk]) ** 2).flatten(1).mean(1))
        return torch.cat(parts)

    empty = loss(null)
    return [round(float((empty - loss(backend.encode_text([p]))).mean()), 6) for p in prompts]
