"""The one module that imports ComfyUI's node API.

Every node module imports ``io``/``ui``/``ComfyExtension`` from here, so a change of ComfyUI's API
version (``comfy_api.latest`` today) is a one-line edit.
"""

from comfy_api.latest import ComfyExtension, io, ui

#: Category of every node (sub-categories are written ``"Concept Guard/<sub>"``).
CATEGORY = "Concept Guard"

__all__ = ["CATEGORY", "ComfyExtension", "io", "ui"]
