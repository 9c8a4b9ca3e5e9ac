"""Node "Compare Models": the same prompts and seeds through a base MODEL and edited MODELs, side by side."""

from __future__ import annotations

import comfy.utils

from ..comfy_backend.compare import sample_models, score_models
from ..core.errors import ConceptGuardError
from ..core.grid import grid_tensor, labelled_grid
from ._api import CATEGORY, io, prompt_lines


class CompareModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardCompareModels",
            display_name="Compare Models",
            category=CATEGORY,
            description="Sample the base MODEL and the edited MODEL(s) on the same prompts with the same seeds "
            "and lay the samples side by side per prompt, labelled: shows at a glance what an edit changed.",
            inputs=[
                io.Model.Input("base"),
                io.Model.Input("edited"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.String.Input(
                    "prompts",
                    multiline=True,
                    default="a red circle on a white background\na blue square",
                    tooltip="One prompt per line: the erased concept, and things that must not change.",
                ),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False),
                io.Int.Input("samples", default=4, min=1, max=16, tooltip="Samples per prompt and model."),
                io.Int.Input("steps", default=20, min=1, max=200),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.5),
                io.Model.Input("edited_2", optional=True, tooltip="A second edited MODEL to compare."),
                io.Boolean.Input(
                    "score",
                    default=True,
                    optional=True,
                    tooltip="Also measure each prompt's concept score (how much of the base's guidance the "
                    "edited model keeps: 1 = as before, 0 = gone) and return it as a table.",
                ),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, prompts: str = "") -> bool | str:
        if isinstance(prompts, str) and not prompt_lines(prompts):
            return "`prompts` is empty: give at least one prompt, one per line."
        return True

    @classmethod
    def execute(
        cls, base, edited, clip, vae, prompts, seed, samples, steps, cfg, edited_2=None, score=True
    ) -> io.NodeOutput:
        lines = prompt_lines(prompts)
        if not lines:
            raise ConceptGuardError("`prompts` is empty: give at least one prompt, one per line.")
        models = [base, edited, *([edited_2] if edited_2 is not None else [])]
        names = ["base", "edited", "edited 2"][: len(models)]
        bar = comfy.utils.ProgressBar(len(lines) * len(models) * (2 if score else 1))
        images = sample_models(
            models,
            clip,
            vae,
            lines,
            seed=seed,
            samples=samples,
            steps=steps,
            cfg=cfg,
            on_done=lambda: bar.update(1),
        )
        report = ""
        if score:
            report = score_models(models, clip, lines, names[1:])
            bar.update(len(lines) * len(models))
        return io.NodeOutput(grid_tensor(labelled_grid(lines, names, images)), report)
