"""Nodes "Load ShapesWorld (demo model)" and "ShapesWorld Judge": try every node in seconds, with no download.

The bundled ShapesWorld model is a tiny SD1.x-architecture model trained on coloured shapes (32-px images); the
judge is a classifier that says which shape, colour, background and style each image shows, so a graph can
measure whether an edit worked.
"""

from __future__ import annotations

import torch

from ..comfy_backend.shapesworld import load_shapesworld_comfy
from ..shapesworld import world
from ..shapesworld.judge import load_judge
from ..shapesworld.mosaic import load_detector
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


class ShapesWorldRender(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardShapesWorldRender",
            display_name="ShapesWorld Render",
            category=f"{CATEGORY}/demo",
            description="Ground-truth ShapesWorld images for a prompt, drawn by the world itself (not by a "
            "model): what the prompt names is fixed, the rest random. Feed them to the SafeGen or Backdoor TI "
            "node as images of a concept.",
            inputs=[
                io.String.Input(
                    "prompt", default="a heart", tooltip="e.g. 'a heart' or 'an outlined red star'."
                ),
                io.Int.Input("count", default=8, min=1, max=256),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def validate_inputs(cls, prompt: str = "") -> bool | str:
        if not prompt.strip():
            return "`prompt` is empty: name a shape, colour, background or style, e.g. 'a heart'."
        return True

    @classmethod
    def execute(cls, prompt: str, count: int, seed: int) -> io.NodeOutput:
        images, _ = world.render_prompt(prompt, count, seed)
        return io.NodeOutput(torch.from_numpy(images).float() / 255.0)


class ShapesWorldJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardShapesWorldJudge",
            display_name="ShapesWorld Judge",
            category=f"{CATEGORY}/demo",
            description="Say what ShapesWorld images show: the share of images with each shape, colour, "
            "background and style, the share that are mosaics, and the share showing `label` (e.g. 'circle' "
            "or 'mosaic').",
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
        from ..shapesworld.report import MOSAIC, label_head

        if label_head(label) or label.strip().lower() == MOSAIC:
            return True
        return (
            f"`label` {label!r} is not a ShapesWorld label (a shape, colour, background, style or 'mosaic')."
        )

    @classmethod
    def execute(cls, images, label: str) -> io.NodeOutput:
        pixels = images.movedim(-1, 1)
        labels, mosaic = load_judge().classify(pixels), load_detector().detect(pixels)
        table, rate = judge_table(labels, label, mosaic)
        return io.NodeOutput(table, rate, ui=ui.PreviewText(table))
