"""Settings of one SafeGen run (see :mod:`concept_guard.core.methods.safegen`), with their checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...config_io import config_from_metadata, config_metadata
from ...errors import ConceptGuardError
from ..esd_config import parse_concepts

#: Mosaic targets: the official code's ``z_s − z_mos + ε`` ("paper") and the ε that denoises x_t^s to z_mos
#: exactly, ``ε + √ᾱ_t/√(1−ᾱ_t)·(z_s − z_mos)`` ("exact").
MOSAIC_TARGETS = ("paper", "exact")
#: Preservation targets: the frozen model's own prediction ("teacher") or the added noise ("noise", official).
PRESERVE_TARGETS = ("teacher", "noise")


@dataclass(frozen=True, kw_only=True)
class SafeGenConfig:
    """Settings of one SafeGen run. Defaults follow the official script where it works (1000 steps, lr 1e-5,
    5 triplets per step), the rest is measured on ShapesWorld (docs/results.md).

    Args:
        steps (`int`, defaults to 1000): optimiser steps.
        lr (`float`, defaults to 1e-5): Adam learning rate of the fp32 ``attn1`` deltas.
        batch_size (`int`, defaults to 5): sensitive (and as many benign) images per step.
        mosaic_block (`int`, defaults to 32): mosaic cell size in pixels.
        target (`str`, defaults to ``"paper"``): the mosaic target, see :data:`MOSAIC_TARGETS`.
        preserve_target (`str`, defaults to ``"teacher"``): see :data:`PRESERVE_TARGETS`.
        weight_mosaic (`float`, defaults to 0.5), weight_preserve (`float`, defaults to 0.5): loss weights.
        max_timestep (`int`, defaults to 1000): timesteps are drawn from ``[0, max_timestep)``.
        snr_gamma (`float`, defaults to 0): Min-SNR weighting of the mosaic term, ``min(SNR, γ)/SNR`` per row
            (as diffusers' training scripts' ``--snr_gamma``); it keeps the exact target's large low-noise rows
            from dominating. 0 = off.
        benign_prompts (`tuple[str, ...]`): prompts whose frozen-model samples are the benign images when none
            are given (comma-separated or a tuple); ``""`` = the model's unconditional samples.
        benign_samples (`int`, defaults to 8): samples per benign prompt.
        resolution (`int`, *optional*): pixel side the images are resized to; ``None`` = the model's native size.
        seed (`int`, defaults to 0): seeds the benign samples and the training draws.
    """

    steps: int = 1000
    lr: float = 1e-5
    batch_size: int = 5
    mosaic_block: int = 32
    target: str = "paper"
    preserve_target: str = "teacher"
    weight_mosaic: float = 0.5
    weight_preserve: float = 0.5
    max_timestep: int = 1000
    snr_gamma: float = 0.0
    benign_prompts: tuple[str, ...] = ("",)
    benign_samples: int = 8
    resolution: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        prompts = self.benign_prompts
        object.__setattr__(
            self, "benign_prompts", ("",) if prompts in ("", ()) else parse_concepts(prompts) or ("",)
        )
        for name in ("steps", "batch_size", "mosaic_block", "benign_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConceptGuardError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.target not in MOSAIC_TARGETS:
            raise ConceptGuardError(f"`target` must be one of {list(MOSAIC_TARGETS)}, got {self.target!r}.")
        if self.preserve_target not in PRESERVE_TARGETS:
            raise ConceptGuardError(
                f"`preserve_target` must be one of {list(PRESERVE_TARGETS)}, got {self.preserve_target!r}."
            )
        if not 0 < self.lr < 1:
            raise ConceptGuardError(f"`lr` must be in (0, 1), got {self.lr!r}; SafeGen uses 1e-5 … 1e-4.")
        if not (0 <= self.weight_mosaic <= 100 and 0 <= self.weight_preserve <= 100):
            raise ConceptGuardError(
                f"`weight_mosaic` and `weight_preserve` must be in [0, 100], got "
                f"{self.weight_mosaic!r}, {self.weight_preserve!r}."
            )
        if not 1 <= self.max_timestep <= 1000:
            raise ConceptGuardError(f"`max_timestep` must be in [1, 1000], got {self.max_timestep!r}.")
        if not 0 <= self.snr_gamma <= 1000:
            raise ConceptGuardError(
                f"`snr_gamma` must be in [0, 1000] (0 = off), got {self.snr_gamma!r}; 5 is usual."
            )
        if self.resolution is not None and not 8 <= self.resolution <= 4096:
            raise ConceptGuardError(f"`resolution` must be in [8, 4096] pixels, got {self.resolution!r}.")

    def to_metadata(self) -> dict[str, str]:
        """Header entries: the whole config once (JSON) and the fields people look for as flat keys."""
        return config_metadata(self, summary=("mosaic_block", "steps", "lr", "target"))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> SafeGenConfig:
        """The config a SafeGen edit file was trained with."""
        return config_from_metadata(cls, metadata)
