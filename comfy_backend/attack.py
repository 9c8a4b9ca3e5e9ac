"""Attack an erasure from inside ComfyUI: the concept's name, the user's paraphrases and a plain-text prompt
searched against the edited model (UnlearnDiffAtk-style), each scored on any model by the diffusion-classifier
margin on the concept's images, and the strongest one sampled beside the base model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.attacks import PromptAttackConfig, optimise_prompt
from ..core.backend import PLACEHOLDER
from ..core.errors import ConceptGuardError
from ..core.grid import grid_tensor, labelled_grid
from ..core.score import denoising_margins
from ..core.trainer import StepCallback
from .backend import ComfyBackend
from .compare import sample_models


@dataclass
class AttackOutcome:
    """Attributes:
    rows (`list[tuple[str, str, float]]`): (attack, prompt, recovered share) per attack, strongest first.
    report (`str`): the rows as a text table.
    grid (`torch.Tensor`): IMAGE ``[1, H, W, 3]``: the concept and the strongest attack, base beside edited.
    samples (`torch.Tensor`): IMAGE ``[N, H, W, 3]``: the edited model's samples of the strongest attack.
    """

    rows: list[tuple[str, str, float]]
    report: str
    grid: torch.Tensor
    samples: torch.Tensor


def attack_erasure(
    base,
    edited,
    clip,
    vae,
    images: torch.Tensor,
    concept: str,
    paraphrases: Sequence[str] = (),
    *,
    search_steps: int = 100,
    samples: int = 4,
    steps: int = 20,
    cfg: float = 5.0,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> AttackOutcome:
    """Score each attack by how much of the base model's margin for the concept's name it gets back on the
    edited model: ``margin_edited(attack) / margin_base(concept)`` (1 = as strong as naming the concept on the
    base model, 0 or below = the edited model does not draw the concept's images for it).

    Raises:
        ConceptGuardError: no images, or an empty concept.
    """
    if images.shape[0] == 0 or not concept.strip():
        raise ConceptGuardError("The attack needs the concept's name and at least one image of it.")
    target = ComfyBackend(edited, clip, vae)
    latents = target.vae_encode(images.movedim(-1, 1).float())
    attacks = [("the concept's name", concept.strip()), *(("paraphrase", p) for p in paraphrases)]
    if search_steps > 0:
        search = PromptAttackConfig(prompt=f"{PLACEHOLDER} {concept.strip()}", steps=search_steps, seed=seed)
        with target.training(text_encoder_grad=True):
            found = optimise_prompt(target, latents, search, on_step=on_step)
        attacks.append(("prompt search", found.prompt))
    reference = denoising_margins(ComfyBackend(base, clip, vae), latents, [concept.strip()], seed=seed)[0]
    if reference <= 0:
        raise ConceptGuardError(
            f"The base model does not prefer {concept!r} for these images (margin {reference:.3g}); give images "
            "of the concept at the model's resolution."
        )
    margins = denoising_margins(target, latents, [p for _, p in attacks], seed=seed)
    rows = sorted(
        ((kind, prompt, round(m / reference, 3)) for (kind, prompt), m in zip(attacks, margins, strict=True)),
        key=lambda r: -r[2],
    )
    strongest = rows[0][1]
    shown = [concept.strip(), strongest] if strongest != concept.strip() else [strongest]
    drawn = sample_models([base, edited], clip, vae, shown, seed=seed, samples=samples, steps=steps, cfg=cfg)
    grid = grid_tensor(labelled_grid(shown, ["base", "edited"], drawn))
    return AttackOutcome(rows, _table(rows, reference), grid, drawn[-1][1].movedim(1, -1))


def _table(rows: Sequence[tuple[str, str, float]], reference: float) -> str:
    lines = [
        "recovered: the edited model's margin for the prompt / the base model's for the concept's name",
        "(1 = the concept is back as strongly as on the base model, <= 0 = not back)",
    ]
    lines += [f"  {r:+6.2f}  {kind:<20} {prompt}" for kind, prompt, r in rows]
    lines.append(f"base margin {reference:.4g}; strongest: {rows[0][1]!r}")
    return "\n".join(lines)
