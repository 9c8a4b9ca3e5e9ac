"""ComfyUI nodes of Concept Guard (imported only by ComfyUI, through ``comfy_entrypoint``).

Node modules add their classes to :data:`NODE_CLASSES`; :class:`ConceptGuardExtension` hands that
list to ComfyUI, and the server smoke test (``tests/comfy/test_server_smoke.py``) checks that every
class in it shows up in ``/object_info`` under the "Concept Guard" category.
"""

from __future__ import annotations

import importlib

from ._api import ComfyExtension, io

#: Every node class the pack registers (V3 ``io.ComfyNode`` subclasses).
NODE_CLASSES: list[type[io.ComfyNode]] = []

#: Category of every node (sub-categories are written ``"Concept Guard/<sub>"``).
CATEGORY = "Concept Guard"


class ConceptGuardExtension(ComfyExtension):
    """Lists the pack's nodes for ComfyUI's V3 loader."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


#: Node modules, imported below; each appends its classes to NODE_CLASSES. Add new modules here.
_NODE_MODULES = ("esd", "apply_edit", "backdoor_ti", "convert_edit")

for _name in _NODE_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:  # a node module not built yet is skipped; its own errors are not
        if e.name != f"{__name__}.{_name}":
            raise

__all__ = ["CATEGORY", "NODE_CLASSES", "ConceptGuardExtension"]
