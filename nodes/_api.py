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


def edit_outputs() -> list:
    """``MODEL`` (the input's clone with the edit as patches), ``path`` (the saved file, or empty) and ``report``:
    what every node that makes an edit returns."""
    return [
        io.Model.Output(display_name="MODEL"),
        io.String.Output(display_name="path"),
        io.String.Output(display_name="report"),
    ]


def choice_problem(name: str, value: str, options: tuple[str, ...]) -> str | None:
    """The reason a combo value is refused at queue time (ComfyUI 0.3.64 checks no V3 combo value itself), or
    ``None``; "" is accepted as auto, which the page sends for a combo it has no value for."""
    if value in (*options, ""):
        return None
    return f"`{name}` must be one of {list(options)}, got {value!r}."


__all__ = ["CATEGORY", "ComfyExtension", "choice_problem", "edit_file_inputs", "edit_outputs", "io", "ui"]


def prompt_lines(text: str) -> list[str]:
    """The non-empty lines of a multiline prompt input, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]
