"""ShapesWorld: a procedural world, a tiny SD-architecture model trained on it, and a judge.

Why: no real Stable Diffusion weights are available here; every efficacy claim (erasure, preservation,
backdoor) is measured on this model with the judge. See ``world.py``, ``train.py`` and ``judge.py``.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def shapesworld_model_path() -> Path:
    """The committed ShapesWorld pipeline folder (an SD1.x-format diffusers folder, fp16)."""
    return ASSETS / "model"


def shapesworld_judge_path() -> Path:
    """The committed judge weights (``judge.safetensors``)."""
    return ASSETS / "judge.safetensors"


def load_shapesworld(*, device: str = "cpu"):
    """The bundled model as a :class:`~concept_guard.core.backends.diffusers_backend.DiffusersBackend`."""
    from ..core.backends.diffusers_backend import DiffusersBackend

    return DiffusersBackend.load(shapesworld_model_path(), device=device)


__all__ = ["load_shapesworld", "shapesworld_model_path", "shapesworld_judge_path"]
