"""Node "Erase Concept (ESD)": schema + one call into ``core.methods.esd``."""

from __future__ import annotations

from ..comfy_backend.backend import ComfyBackend
from ..comfy_backend.memory import worth_checkpointing
from ..comfy_backend.patches import make_patched_model
from ..comfy_backend.preview import TrainingPreview
from ..core.edits.diff_file import EDIT_DTYPE, save_edit
from ..core.errors import ConceptGuardError
from ..core.methods.esd import ESDConfig, parse_concepts, train
from ..core.score import score_edit, score_metadata, score_report
from ..core.targets import ESD_METHODS
from ..presets import AUTO, ESD_DEFAULTS, adversarial_steps, auto_hint, describe, esd_settings
from ._api import CATEGORY, choice_problem, edit_file_inputs, edit_outputs, io
from ._io import edit_output_path, phase_callback, progress_callback

#: Settings the node reports after a run.
_REPORTED = ("method", "eta", "iterations", "lr", "guidance", "sampling_steps", "adv_steps")
#: Choices of the ``adversarial`` input.
_ADVERSARIAL = (AUTO, "on", "off")
#: "0 = auto" hints: the value per model family.
_AUTO_HINT = {key: auto_hint(ESD_DEFAULTS, key) for key in _REPORTED}


