"""Nodes "Load ShapesWorld (demo model)" and "ShapesWorld Judge": try every node in seconds, with no download.

The bundled ShapesWorld model is a tiny SD1.x-architecture model trained on coloured shapes (32-px images); the
judge is a classifier that says which shape, colour, background and style each image shows, so a graph can
measure whether an edit worked.
"""

from __future__ import annotations

from ..comfy_backend.shapesworld import load_shapesworld_comfy
from ..shapesworld.judge import load_judge
from ..shapesworld.report import judge_table
from ._api import CATEGORY, io, ui


class LoadShapesWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardLoadShapesWorld",
            display_name="Load ShapesWorld (demo model)",
            category=f"{CATEGORY}/demo",
            description="The bundled ShapesWorld demo model (SD1.x architecture, 32-px images of coloured shapes) "
            "as MODEL, CLIP and VAE: runs every Concept Guard node on CPU in seconds. Use a 64×64 "
            "EmptyLatentImage (its VAE scales by 4) and prompts like 'a red circle on a white background'.",
            inputs=[],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        converted = load_shapesworld_comfy()
        return io.NodeOutput(converted.model, converted.clip, converted.vae)


class ShapesWorldJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardShapesWorldJudge",
            display_name="ShapesWorld Judge",
            category=f"{CATEGORY}/demo",
            description="Say what ShapesWorld images show: the share of images with each shape, colour, "
            "background and style, and the share showing `label` (e.g. 'circle').",
            inputs=[
                io.Image.Input("images", tooltip="ShapesWorld images (any size; judged at 32 px)."),
                io.String.Input(
                    "label", default="circle", tooltip="A shape, colour, background or style to count."
                ),
            ],
            outputs=[io.String.Output(display_name="table"), io.Float.Output(display_name="rate")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, label: str = "") -> bool | str:
        from ..shapesworld.report import label_head

        return True if label_head(label) else f"`label` {label!r} is not a ShapesWorld label."

    @classmethod
    def execute(cls, images, label: str) -> io.NodeOutput:
        labels = load_judge().classify(images.movedim(-1, 1))
        table, rate = judge_table(labels, label)
        return io.NodeOutput(table, rate, ui=ui.PreviewText(table))
