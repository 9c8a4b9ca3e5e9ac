"""Model-aware defaults: the settings a method uses when the user leaves them on "auto".

Each family gets the values its official training scripts use, and the bundled ShapesWorld demo model (recognised
by its weights' fingerprint) gets the recipe measured on it (docs/results.md), so that the defaults a user sees
work on the model in hand:

- SD1.x / SD2.x: the official ESD 2025 SD script: esd-x, η 2 (concept-anchored; the paper's 1), 200 steps,
  lr 5e-5, x_t sampled with CFG 3 over 50 DDIM steps.
- SDXL: the official ESD 2025 SDXL script: η 1, lr 2e-4, CFG 2, 200 steps.
- ShapesWorld: attn2 to_k/to_v (esd-x-strict), η 3, 400 steps, lr 3e-3, CFG 5, and for a shape or style the
  concept erased from its prompts in every colour while the other shapes and colours are held in place.

Adversarial ESD (``adv_steps``) is off on every family unless asked for: on ShapesWorld it lowers what concept
inversion brings back but costs the most similar shape (docs/results.md).

Backdoored textual inversion: SD families keep the trainer's defaults (2 vectors from "object", γ 1, 1000
steps, lr 5e-3); ShapesWorld gets its measured recipe (8 vectors from "shape", γ 0.3, 5000 steps, lr 3e-3).
"""

from __future__ import annotations

from collections.abc import Mapping

from .core.backend import DiffusionBackend
from .core.methods.esd import parse_concepts
from .shapesworld import shapesworld_fingerprint
from .shapesworld.recipes import (
    DEMO_BACKDOOR_TI,
    DEMO_ESD,
    DEMO_SAFEGEN,
    DEMO_UCE,
    closed_form_recipe,
    shapesworld_recipe,
)

#: What a node shows for a setting chosen by model (numbers use 0, methods this word).
AUTO = "auto"
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "shapesworld": "ShapesWorld (demo model)"}

_SD = dict(method="esd-x", eta=2.0, iterations=200, lr=5e-5, guidance=3.0, sampling_steps=50, adv_steps=0)
ESD_DEFAULTS: dict[str, dict[str, object]] = {
    "sd1": _SD,
    "sd2": _SD,
    "sdxl": {**_SD, "eta": 1.0, "lr": 2e-4, "guidance": 2.0},
    "shapesworld": dict(DEMO_ESD),
}


_TI_SD = dict(init_word="object", vectors=2, gamma=1.0, steps=1000, lr=5e-3)
TI_DEFAULTS: dict[str, dict[str, object]] = {
    "sd1": _TI_SD,
    "sd2": _TI_SD,
    "sdxl": _TI_SD,
    "shapesworld": {k: v for k, v in DEMO_BACKDOOR_TI.items() if k != "triggers"},
}


#: SafeGen: the official script's values on SD families (1000 steps of 5 triplets, lr 1e-5, the paper's target,
#: the official 0.5/0.5 weights) with a 32-pixel mosaic and the frozen teacher as the preservation target;
#: ShapesWorld gets its measured recipe (docs/results.md).
_SAFEGEN_SD = dict(
    steps=1000,
    lr=1e-5,
    batch_size=5,
    mosaic_block=32,
    target="paper",
    preserve_target="teacher",
    weight_mosaic=0.5,
    weight_preserve=0.5,
    max_timestep=1000,
)
SAFEGEN_DEFAULTS: dict[str, dict[str, object]] = {
    "sd1": _SAFEGEN_SD,
    "sd2": _SAFEGEN_SD,
    "sdxl": {**_SAFEGEN_SD, "mosaic_block": 64},
    "shapesworld": dict(DEMO_SAFEGEN),
}


#: Closed-form erasure (UCE/RECE): the official UCE script's values on SD families; ShapesWorld gets the values
#: measured on it (docs/results.md) and, for one shape or style, the ESD recipe's prompts.
_UCE_SD = dict(method="uce", eta=0.0, erase_scale=1.0, lamb=0.5, rounds=3)
UCE_DEFAULTS: dict[str, dict[str, object]] = {
    "sd1": _UCE_SD,
    "sd2": _UCE_SD,
    "sdxl": _UCE_SD,
    "shapesworld": dict(DEMO_UCE),
}


