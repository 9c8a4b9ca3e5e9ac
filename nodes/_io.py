"""Where nodes write files, and how they report progress: ComfyUI's folders, our naming rules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

from ..core.files import check_destination, sanitize_name
from ..core.trainer import StepCallback

#: Subfolder of ComfyUI's ``loras`` folder that holds our edit files (LoraLoader lists it too).
EDITS_SUBFOLDER = "concept_guard"


def _model_file(kind: str, subfolder: str, name: str, *, what: str, overwrite: bool) -> Path:
    """``models/<kind>/<subfolder>/<name>.safetensors``, checked (safe name, no silent overwrite) and its
    folder created, before training starts, so a bad name or an existing file costs no training time."""
    name = sanitize_name(name.removesuffix(".safetensors"), what=what)
    folder = Path(folder_paths.get_folder_paths(kind)[0]) / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    return check_destination(folder / f"{name}.safetensors", overwrite=overwrite, how="turn on `overwrite`")


def edit_output_path(file_name: str, *, overwrite: bool) -> Path | None:
    """``models/loras/concept_guard/<name>.safetensors`` for a user-given name; ``None`` if empty.

    Raises:
        OutputPathError: unsafe name, or the file exists and ``overwrite`` is False.
    """
    if not file_name.strip():
        return None
    return _model_file("loras", EDITS_SUBFOLDER, file_name, what="file_name", overwrite=overwrite)


def embedding_output_path(name: str, *, overwrite: bool) -> Path:
    """``models/embeddings/<name>.safetensors``, where ComfyUI's ``embedding:<name>`` finds it.

    Raises:
        OutputPathError: unsafe name, or the file exists and ``overwrite`` is False.
    """
    return _model_file("embeddings", "", name, what="embedding name", overwrite=overwrite)


def progress_callback(
    total: int, node_id: str | None = None, preview: Callable[[int], tuple | None] | None = None
) -> StepCallback:
    """ProgressBar updates (which also check for interrupts) plus a loss event for our web extension; with
    ``preview``, the image it returns for a step (``None`` on most steps) shows on the node."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def on_step(step: int, steps: int, loss: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(step, steps, preview(step) if preview is not None and step else None)
        if step == 0:  # still sampling the frozen model's trajectories: no loss yet
            return
        _send({"node": node_id, "step": step, "total": steps, "loss": loss})

    return on_step


def phase_callback(node_id: str | None = None) -> Callable[[str], None]:
    """Phase events ("sampling the frozen model's trajectories", "training", …) for the node's status line;
    the first one of a run also clears what an earlier run left there."""

    def on_phase(phase: str) -> None:
        _send({"node": node_id, "phase": phase})

    return on_phase


def _send(event: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # headless use of the nodes (tests, scripts): no server to notify
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync("concept_guard.progress", event)
