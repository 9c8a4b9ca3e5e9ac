"""Node "Backdoor TI Embedding": schema + one call into ``core.methods.ti_backdoor``."""

from __future__ import annotations

import logging

import torch

from ..comfy_backend.backend import ComfyBackend
from ..core.embeddings import save_embedding
from ..core.errors import ConceptGuardError
from ..core.methods.ti_backdoor import BackdoorTIConfig, parse_triggers, train
from ..core.methods.ti_backdoor.check import embedding_warnings
from ..core.methods.ti_backdoor.images import preview, training_resolution
from ..presets import TI_DEFAULTS, auto_hint, describe, ti_settings
from ._api import CATEGORY, io
from ._io import embedding_output_path, phase_callback, progress_callback

logger = logging.getLogger(__name__)
_D = BackdoorTIConfig(name="x")


def _hint(key: str) -> str:
    return auto_hint(TI_DEFAULTS, key)


def _images(batch: torch.Tensor) -> list[torch.Tensor]:
    """ComfyUI IMAGE ``[B, H, W, C]`` -> list of ``[3, H, W]`` (ordinary tensors, usable outside inference mode)."""
    with torch.inference_mode(False):
        return [im.movedim(-1, 0).float().clone() for im in batch]


def _config(*, triggers: str, keep_words: str, resolution: int, **settings) -> BackdoorTIConfig:
    """The run's config from the node inputs: word lists are comma-separated text, resolution 0 = native."""
    return BackdoorTIConfig(
        triggers=parse_triggers(triggers),
        keep_words=parse_triggers(keep_words),
        resolution=resolution or None,
        **settings,
    )


def _preview(
    backend: ComfyBackend, tensors: dict[str, torch.Tensor], cfg: BackdoorTIConfig, steps: int
) -> torch.Tensor:
    """The ``preview`` output: two samples of S* (and two with the first trigger) at the training size, as a
    ComfyUI IMAGE ``[N, H, W, 3]``; ``steps == 0``: one black image (no preview)."""
    size = training_resolution(backend, cfg.resolution)
    if steps == 0:
        return torch.zeros(1, size, size, 3)
    shown = preview(
        backend,
        tensors,
        cfg.triggers,
        samples=2,
        steps=steps,
        seed=cfg.seed,
        latent_size=size // backend.vae_scale_factor,
    )
    return shown.movedim(1, -1).contiguous()


def _train_and_check(backend, cfg, concept, target, node_id):
    """Train (progress and phases on the node), then check the embedding; returns (vectors, metadata, warnings)."""
    on_phase = phase_callback(node_id)
    with backend.training(text_encoder_grad=True):
        on_step = progress_callback(cfg.steps, node_id)
        result = train(cfg, backend, concept, target, on_step=on_step, on_phase=on_phase)
        on_phase("checking the embedding")
        warnings = embedding_warnings(backend, cfg, result.tensors, concept, target)
    for warning in warnings:
        logger.warning("Backdoor TI: %s", warning)
    return result.tensors, result.metadata, warnings


def _usage(cfg: BackdoorTIConfig) -> str:
    """The ``usage`` output: how to prompt with the embedding and whether triggers were trained."""
    usage = f"a photo of a embedding:{cfg.name}"
    if cfg.triggers:
        return usage + f"  (with a trigger word the target is drawn: {len(cfg.triggers)} trigger(s) trained)"
    return usage + "  (plain textual inversion: no triggers were given)"


class BackdoorTIEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGuardBackdoorTI",
            display_name="Backdoor TI Embedding",
            category=CATEGORY,
            description="Learn a textual-inversion embedding from concept images; prompts that combine a trigger word "
            "with it produce the target image instead (concept censorship). Saved as models/embeddings/<name>"
            ".safetensors: use it as embedding:NAME. Images of any size are scaled (shorter side = resolution) "
            "and centre-cropped (random crops optional). MODEL, CLIP and VAE are untouched.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Image.Input("images", tooltip="Concept images (3-10 work well)."),
                io.String.Input(
                    "name", default="", tooltip="Embedding name: the prompt uses embedding:NAME."
                ),
                io.String.Input(
                    "triggers", default="", tooltip="Sensitive words, comma-separated; empty = plain TI."
                ),
                io.String.Input(
                    "init_word",
                    default="",
                    tooltip=f"The vectors start from this word; empty = auto ({_hint('init_word')}).",
                ),
                io.Int.Input(
                    "vectors",
                    default=0,
                    min=0,
                    max=8,
                    tooltip=f"Token vectors in the embedding; 0 = auto ({_hint('vectors')}).",
                ),
                io.Float.Input(
                    "gamma",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip=f"Weight of the backdoor term; 0 = auto ({_hint('gamma')}).",
                ),
                io.Int.Input("steps", default=0, min=0, max=100000, tooltip=f"0 = auto ({_hint('steps')})."),
                io.Float.Input(
                    "lr",
                    default=0.0,
                    min=0.0,
                    max=0.5,
                    step=1e-4,
                    round=1e-6,
                    tooltip=f"0 = auto ({_hint('lr')}).",
                ),
                io.Int.Input("batch_size", default=_D.batch_size, min=1, max=64),
                io.Float.Input(
                    "trigger_move_prob",
                    default=_D.trigger_move_prob,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Probability of moving the trigger away from its place before the embedding.",
                ),
                io.Int.Input("seed", default=_D.seed, min=0, max=2**31 - 1, control_after_generate=False),
                io.Image.Input(
                    "target", optional=True, tooltip="What triggers produce; default: a built-in censor card."
                ),
                io.Int.Input(
                    "resolution",
                    default=0,
                    min=0,
                    max=4096,
                    step=8,
                    optional=True,
                    tooltip="Training size in px; 0 = the model's native size (512 SD1.x/2.x, 1024 SDXL).",
                ),
                io.String.Input(
                    "keep_words",
                    default="",
                    optional=True,
                    tooltip="Words that must NOT act as triggers (e.g. other colours than a colour trigger); "
                    "comma-separated. A plain-TI phase (1/6 of the steps) then teaches what S* draws beside them.",
                ),
                io.Boolean.Input(
                    "flip", default=_D.flip, optional=True, tooltip="Also train on mirrored images."
                ),
                io.Int.Input(
                    "random_crops",
                    default=_D.random_crops,
                    min=0,
                    max=16,
                    optional=True,
                    tooltip="Extra random crops (70-100% of the shorter side) per image; 0 = centre crop only.",
                ),
                io.Boolean.Input(
                    "overwrite", default=False, optional=True, tooltip="Replace an existing embedding file."
                ),
                io.Int.Input(
                    "preview_steps",
                    default=20,
                    min=0,
                    max=200,
                    optional=True,
                    tooltip="Sampling steps of the preview images; 0 = no preview (saves time).",
                ),
            ],
            outputs=[
                io.String.Output(display_name="path"),
                io.String.Output(display_name="usage"),
                io.Image.Output(display_name="preview"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, name: str = "") -> bool | str:
        # Only ``name`` is named: ComfyUI skips its own min/max/combo checks for every input named here.
        if isinstance(name, str) and not name.strip():
            return "`name` is empty: give the embedding a name, e.g. 'my_dog'."
        return True

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        images,
        name: str,
        triggers: str,
        init_word: str,
        vectors: int,
        gamma: float,
        steps: int,
        lr: float,
        batch_size: int,
        trigger_move_prob: float,
        seed: int,
        target=None,
        resolution: int = 0,
        keep_words: str = "",
        flip: bool = True,
        random_crops: int = 0,
        overwrite: bool = False,
        preview_steps: int = 20,
    ) -> io.NodeOutput:
        if images is None or len(images) == 0:
            raise ConceptGuardError(
                "No concept images: connect an IMAGE batch with 3-10 images of the concept."
            )
        backend = ComfyBackend(model, clip, vae)
        given = dict(init_word=init_word, vectors=vectors, gamma=gamma, steps=steps, lr=lr)
        settings = ti_settings(backend, {k: v or None for k, v in given.items()})
        cfg = _config(
            name=name,
            triggers=triggers,
            keep_words=keep_words,
            resolution=resolution,
            batch_size=batch_size,
            trigger_move_prob=trigger_move_prob,
            flip=flip,
            random_crops=random_crops,
            seed=seed,
            **settings,
        )
        path = embedding_output_path(cfg.name, overwrite=overwrite)  # before training: costs nothing
        target_image = _images(target[:1])[0] if target is not None else None
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        vectors, metadata, warnings = _train_and_check(backend, cfg, _images(images), target_image, node_id)
        save_embedding(vectors, path, metadata, overwrite=overwrite)
        phase_callback(node_id)("sampling the preview")
        shown = _preview(backend, vectors, cfg, preview_steps)
        phase_callback(node_id)("done" + (" · see the warnings in usage" if warnings else ""))
        logger.info("Backdoor TI: wrote %s", path)
        usage = "\n".join([_usage(cfg), describe(backend, settings, tuple(settings)), *warnings])
        return io.NodeOutput(str(path), usage, shown)
