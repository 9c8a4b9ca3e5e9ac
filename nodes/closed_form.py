"""Node "Erase Concept (closed form)": schema + one call into ``core.methods.uce``."""

from __future__ import annotations

from ..comfy_backend.backend import ComfyBackend
from ..comfy_backend.patches import make_patched_model
from ..core.edits.diff_file import EDIT_DTYPE, save_edit
from ..core.methods.esd import parse_concepts
from ..core.methods.uce import CLOSED_FORM_METHODS, UCEConfig, train
from ..core.score import score_edit, score_metadata, score_report
from ..presets import AUTO, UCE_DEFAULTS, auto_hint, describe, uce_settings
from ._api import CATEGORY, choice_problem, edit_file_inputs, edit_outputs, io
from ._io import edit_output_path, phase_callback

_REPORTED = ("method", "erase_scale", "preserve_scale", "lamb", "rounds")
_METHODS = (AUTO, *CLOSED_FORM_METHODS)
_AUTO_HINT = {key: auto_hint(UCE_DEFAULTS, key) for key in ("method", "eta", "erase_scale", "lamb")}


class EraseConceptClosedForm(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardEraseClosedForm",
            display_name="Erase Concept (closed form)",
            category=CATEGORY,
            description="Erase concepts in seconds with UCE or RECE: one closed-form solve of every cross-attention "
            "key/value projection, no training. The input MODEL is untouched; the output MODEL carries the edit "
            "as patches, and the edit is saved to models/loras/concept_guard/ if named.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("concepts", default="", tooltip="Concept(s) to erase, comma-separated."),
                io.Combo.Input(
                    "method",
                    options=list(_METHODS),
                    default=AUTO,
                    tooltip="uce: one solve (seconds). rece: UCE, then rounds that find the embedding which still "
                    "brings the concept back and erase it too (a little slower, holds better against attacks). "
                    f"auto = {_AUTO_HINT['method']}.",
                ),
                io.String.Input(
                    "anchor", default="", tooltip="What the concepts turn into; empty = the empty prompt."
                ),
                io.String.Input(
                    "preserve",
                    default="",
                    multiline=True,
                    tooltip="Prompts whose images must not change, comma-separated (e.g. 'a dog, a tree'); none may "
                    "name an erased concept. Empty = none (on ShapesWorld: every other shape in every colour).",
                ),
                io.Float.Input(
                    "eta",
                    default=0.0,
                    min=0.0,
                    max=20.0,
                    step=0.1,
                    tooltip="Push erased prompts past the anchor, away from the concept (like ESD's eta). 0 = auto "
                    f"({_AUTO_HINT['eta']}); on SD auto maps them onto the anchor, as UCE does.",
                ),
                io.Float.Input(
                    "erase_scale",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip=f"Weight of the erased prompts; 0 = auto ({_AUTO_HINT['erase_scale']}).",
                ),
                io.Float.Input(
                    "preserve_scale",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Weight of the preserved prompts; 0 = auto (max(0.1, 1 / number of preserved prompts)).",
                ),
                io.Float.Input(
                    "lamb",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    tooltip=f"How strongly the weights stay where they were; 0 = auto ({_AUTO_HINT['lamb']}).",
                ),
                io.Int.Input("rounds", default=3, min=1, max=20, tooltip="RECE rounds (method rece only)."),
                *edit_file_inputs(),
                io.String.Input(
                    "erase_from",
                    default="",
                    optional=True,
                    tooltip="More prompts to erase, comma-separated (e.g. 'a red circle, a blue circle'); empty = "
                    "the concepts only (on ShapesWorld: the concept in every colour).",
                ),
                io.Boolean.Input(
                    "score",
                    default=True,
                    optional=True,
                    tooltip="After the solve, measure the concept score (samples a few x_t with the base model; "
                    "seconds on a GPU, longer on a CPU) and say in the report whether the concept was erased.",
                ),
                io.Int.Input(
                    "resolution",
                    default=0,
                    min=0,
                    max=4096,
                    step=8,
                    optional=True,
                    tooltip="Image side (px) of the score's x_t; 0 = the model's native size.",
                ),
            ],
            outputs=edit_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, concepts: str = "", method: str = AUTO) -> bool | str:
        # Only what is checked here is named (see the ESD node): ComfyUI skips its own checks for these inputs.
        if isinstance(concepts, str) and not parse_concepts(concepts):
            return "`concepts` is empty: name at least one concept to erase, e.g. 'circle'."
        return choice_problem("method", method, _METHODS) or True

    @classmethod
    def execute(
        cls,
        model,
        clip,
        concepts: str,
        method: str,
        anchor: str,
        preserve: str,
        eta: float,
        erase_scale: float,
        preserve_scale: float,
        lamb: float,
        rounds: int,
        file_name: str,
        overwrite: bool = False,
        erase_from: str = "",
        score: bool = True,
        resolution: int = 0,
    ) -> io.NodeOutput:
        path = edit_output_path(file_name, overwrite=overwrite)
        backend = ComfyBackend(model, clip)
        given = dict(
            method=method,
            eta=eta,
            erase_scale=erase_scale,
            lamb=lamb,
            preserve=preserve,
            erase_from=erase_from,
        )
        given = {k: None if v in (0, AUTO, "") else v for k, v in given.items()}
        settings = uce_settings(backend, concepts, given | {"rounds": rounds})
        cfg = UCEConfig(**settings, anchor=anchor, preserve_scale=preserve_scale or None)
        on_phase = phase_callback(cls.hidden.unique_id if cls.hidden is not None else None)
        with backend.training():
            result = train(cfg, backend, on_phase=on_phase)
            # The MODEL gets exactly what the file holds (fp16 deltas), so applying the file reproduces it.
            deltas = {k: v.to(EDIT_DTYPE) for k, v in result.tensors.items()}
            scores = None
            if score:
                on_phase("scoring the edit")
                latent = resolution // 8 if resolution else None
                scores = score_edit(backend, deltas, cfg.concepts, cfg.preserve[:3], latent_size=latent)
                result.metadata["concept_guard.concept_score"] = score_metadata(*scores)
        on_phase(f"done in {result.seconds:.1f}s")
        edited = make_patched_model(model, deltas, 1.0)
        if path is not None:
            save_edit(deltas, path, result.metadata, dtype=EDIT_DTYPE, overwrite=overwrite)
        shown = {**settings, "preserve_scale": round(cfg.effective_preserve_scale, 4)}
        lines = [
            describe(backend, shown, _REPORTED),
            f"solved in {result.seconds:.2f}s",
            score_report(*scores) if scores else "concept score: off",
        ]
        return io.NodeOutput(
            edited, str(path) if path else "", "\n".join(lines + ([f"saved {path}"] if path else []))
        )
