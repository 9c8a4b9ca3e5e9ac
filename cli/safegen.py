"""``concept-guard safegen``: vision-only erasure (SafeGen) from a folder of images of the concept.

Settings left out are chosen by model (see :mod:`concept_guard.presets`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..core.errors import ConceptGuardError
from ..core.methods.safegen import MOSAIC_TARGETS, PRESERVE_TARGETS, SafeGenConfig, train
from ..core.trainer import TrainResult
from ..presets import describe, safegen_settings
from ._run import add_model_args, add_output_args, check_out, run_training
from .backdoor_ti import load_images

logger = logging.getLogger(__name__)

#: Flags whose default is chosen by model (``None`` = auto), with the SafeGenConfig field each sets.
_AUTO_FLAGS = {
    "steps": "steps",
    "lr": "lr",
    "batch_size": "batch_size",
    "mosaic_block": "mosaic_block",
    "target": "target",
    "preserve_target": "preserve_target",
    "weight_mosaic": "weight_mosaic",
    "weight_preserve": "weight_preserve",
    "max_timestep": "max_timestep",
    "snr_gamma": "snr_gamma",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "safegen",
        help="teach a model's UNet to censor what images of a concept show (SafeGen), whatever the prompt",
        description="Vision-only erasure (SafeGen, Li et al. 2024): trains the UNet's self-attention (attn1), "
        "with the empty prompt, to turn images of the concept into a mosaic while other images stay as they "
        "were. Writes a ComfyUI-loadable 'diffusion_model.<module>.diff' safetensors file.",
    )
    add_model_args(p)
    p.add_argument("--images", required=True, help="folder of images of the concept to censor")
    p.add_argument(
        "--benign",
        default=None,
        help="folder of images to keep as they are (default: the model's own samples of --benign-prompts)",
    )
    p.add_argument(
        "--benign-prompts",
        default="",
        help="comma-separated prompts whose samples are kept when --benign is not given (default: unconditional)",
    )
    auto = p.add_argument_group("training settings (default: chosen by model)")
    auto.add_argument("--steps", type=int, default=None)
    auto.add_argument("--lr", type=float, default=None)
    auto.add_argument("--batch-size", type=int, default=None)
    auto.add_argument("--mosaic-block", type=int, default=None, help="mosaic cell size in pixels")
    auto.add_argument("--target", default=None, choices=MOSAIC_TARGETS, help="mosaic target (see docs)")
    auto.add_argument("--preserve-target", default=None, choices=PRESERVE_TARGETS)
    auto.add_argument("--weight-mosaic", type=float, default=None)
    auto.add_argument("--weight-preserve", type=float, default=None)
    auto.add_argument("--max-timestep", type=int, default=None, help="train on timesteps below this")
    auto.add_argument(
        "--snr-gamma", type=float, default=None, help="Min-SNR weighting of the mosaic term (0 = off)"
    )
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p, summary='"out", "seconds", "steps", "final_loss"')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.edits.diff_file import save_edit

    out = check_out(args.out, args.overwrite)  # fail before any expensive work
    given = {field: getattr(args, flag) for flag, field in _AUTO_FLAGS.items()}
    extra = {"benign_prompts": args.benign_prompts, "resolution": args.resolution, "seed": args.seed}
    SafeGenConfig(**extra, **{k: v for k, v in given.items() if v is not None})  # bad values: fail now
    images = load_images(args.images)
    benign = load_images(args.benign) if args.benign else None

    def train_edit(backend, on_step) -> TrainResult:
        settings = safegen_settings(backend, given)
        logger.info("SafeGen settings for %s", describe(backend, settings, tuple(_AUTO_FLAGS.values())))
        return train(
            SafeGenConfig(**settings, **extra), backend, images, benign_images=benign, on_step=on_step
        )

    def save(result: TrainResult) -> Path:
        if not result.tensors:
            raise ConceptGuardError("Training produced no deltas; nothing was written.")
        save_edit(result.tensors, out, result.metadata, overwrite=args.overwrite)
        return out

    return run_training(
        args,
        desc="SafeGen",
        train=train_edit,
        save=save,
        summary=lambda r: {"steps": r.iterations, "final_loss": r.final_loss},
        message=lambda r, out, s: (
            f"wrote {out}  ({r.iterations} steps, final loss {r.final_loss:.4g}, {s:.1f}s)"
        ),
    )
