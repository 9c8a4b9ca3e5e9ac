"""``concept-guard erase``: ESD for diffusers users (a pipeline folder, a checkpoint file, or ``shapesworld``).

Settings left out are chosen by model (see :mod:`concept_guard.presets`): the official scripts' values for
SD1.x/2.x/SDXL, the measured recipe on the bundled ShapesWorld model.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..core.errors import ConceptGuardError
from ..core.methods.esd import ESDConfig, train
from ..core.methods.uce import CLOSED_FORM_METHODS
from ..core.score import score_edit, score_metadata, score_report
from ..core.targets import ESD_METHODS
from ..core.trainer import TrainResult
from ..presets import adversarial_steps, describe, esd_settings
from ._run import add_model_args, add_output_args, check_out, run_training
from .erase_closed_form import add_closed_form_args, run_closed_form

logger = logging.getLogger(__name__)

#: Flags whose default is chosen by model (``None`` = auto), with the ESDConfig field each sets.
_AUTO_FLAGS = {
    "method": "method",
    "eta": "eta",
    "iterations": "iterations",
    "lr": "lr",
    "guidance": "guidance",
    "sampling_steps": "sampling_steps",
    "bank": "bank_trajectories",
    "batch_size": "batch_size",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "erase",
        help="erase a concept from a model's UNet with ESD and write the edit file",
        description="Erase concepts with ESD (Gandikota et al. 2023). Writes the edit as a ComfyUI-loadable "
        "'diffusion_model.<module>.diff' safetensors file (LoraLoaderModelOnly applies it). Settings not given "
        "are chosen by model: the official scripts' values for SD1.x/2.x/SDXL, the measured recipe on "
        "'shapesworld'.",
    )
    add_model_args(p)
    p.add_argument("--concept", required=True, help="concept(s) to erase; comma-separated for several")
    p.add_argument(
        "--anchor", default=None, help="'erase to' concept (default: none, push away from the concept)"
    )
    p.add_argument(
        "--erase-from",
        default="",
        help="comma-separated prompts to erase the concept from (default: the concepts)",
    )
    p.add_argument(
        "--preserve", default="", help="comma-separated prompts whose images must not change (default: none)"
    )
    auto = p.add_argument_group("training settings (default: chosen by model)")
    auto.add_argument(
        "--method",
        default=None,
        choices=[*sorted(ESD_METHODS), *CLOSED_FORM_METHODS],
        help="an ESD variant (trains), or uce/rece: closed-form erasure in seconds (no training)",
    )
    auto.add_argument("--eta", type=float, default=None, help="negative guidance, concept-anchored form")
    auto.add_argument("--iterations", type=int, default=None)
    auto.add_argument("--lr", type=float, default=None)
    auto.add_argument("--guidance", type=float, default=None, help="CFG scale used to sample x_t")
    auto.add_argument("--sampling-steps", type=int, default=None, help="DDIM steps of the x_t trajectories")
    auto.add_argument("--bank", type=int, default=None, help="trajectories per concept in the x_t bank")
    auto.add_argument("--batch-size", type=int, default=None)
    auto.add_argument(
        "--adversarial",
        default=None,
        choices=["on", "off"],
        help="train against a token-vector attacker that brings the concept back (slower; default off)",
    )
    add_closed_form_args(p)
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p, summary='"out", "seconds", "iterations", "final_loss"')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.edits.diff_file import save_edit

    if args.method in CLOSED_FORM_METHODS:
        return run_closed_form(args)
    out = check_out(args.out, args.overwrite)  # fail before any expensive work
    given = {field: getattr(args, flag) for flag, field in _AUTO_FLAGS.items()}
    given |= {"erase_from": args.erase_from, "preserve": args.preserve}
    given["adv_steps"] = adversarial_steps(args.adversarial)
    extra = {"anchor": args.anchor, "seed": args.seed}
    ESDConfig(concepts=args.concept, **extra, **{k: v for k, v in given.items() if v})  # bad values: fail now

    def train_edit(backend, on_step) -> TrainResult:
        settings = esd_settings(backend, args.concept, given)
        logger.info("ESD settings for %s", describe(backend, settings, (*_AUTO_FLAGS.values(), "adv_steps")))
        cfg = ESDConfig(**settings, **extra)
        result = train(cfg, backend, on_step=on_step)
        if result.tensors:
            scores = score_edit(backend, result.tensors, cfg.concepts, cfg.preserve[:3])
            result.metadata["concept_guard.concept_score"] = score_metadata(*scores)
            logger.info("%s", score_report(*scores))
        return result

    def save(result: TrainResult) -> Path:
        if not result.tensors:
            raise ConceptGuardError("Training produced no deltas; nothing was written.")
        save_edit(result.tensors, out, result.metadata, overwrite=args.overwrite)
        return out

    return run_training(
        args,
        desc="ESD",
        train=train_edit,
        save=save,
        summary=lambda r: {
            "iterations": r.iterations,
            "final_loss": r.final_loss,
            "concept_score": json.loads(r.metadata["concept_guard.concept_score"]),
        },
        message=lambda r, out, s: (
            f"wrote {out}  ({r.iterations} iterations, final loss {r.final_loss:.4g}, {s:.1f}s)"
        ),
    )
