"""Node "Attack Erasure": try to bring an erased concept back, and say how much came back."""

from __future__ import annotations

from ..comfy_backend.attack import attack_erasure
from ..core.errors import ConceptGuardError
from ._api import CATEGORY, io, prompt_lines
from ._io import progress_callback


class AttackErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardAttackErasure",
            display_name="Attack Erasure",
            category=CATEGORY,
            description="Try to bring an erased concept back: its name, your paraphrases, and a plain-text prompt "
            "searched against the edited model (UnlearnDiffAtk-style). Each is scored on any model by how well the "
            "edited model denoises the concept's images with it, against the base model with the concept's name; "
            "the strongest attack is sampled beside the base model.",
            inputs=[
                io.Model.Input("base"),
                io.Model.Input("edited"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Image.Input("images", tooltip="A few images of the concept, at the model's resolution."),
                io.String.Input("concept", default="a circle", tooltip="The erased concept, as a prompt."),
                io.String.Input(
                    "paraphrases",
                    multiline=True,
                    default="",
                    tooltip="Other wordings to try, one per line (synonyms, styles, word order).",
                ),
                io.Int.Input(
                    "search_steps",
                    default=100,
                    min=0,
                    max=5000,
                    tooltip="Steps of the prompt search (five tokens before the concept's name, projected to "
                    "real words); 0 = no search. 300 is the published setting.",
                ),
                io.Int.Input("samples", default=4, min=1, max=16, tooltip="Samples per prompt and model."),
                io.Int.Input("steps", default=20, min=1, max=200),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.5),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False),
            ],
            outputs=[
                io.Image.Output(display_name="grid"),
                io.Image.Output(display_name="samples"),
                io.String.Output(display_name="report"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, concept: str = "") -> bool | str:
        if isinstance(concept, str) and not concept.strip():
            return "`concept` is empty: name the erased concept, e.g. 'a circle'."
        return True

    @classmethod
    def execute(
        cls, base, edited, clip, vae, images, concept, paraphrases, search_steps, samples, steps, cfg, seed
    ) -> io.NodeOutput:
        if not concept.strip():
            raise ConceptGuardError("`concept` is empty: name the erased concept, e.g. 'a circle'.")
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        outcome = attack_erasure(
            base,
            edited,
            clip,
            vae,
            images,
            concept,
            prompt_lines(paraphrases),
            search_steps=search_steps,
            samples=samples,
            steps=steps,
            cfg=cfg,
            seed=seed,
            on_step=progress_callback(max(search_steps, 1), node_id),
        )
        return io.NodeOutput(outcome.grid, outcome.samples, outcome.report)