class EraseConceptESD(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardEraseESD",
            display_name="Erase Concept (ESD)",
            category=CATEGORY,
            description="Erase concepts from the UNet with ESD. The input MODEL is untouched; the output MODEL "
            "carries the edit as patches, and the edit is saved to models/loras/concept_guard/ if named.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input(
                    "concepts",
                    default="",
                    tooltip="Concept(s) to erase, comma-separated; one is sampled per step.",
                ),
                io.Combo.Input(
                    "method",
                    options=[AUTO, *sorted(ESD_METHODS)],
                    default=AUTO,
                    tooltip="auto: by model (esd-x for SD1.x/2.x/SDXL, esd-x-strict on ShapesWorld). esd-x: "
                    "cross-attention (specific, styles/objects); esd-u: all but cross-attention (global "
                    "concepts); esd-x-strict: attn2 to_k/to_v only; esd-selfattn; esd-all.",
                ),
                io.String.Input(
                    "anchor",
                    default="",
                    tooltip="Optional 'erase to' concept; empty pushes away from the concept.",
                ),
                io.Float.Input(
                    "eta",
                    default=0.0,
                    min=0.0,
                    max=20.0,
                    step=0.1,
                    tooltip="Negative guidance (concept-anchored form: 2.0 equals the paper's 1.0). "
                    f"0 = auto ({_AUTO_HINT['eta']}).",
                ),
                io.Int.Input(
                    "iterations",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip=f"Training steps; 0 = auto ({_AUTO_HINT['iterations']}).",
                ),
                io.Float.Input(
                    "lr",
                    default=0.0,
                    min=0.0,
                    max=1e-2,
                    step=1e-6,
                    round=1e-8,
                    tooltip=f"Learning rate; 0 = auto ({_AUTO_HINT['lr']}).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=False,
                    tooltip="Seeds the x_t samples and the training order. Re-queueing an unchanged graph reuses the "
                    "edit ComfyUI still has cached (running other graphs in between can evict it, then it retrains).",
                ),
                *edit_file_inputs(),
                io.Float.Input(
                    "guidance",
                    default=0.0,
                    min=0.0,
                    max=30.0,
                    step=0.5,
                    optional=True,
                    tooltip=f"CFG scale used to sample the x_t the edit trains on; 0 = auto ({_AUTO_HINT['guidance']}).",
                ),
                io.Int.Input(
                    "sampling_steps",
                    default=0,
                    min=0,
                    max=1000,
                    optional=True,
                    tooltip=f"DDIM steps of the x_t trajectories; 0 = auto ({_AUTO_HINT['sampling_steps']}).",
                ),
                io.Int.Input(
                    "resolution",
                    default=0,
                    min=0,
                    max=4096,
                    step=8,
                    optional=True,
                    tooltip="Image side (px, latent = px/8) of the x_t trajectories; 0 = the model's native "
                    "size (512 for SD1.x/2.x, 1024 for SDXL).",
                ),
                io.Boolean.Input(
                    "low_memory",
                    default=True,
                    optional=True,
                    tooltip="Gradient checkpointing: recompute UNet blocks in backward (~1 extra forward "
                    "per step) to keep peak memory near the model's own size. Models under 256 MiB train without it.",
                ),
                io.String.Input(
                    "erase_from",
                    default="",
                    optional=True,
                    tooltip="Prompts to erase the concept from, comma-separated (e.g. 'a red circle, a blue "
                    "circle'); empty = the concepts themselves (on ShapesWorld: the concept in every colour).",
                ),
                io.Combo.Input(
                    "adversarial",
                    options=list(_ADVERSARIAL),
                    default=AUTO,
                    optional=True,
                    tooltip="Train against an attacker: every few steps, token vectors are learned that bring "
                    "the concept back on the edited model, and the edit learns to erase those too (2-5x slower; "
                    "on ShapesWorld it lowers what concept inversion brings back from ~1.0 to ~0.65, at some cost "
                    "to similar concepts: see the README). auto = off.",
                ),
                io.String.Input(
                    "preserve",
                    default="",
                    optional=True,
                    tooltip="Prompts whose images must not change, comma-separated (e.g. 'a square, a star'); "
                    "empty = none (on ShapesWorld: every other shape in every colour).",
                ),
                io.Int.Input(
                    "previews",
                    default=4,
                    min=0,
                    max=50,
                    optional=True,
                    tooltip="Samples of the first concept shown on the node while it trains, evenly spaced (each "
                    "costs one 10-step sample); 0 = none.",
                ),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="Decodes the previews at full size; without it they are ComfyUI's latent previews.",
                ),
            ],
            outputs=edit_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, concepts: str = "", adversarial: str = AUTO) -> bool | str:
        # Only the inputs checked here are named: ComfyUI skips its own min/max/combo checks for every input
        # this signature names, and for all of them if it takes **kwargs. (ComfyUI 0.3.64 checks no V3 combo
        # value at queue time, so the combo is checked here.)
        if isinstance(concepts, str) and not parse_concepts(concepts):
            return "`concepts` is empty: name at least one concept to erase, e.g. 'circle'."
        return choice_problem("adversarial", adversarial, _ADVERSARIAL) or True

    @classmethod
    def execute(
        cls,
        model,
        clip,
        concepts: str,
        method: str,
        anchor: str,
        eta: float,
        iterations: int,
        lr: float,
        seed: int,
        file_name: str,
        overwrite: bool = False,
        guidance: float = 0.0,
        sampling_steps: int = 0,
        resolution: int = 0,
        low_memory: bool = True,
        erase_from: str = "",
        preserve: str = "",
        adversarial: str = AUTO,
        previews: int = 4,
        vae=None,
    ) -> io.NodeOutput:
        path = edit_output_path(file_name, overwrite=overwrite)
        backend = ComfyBackend(model, clip, vae)
        given = dict(method=method, eta=eta, iterations=iterations, lr=lr, guidance=guidance)
        given |= dict(sampling_steps=sampling_steps, erase_from=erase_from, preserve=preserve)
        given = {k: None if v in (0, AUTO) else v for k, v in given.items()}
        settings = esd_settings(backend, concepts, given | {"adv_steps": adversarial_steps(adversarial)})
        cfg = ESDConfig(
            **settings, anchor=anchor or None, seed=seed, latent_size=resolution // 8 if resolution else None
        )
        with backend.training(checkpointing=low_memory and worth_checkpointing(model.model.diffusion_model)):
            node_id = cls.hidden.unique_id if cls.hidden is not None else None  # None outside a graph
            preview = TrainingPreview(
                backend, cfg.concepts[0], count=previews, total=cfg.iterations, latent_size=cfg.latent_size
            )
            on_step = progress_callback(cfg.iterations, node_id, preview)
            on_phase = phase_callback(node_id)
            result = train(cfg, backend, on_step=on_step, on_phase=on_phase)
            if not result.tensors:
                raise ConceptGuardError("ESD produced no deltas; nothing was applied or written.")
            # The MODEL gets exactly what the file holds (fp16 deltas), so applying the file reproduces it.
            deltas = {k: v.to(EDIT_DTYPE) for k, v in result.tensors.items()}
            on_phase("scoring the edit")
            scores = score_edit(backend, deltas, cfg.concepts, cfg.preserve[:3], latent_size=cfg.latent_size)
        result.metadata["concept_guard.concept_score"] = score_metadata(*scores)
        on_phase(f"done · final loss {result.final_loss:.3g}")
        edited = make_patched_model(model, deltas, 1.0)
        if path is not None:
            save_edit(deltas, path, result.metadata, dtype=EDIT_DTYPE, overwrite=overwrite)
        report = "\n".join(
            [
                describe(backend, settings, _REPORTED),
                f"final loss {result.final_loss:.4g}",
                score_report(*scores),
            ]
            + ([f"saved {path}"] if path else [])
        )
        return io.NodeOutput(edited, str(path) if path else "", report)
