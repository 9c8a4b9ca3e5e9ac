"""Node "Erase Visual Concept (SafeGen)": schema + one call into ``core.methods.safegen``."""

from __future__ import annotations

import torch

from ..comfy_backend.backend import ComfyBackend
from ..comfy_backend.memory import worth_checkpointing
from ..comfy_backend.patches import make_patched_model
from ..core.edits.diff_file import EDIT_DTYPE, save_edit
from ..core.errors import ConceptGuardError
from ..core.methods.safegen import SafeGenConfig, train
from ..presets import SAFEGEN_DEFAULTS, auto_hint, describe, safegen_settings
from ._api import CATEGORY, edit_file_inputs, edit_outputs, io
from ._io import edit_output_path, phase_callback, progress_callback

#: Settings the node reports after a run.
_REPORTED = ("steps", "lr", "batch_size", "mosaic_block", "target", "max_timestep")
_HINT = {key: auto_hint(SAFEGEN_DEFAULTS, key) for key in _REPORTED}


def _images(batch: torch.Tensor | None) -> list[torch.Tensor] | None:
    """ComfyUI IMAGE ``[B, H, W, C]`` -> list of ``[3, H, W]`` (ordinary tensors, usable outside inference mode)."""
    if batch is None:
        return None
    with torch.inference_mode(False):
        return [im.movedim(-1, 0)[:3].float().clone() for im in batch]


def _mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    with torch.inference_mode(False):
        return mask.float().clone()


class EraseVisualConceptSafeGen(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardSafeGen",
            display_name="Erase Visual Concept (SafeGen)",
            category=CATEGORY,
            description="Teach the UNet's self-attention to turn what the images show into a mosaic, whatever "
            "the prompt (SafeGen). The input MODEL is untouched; the output MODEL carries the edit as patches, "
            "and the edit is saved to models/loras/concept_guard/ if named.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="Encodes the empty prompt the edit trains with."),
                io.Vae.Input("vae"),
                io.Image.Input("images", tooltip="Images of the concept to censor (8 or more work well)."),
                io.Image.Input(
                    "benign_images",
                    optional=True,
                    tooltip="Images that must stay as they are; without them, the model's own unconditional "
                    "samples are kept.",
                ),
                io.String.Input(
                    "benign_prompts",
                    default="",
                    optional=True,
                    tooltip="Without benign images: comma-separated prompts whose samples (by the model as it is "
                    "now) must stay as they are; empty = the model's unconditional samples.",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Censor only where the mask is set (one mask, or one per image).",
                ),
                io.Int.Input(
                    "mosaic_block",
                    default=0,
                    min=0,
                    max=512,
                    tooltip=f"Mosaic cell size in pixels; 0 = auto ({_HINT['mosaic_block']}).",
                ),
                io.Int.Input(
                    "steps",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip=f"Training steps; 0 = auto ({_HINT['steps']}).",
                ),
                io.Float.Input(
                    "lr",
                    default=0.0,
                    min=0.0,
                    max=1e-2,
                    step=1e-6,
                    round=1e-8,
                    tooltip=f"Learning rate; 0 = auto ({_HINT['lr']}).",
                ),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False),
                *edit_file_inputs(),
                io.Int.Input(
                    "resolution",
                    default=0,
                    min=0,
                    max=4096,
                    step=8,
                    optional=True,
                    tooltip="Image side (px) the images are resized and centre-cropped to; 0 = the model's native "
                    "size (512 for SD1.x/2.x, 1024 for SDXL).",
                ),
                io.Boolean.Input(
                    "low_memory",
                    default=True,
                    optional=True,
                    tooltip="Gradient checkpointing: recompute UNet blocks in backward to keep peak memory near "
                    "the model's own size. Models under 256 MiB train without it.",
                ),
            ],
            outputs=edit_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        images,
        mosaic_block: int,
        steps: int,
        lr: float,
        seed: int,
        file_name: str,
        benign_images=None,
        benign_prompts: str = "",
        mask=None,
        overwrite: bool = False,
        resolution: int = 0,
        low_memory: bool = True,
    ) -> io.NodeOutput:
        if images is None or len(images) == 0:
            raise ConceptGuardError("No images: connect an IMAGE batch showing the concept to censor.")
        path = edit_output_path(file_name, overwrite=overwrite)
        backend = ComfyBackend(model, clip, vae)
        given = {"mosaic_block": mosaic_block or None, "steps": steps or None, "lr": lr or None}
        settings = safegen_settings(backend, given)
        cfg = SafeGenConfig(
            **settings, seed=seed, resolution=resolution or None, benign_prompts=benign_prompts or ("",)
        )
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        on_step, on_phase = progress_callback(cfg.steps, node_id), phase_callback(node_id)
        with backend.training(checkpointing=low_memory and worth_checkpointing(model.model.diffusion_model)):
            result = train(
                cfg,
                backend,
                _images(images),
                benign_images=_images(benign_images),
                mask=_mask(mask),
                on_step=on_step,
                on_phase=on_phase,
            )
        if not result.tensors:
            raise ConceptGuardError("SafeGen produced no deltas; nothing was applied or written.")
        deltas = {k: v.to(EDIT_DTYPE) for k, v in result.tensors.items()}  # what the file holds
        on_phase(f"done · final loss {result.final_loss:.3g}")
        edited = make_patched_model(model, deltas, 1.0)
        if path is not None:
            save_edit(deltas, path, result.metadata, dtype=EDIT_DTYPE, overwrite=overwrite)
        report = "\n".join(
            [describe(backend, settings, _REPORTED), f"final loss {result.final_loss:.4g}"]
            + ([f"saved {path}"] if path else [])
        )
        return io.NodeOutput(edited, str(path) if path else "", report)