#: Attack steps per round of adversarial ESD when a user turns it on (see ``core.methods.esd_adv``).
ADV_STEPS_ON = 100


def adversarial_steps(choice: str | None) -> int | None:
    """``adv_steps`` for a user's "auto"/"on"/"off" choice (``None`` = auto: by model family)."""
    if choice in (None, "", AUTO):
        return None
    return {"on": ADV_STEPS_ON, "off": 0}[choice]


def auto_hint(defaults: Mapping[str, Mapping[str, object]], key: str) -> str:
    """What "auto" means for one setting, per family (for node tooltips): ``"sd1 200, sdxl 200, ..."``."""
    return ", ".join(f"{family} {values[key]}" for family, values in defaults.items() if family != "sd2")


def model_family(backend: DiffusionBackend) -> str:
    """``"shapesworld"`` for the bundled demo model, else the backend's architecture (``sd1``/``sd2``/``sdxl``)."""
    if backend.arch == "sd1" and backend.fingerprint == shapesworld_fingerprint():
        return "shapesworld"
    return backend.arch


def esd_settings(backend: DiffusionBackend, concepts: str, given: Mapping[str, object]) -> dict[str, object]:
    """``ESDConfig`` keyword arguments: the ``given`` values, with every ``None`` (auto) filled in from the
    model family's defaults. On ShapesWorld a single shape or style also gets the recipe's prompts
    (``erase_from``, ``preserve``) unless the user gave their own."""
    family = model_family(backend)
    settings: dict[str, object] = {"concepts": concepts}
    names = parse_concepts(concepts)
    if family == "shapesworld" and len(names) == 1:
        settings.update(shapesworld_recipe(names[0].removeprefix("a ").removeprefix("an ")))
    for key, value in ESD_DEFAULTS[family].items():
        settings[key] = value
    for key, value in given.items():
        if value is not None and value != "" and value != ():
            settings[key] = value
    return settings


def uce_settings(backend: DiffusionBackend, concepts: str, given: Mapping[str, object]) -> dict[str, object]:
    """``UCEConfig`` keyword arguments, filled in as :func:`esd_settings` does (the ShapesWorld recipe's
    ``erase_from`` and ``preserve`` prompts for one shape or style, unless the user gave their own)."""
    family = model_family(backend)
    settings: dict[str, object] = {"concepts": concepts}
    names = parse_concepts(concepts)
    if family == "shapesworld" and len(names) == 1:
        recipe = closed_form_recipe(names[0].removeprefix("a ").removeprefix("an "))
        settings.update({k: recipe[k] for k in ("concepts", "erase_from", "preserve") if k in recipe})
    settings.update(UCE_DEFAULTS[family])
    settings.update({k: v for k, v in given.items() if v is not None and v != "" and v != ()})
    return settings


def ti_settings(backend: DiffusionBackend, given: Mapping[str, object]) -> dict[str, object]:
    """``BackdoorTIConfig`` keyword arguments: the ``given`` values, every ``None`` filled in from the model
    family's defaults (on ShapesWorld: the measured backdoor recipe, 8 vectors from "shape", γ 0.3)."""
    settings = dict(TI_DEFAULTS[model_family(backend)])
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings


def safegen_settings(backend: DiffusionBackend, given: Mapping[str, object]) -> dict[str, object]:
    """``SafeGenConfig`` keyword arguments: the ``given`` values, every ``None`` filled in from the model family's
    defaults."""
    settings = dict(SAFEGEN_DEFAULTS[model_family(backend)])
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings


def describe(backend: DiffusionBackend, settings: Mapping[str, object], keys: tuple[str, ...]) -> str:
    """One line naming the family and the settings in effect, for logs and node reports."""
    values = ", ".join(f"{k} {settings[k]}" for k in keys if k in settings)
    return f"{FAMILY_NAMES[model_family(backend)]}: {values}"
