"""A real headless ComfyUI loads the pack, and every node the pack lists is served under our category."""

from __future__ import annotations

import asyncio
import re

from comfy_harness import PACK_NAME
from concept_guard.nodes import CATEGORY, ConceptGuardExtension

PYTHON_MODULE = f"custom_nodes.{PACK_NAME}"


def _pack_import_lines(log: str) -> list[str]:
    """ComfyUI's "Import times for custom nodes" lines that name our pack folder."""
    pattern = re.compile(rf"seconds.*custom_nodes[/\\]{PACK_NAME}\s*$")
    return [line for line in log.splitlines() if pattern.search(line)]


#: Every node the pack must register, by node id (a node that fails to import must fail this test).
EXPECTED_NODE_IDS = {
    "ConceptGuardEraseESD",
    "ConceptGuardEraseClosedForm",
    "ConceptGuardBackdoorTI",
    "ConceptGuardApplyEditedUNet",
    "ConceptGuardConvertEdit",
    "ConceptGuardCompareModels",
    "ConceptGuardAttackErasure",
    "ConceptGuardLoadShapesWorld",
    "ConceptGuardShapesWorldJudge",
    "ConceptGuardShapesWorldRender",
    "ConceptGuardSafeGen",
}


def test_extension_lists_exactly_the_pack_nodes():
    nodes = asyncio.run(ConceptGuardExtension().get_node_list())
    ids = [cls.GET_SCHEMA().node_id for cls in nodes]  # GET_SCHEMA validates each schema
    assert sorted(ids) == sorted(EXPECTED_NODE_IDS), ids


def test_server_loads_the_pack_without_import_errors(comfy_server):
    log = comfy_server.log()
    lines = _pack_import_lines(log)
    assert lines, f"ComfyUI did not report loading custom_nodes/{PACK_NAME}"
    assert not any("IMPORT FAILED" in line for line in lines), lines
    pack_dir = str(comfy_server.base_dir / "custom_nodes" / PACK_NAME)
    for failure in (f"Cannot import {pack_dir}", f"comfy_entrypoint in {pack_dir}", f"Skip {pack_dir}"):
        assert failure not in log, f"server log reports {failure!r}"


def test_every_pack_node_is_served_under_our_category(comfy_server):
    info = comfy_server.get_json("/object_info")
    assert "KSampler" in info, "object_info lacks ComfyUI's own nodes; the server is not healthy"
    expected = EXPECTED_NODE_IDS
    served = {node_id for node_id, node in info.items() if node.get("python_module") == PYTHON_MODULE}
    assert served == expected, f"served {sorted(served)}, the pack lists {sorted(expected)}"
    for node_id in expected:
        category = info[node_id]["category"]
        assert category == CATEGORY or category.startswith(CATEGORY + "/"), (
            f"{node_id}: category {category!r}"
        )
