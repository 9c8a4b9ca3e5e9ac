"""ShapesWorld as ComfyUI objects for the tests: the product's conversion, with an override of the folder."""

from __future__ import annotations

import os
from pathlib import Path

from concept_guard.comfy_backend.shapesworld import (  # noqa: F401  (re-exported for the tests)
    WEIGHT_FILES,
    ComfyShapesWorld,
    ConversionError,
    load_shapesworld_comfy,
)
from concept_guard.shapesworld import shapesworld_model_path

#: Overrides the model folder (e.g. an intermediate export while the bundled model is being trained).
MODEL_ENV = "CONCEPT_GUARD_SHAPESWORLD_MODEL"


def shapesworld_folder() -> Path | None:
    """The ShapesWorld pipeline folder to convert (``$CONCEPT_GUARD_SHAPESWORLD_MODEL`` or the bundled
    asset), or ``None`` when it has no weights."""
    folder = Path(os.environ.get(MODEL_ENV) or shapesworld_model_path())
    return folder if all((folder / f).is_file() for f in WEIGHT_FILES) else None
