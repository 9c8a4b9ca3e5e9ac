"""Node "Convert Edit": schema + one call into ``core.edit_convert`` (an edit file -> .diff or low-rank LoRA)."""

from __future__ import annotations

import logging

import folder_paths

from ..comfy_backend.model_info import unet_target
from ..core.edits.export import DEFAULT_RANK, EDIT_KINDS, write_edit_as
from ..core.edits.read import read_edit_file
from ..core.errors import OutputPathError
from ._api import CATEGORY, io, ui
from ._io import edit_output_path

logger = logging.getLogger(__name__)


class ConvertEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardConvertEdit",
            display_name="Convert Edit",
            category=CATEGORY,
            description="Convert a weight edit (any file Apply Edited UNet reads, checked against this MODEL) to a "
            "low-rank kohya LoRA (SVD at `rank`; the report gives the relative approximation error) or to our .diff "
            "format, saved to models/loras/concept_guard/. For a merged checkpoint, chain Apply Edited UNet into "
            "the stock Save Checkpoint (CheckpointSave) node.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The base model the edit belongs to: the edit is read and validated "
                    "against its UNet (full-weight files become their difference from it).",
                ),
                io.Combo.Input(
                    "edit",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="An edit file in models/loras (our edits are in models/loras/concept_guard/).",
                ),
                io.Combo.Input(
                    "to",
                    options=list(EDIT_KINDS),
                    default="lora",
                    tooltip="lora: low-rank kohya LoRA (SVD at `rank`); diff: our exact .diff format.",
                ),
                io.Int.Input(
                    "rank",
                    default=DEFAULT_RANK,
                    min=1,
                    max=1024,
                    tooltip="LoRA rank (to = lora only); higher is closer to the edit and larger.",
                ),
                io.String.Input(
                    "file_name", default="", tooltip="Save as models/loras/concept_guard/<name>.safetensors."
                ),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace an existing file of that name."
                ),
            ],
            outputs=[io.String.Output(display_name="path"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, model, edit: str, to: str, rank: int, file_name: str, overwrite: bool = False
    ) -> io.NodeOutput:
        out = edit_output_path(file_name, overwrite=overwrite)
        if out is None:
            raise OutputPathError("`file_name` is empty: name the converted file, e.g. 'no_circles_lora'.")
        loaded = read_edit_file(folder_paths.get_full_path_or_raise("loras", edit), unet_target(model))
        export = write_edit_as(loaded, to, out, rank=rank, overwrite=overwrite)
        report = "\n".join(
            line for line in (loaded.summary(), f"Wrote {export.path} ({to})", export.error_line) if line
        )
        logger.info("Convert Edit:\n%s", report)
        return io.NodeOutput(str(export.path), report, ui=ui.PreviewText(report))
