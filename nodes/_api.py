"""The one module that imports ComfyUI's node API.

Every node module imports ``io``/``ui``/``ComfyExtension`` from here, so a change of ComfyUI's API
version (``comfy_api.latest`` today) is a one-line edit.
"""

from comfy_api.latest import ComfyExtension, io, ui

#: Category of every node (sub-categories are written ``"Concept Guard/<sub>"``).
CATEGORY = "Concept Guard"


def edit_file_inputs() -> list:
    """``file_name`` and ``overwrite``: where a training node saves its edit (the same for every such node)."""
    return [
        io.String.Input(
            "file_name",
            default="",
            tooltip="Save as models/loras/concept_guard/<name>.safetensors; empty = don't save.",
        ),
        io.Boolean.Input(
            "overwrite", default=False, optional=True, tooltip="Replace an existing file of that name."
        ),
    ]


__all__ = ["CATEGORY", "ComfyExtension", "edit_file_inputs", "io", "ui"]
