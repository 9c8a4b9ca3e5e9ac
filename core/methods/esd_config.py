"""Settings of one ESD run (see :mod:`concept_guard.core.methods.esd`), with their checks and file-header form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config_io import config_from_metadata, config_metadata
from ..errors import ConceptGuardError
from ..targets import ESD_METHODS


def parse_concepts(text: str | Sequence[str]) -> tuple[str, ...]:
    """Split a comma-separated concept list (or take a list), dropping surrounding whitespace."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(c.strip() for c in items if c.strip())


def _words(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()


def mentions(prompt: str, concept: str) -> bool:
    """Whether ``prompt`` names ``concept``: its words (articles aside) appear in a row, as whole words."""
    words, key = _words(prompt), [w for w in _words(concept) if w not in ("a", "an", "the")]
    return bool(key) and any(words[i : i + len(key)] == key for i in range(len(words) - len(key) + 1))


def check_preserve(concepts: Sequence[str], preserve: Sequence[str]) -> None:
    """A preserved prompt that names an erased concept asks to keep and erase the same thing: refuse it."""
    for concept in concepts:
        for prompt in preserve:
            if mentions(prompt, concept):
                raise ConceptGuardError(
                    f"The preserved prompt {prompt!r} names the erased concept {concept!r}; remove it from `preserve`."
                )


@dataclass(frozen=True, kw_only=True)
class ESDConfig:
    """Settings of one ESD run. Defaults follow the authors' official 2025 SD1.x training script.

    Args:
        concepts (`tuple[str, ...]`): concepts to erase; one is sampled per step.
        method (`str`, defaults to ``"esd-x"``): which weights train, see ``targets.ESD_METHODS``.
        anchor (`str`, *optional*): "erase to" concept; ``None`` anchors on the trained prompt itself.
        erase_from (`tuple[str, ...]`): prompts to erase the concept from (comma-separated or a tuple);
            empty = the concepts themselves.
        preserve (`tuple[str, ...]`): prompts whose predictions should stay unchanged (retain set); empty = none.
        preserve_null (`bool`, defaults to ``False``): also retain the empty prompt's prediction ε*(x_t, ""),
            the unconditional branch that CFG subtracts (scaled by guidance − 1) from every prompt.
        eta (`float`, defaults to 2.0): negative-guidance strength (concept-anchored form).
        iterations (`int`, defaults to 200): optimiser steps.
        lr (`float`, defaults to 5e-5): Adam learning rate of the fp32 deltas.
        guidance (`float`, defaults to 3.0): CFG scale used to sample x_t.
        sampling_steps (`int`, defaults to 50): DDIM steps of the bank's trajectories.
        bank_trajectories (`int`, defaults to 8): trajectories per concept in the bank.
        batch_size (`int`, defaults to 1): bank entries per optimiser step.
        latent_size (`int`, *optional*): latent height/width of x_t; ``None`` = the model's native size.
        seed (`int`, defaults to 0): seeds the bank and the step sampling.
        adv_steps (`int`, defaults to 0): adversarial training (see ``esd_adv``): attack steps per round;
            0 = plain ESD.
        adv_every (`int`, defaults to 20): training steps between attack rounds.
        adv_vectors (`int`, defaults to 8), adv_lr (`float`, defaults to 3e-3): the attack's token vectors.
        adv_weight (`float`, defaults to 2.0): weight of the adversarial prompts' loss.
        adv_retain (`float`, defaults to 0.5): weight, relative to ``adv_weight``, of an extra batch of the
            ``preserve`` prompts each adversarial step.
    """

    concepts: tuple[str, ...]
    method: str = "esd-x"
    anchor: str | None = None
    erase_from: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()
    preserve_null: bool = False
    eta: float = 2.0
    iterations: int = 200
    lr: float = 5e-5
    guidance: float = 3.0
    sampling_steps: int = 50
    bank_trajectories: int = 8
    batch_size: int = 1
    latent_size: int | None = None
    seed: int = 0
    adv_steps: int = 0
    adv_every: int = 20
    adv_vectors: int = 8
    adv_weight: float = 2.0
    adv_lr: float = 3e-3
    adv_retain: float = 0.5

    def __post_init__(self) -> None:
        concepts = parse_concepts(self.concepts)
        if not concepts:
            raise ConceptGuardError(
                f"`concepts` must name at least one concept, got {self.concepts!r}. Example: 'circle' or 'van gogh, monet'."
            )
        object.__setattr__(self, "concepts", concepts)
        object.__setattr__(self, "erase_from", parse_concepts(self.erase_from))
        object.__setattr__(self, "preserve", parse_concepts(self.preserve))
        check_preserve(concepts, self.preserve)
        if self.anchor is not None and not self.anchor.strip():
            object.__setattr__(self, "anchor", None)
        if self.method not in ESD_METHODS:
            raise ConceptGuardError(f"`method` must be one of {sorted(ESD_METHODS)}, got {self.method!r}.")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConceptGuardError(f"`{name}` must be a positive integer, got {value!r}.")
        if not isinstance(self.adv_steps, int) or not 0 <= self.adv_steps <= 10000:
            raise ConceptGuardError(
                f"`adv_steps` must be in [0, 10000] (0 = plain ESD), got {self.adv_steps!r}."
            )
        if not (0 <= self.adv_weight <= 100 and 0 <= self.adv_retain <= 100 and 0 < self.adv_lr < 1):
            raise ConceptGuardError(
                f"`adv_weight` and `adv_retain` must be in [0, 100] and `adv_lr` in (0, 1), got "
                f"{self.adv_weight!r}, {self.adv_retain!r}, {self.adv_lr!r}."
            )
        if not (self.lr > 0 and self.lr < 1):
            raise ConceptGuardError(f"`lr` must be in (0, 1), got {self.lr!r}; ESD uses 1e-5 … 1e-4.")
        if not (0 <= self.eta <= 20):
            raise ConceptGuardError(f"`eta` must be in [0, 20], got {self.eta!r}; 2.0 is the usual value.")

    def to_metadata(self) -> dict[str, str]:
        """Header entries: the whole config once (JSON) and the fields people look for as flat keys."""
        return config_metadata(self, summary=_ESD_SUMMARY)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ESDConfig:
        """The config an ESD edit file was trained with (its header, as :meth:`to_metadata` wrote it)."""
        return config_from_metadata(cls, metadata)


_POSITIVE_INTS = (
    "iterations",
    "sampling_steps",
    "bank_trajectories",
    "batch_size",
    "adv_every",
    "adv_vectors",
)

#: Config fields repeated as flat ``concept_guard.<field>`` header keys.
_ESD_SUMMARY = (
    "method",
    "concepts",
    "anchor",
    "erase_from",
    "preserve",
    "preserve_null",
    "eta",
    "iterations",
)
_ESD_SUMMARY += ("lr", "adv_steps")
