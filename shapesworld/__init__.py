"""ShapesWorld: a procedural world, a tiny SD-architecture model trained on it, and a judge.

Why: no real Stable Diffusion weights are available here; every efficacy claim (erasure, preservation,
backdoor) is measured on this model with the judge. See ``world.py``, ``train.py`` and ``judge.py``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def shapesworld_model_path() -> Path:
    """The committed ShapesWorld pipeline folder (an SD1.x-format diffusers folder, fp16)."""
    return ASSETS / "model"


def shapesworld_judge_path() -> Path:
    """The committed judge weights (``judge.safetensors``)."""
    return ASSETS / "judge.safetensors"


@functools.cache
def shapesworld_fingerprint() -> str:
    """The bundled UNet's weights fingerprint (what ``backend.fingerprint`` reports for it on every backend)."""
    from safetensors.torch import load_file

    from ..core.fingerprint import weights_fingerprint
    from ..core.unet.keymap import UNetKeyMap

    unet = ASSETS / "model" / "unet"
    keymap = UNetKeyMap(json.loads((unet / "config.json").read_text()))
    weights = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    return weights_fingerprint((keymap.to_ldm(k), v) for k, v in weights.items())


def load_shapesworld(*, device: str = "cpu"):
    """The bundled model as a :class:`~concept_guard.core.backends.diffusers_backend.DiffusersBackend`."""
    from ..core.backends.diffusers_backend import DiffusersBackend

    return DiffusersBackend.load(shapesworld_model_path(), device=device)


__all__ = ["load_shapesworld", "shapesworld_fingerprint", "shapesworld_judge_path", "shapesworld_model_path"]
