"""Where nodes write files, and how they report progress: ComfyUI's folders, our naming rules."""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

from ..core.files import check_destination, sanitize_name
from ..core.trainer import StepCallback

#: Subfolder of ComfyUI's ``loras`` folder that holds our edit files (LoraLoader lists it too).
EDITS_SUBFOLDER = "concept_guard"


def edit_output_path(file_name: str, *, overwrite: bool) -> Path | None:
    """``models/loras/concept_guard/<name>.safetensors`` for a user-given name; ``None`` if empty.

    Checked before training starts, so a bad name or an existing file costs no training time.

    Raises:
        OutputPathError: unsafe name, or the file exists and ``overwrite`` is False.
    """
    if not file_name.strip():
        return None
    name = sanitize_name(file_name.removesuffix(".safetensors"), what="file_name")
    folder = Path(folder_paths.get_folder_paths("loras")[0]) / EDITS_SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return check_destination(folder / f"{name}.safetensors", overwrite=overwrite)


def embedding_output_path(name: str, *, overwrite: bool) -> Path:
    """``models/embeddings/<name>.safetensors``, where ComfyUI's ``embedding:<name>`` finds it.

    Raises:
        OutputPathError: unsafe name, or the file exists and ``overwrite`` is False.
    """
    name = sanitize_name(name.removesuffix(".safetensors"), what="embedding name")
    folder = Path(folder_paths.get_folder_paths("embeddings")[0])
    folder.mkdir(parents=True, exist_ok=True)
    return check_destination(folder / f"{name}.safetensors", overwrite=overwrite)


def progress_callback(total: int, node_id: str | None = None) -> StepCallback:
    """ProgressBar updates (which also check for interrupts) plus a loss event for our web extension."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def on_step(step: int, steps: int, loss: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(step, steps)
        if step == 0:  # still sampling the frozen model's trajectories: no loss yet
            return
        _send({"node": node_id, "step": step, "total": steps, "loss": loss})

    return on_step


def _send(event: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # headless use of the nodes (tests, scripts): no server to notify
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync("concept_guard.progress", event)
