"""Node "Apply Edited UNet": schema + one call into ``comfy_backend.lora`` (any edit file, with a strength dial)."""

from __future__ import annotations

import logging

import folder_paths

from ..comfy_backend.lora import apply_edit_file
from ._api import CATEGORY, io

logger = logging.getLogger(__name__)


class ApplyEditedUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardApplyEditedUNet",
            display_name="Apply Edited UNet",
            category=CATEGORY,
            description="Apply a weight edit to the UNet as W + strength·ΔW. LoRA-family files (kohya, "
            "diffusers/peft, LoCon, LoHa, LoKr, DoRA) are applied by ComfyUI's own LoRA loader, as "
            "LoraLoaderModelOnly does; our .diff edits, ESD and UCE weight files and full UNets/checkpoints (their "
            "difference from this model) by Concept Guard's reader. Recognised from content; the report says "
            "which loader applied it and which keys were not applied. The input MODEL is untouched.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input(
                    "edit",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="An edit file in models/loras (our edits are in models/loras/concept_guard/).",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-2.0,
                    max=2.0,
                    step=0.05,
                    tooltip="0 = the base model, 1 = the edit as trained, negative values invert it.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, edit: str, strength: float) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", edit)
        patched, report = apply_edit_file(model, path, strength)
        logger.info("Apply Edited UNet:\n%s", report)
        return io.NodeOutput(patched, report)
