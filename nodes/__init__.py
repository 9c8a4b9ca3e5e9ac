"""ComfyUI nodes of Concept Guard (imported only by ComfyUI, through ``comfy_entrypoint``).

Every node class is listed in :data:`NODE_CLASSES`, explicitly: a node module that fails to import is an
import error, never a silently missing node. :class:`ConceptGuardExtension` hands the list to ComfyUI.
"""

from __future__ import annotations

from ._api import CATEGORY, ComfyExtension, io
from .apply_edit import ApplyEditedUNet
from .attack import AttackErasure
from .backdoor_ti import BackdoorTIEmbedding
from .closed_form import EraseConceptClosedForm
from .compare import CompareModels
from .convert_edit import ConvertEdit
from .esd import EraseConceptESD
from .safegen import EraseVisualConceptSafeGen
from .shapesworld import LoadShapesWorld, ShapesWorldJudge, ShapesWorldRender

#: Every node class the pack registers (V3 ``io.ComfyNode`` subclasses).
NODE_CLASSES: list[type[io.ComfyNode]] = [
    EraseConceptESD,
    EraseConceptClosedForm,
    EraseVisualConceptSafeGen,
    BackdoorTIEmbedding,
    ApplyEditedUNet,
    ConvertEdit,
    CompareModels,
    AttackErasure,
    LoadShapesWorld,
    ShapesWorldRender,
    ShapesWorldJudge,
]


class ConceptGuardExtension(ComfyExtension):
    """Lists the pack's nodes for ComfyUI's V3 loader."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


__all__ = ["CATEGORY", "NODE_CLASSES", "ConceptGuardExtension"]
