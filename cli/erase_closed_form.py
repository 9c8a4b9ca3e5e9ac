"""``concept-guard erase --method uce|rece``: closed-form erasure (see :mod:`concept_guard.core.methods.uce`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..core.methods.uce import UCEConfig, train
from ..core.score import score_edit, score_metadata, score_report
from ..core.trainer import TrainResult
from ..presets import describe, uce_settings
from ._run import check_out, run_training

logger = logging.getLogger(__name__)

#: Flags of the closed-form methods whose default is chosen by model (``None`` = auto).
_AUTO = ("method", "eta", "erase_scale", "lamb", "rounds")


def add_closed_form_args(p: argparse.ArgumentParser) -> None:
    """The settings only ``--method uce|rece`` reads (``--eta`` is shared with ESD)."""
    g = p.add_argument_group("closed-form settings (--method uce|rece; default: chosen by model)")
    g.add_argument("--erase-scale", type=float, default=None, help="weight of the erased prompts")
    g.add_argument(
        "--preserve-scale",
        type=float,
        default=None,
        help="weight of the preserved prompts (default: max(0.1, 1/number of preserved prompts))",
    )
    g.add_argument("--lamb", type=float, default=None, help="how strongly the weights stay where they were")
    g.add_argument("--rounds", type=int, default=None, help="RECE rounds")


def run_closed_form(args: argparse.Namespace) -> int:
    from ..core.edits.diff_file import save_edit

    out = check_out(args.out, args.overwrite)  # fail before any expensive work
    given = {key: getattr(args, key) for key in _AUTO}
    given |= {"erase_from": args.erase_from, "preserve": args.preserve}
    extra = {"anchor": args.anchor or "", "preserve_scale": args.preserve_scale}
    UCEConfig(concepts=args.concept, **extra, **{k: v for k, v in given.items() if v})  # bad values: fail now

    def solve(backend, on_step) -> TrainResult:
        settings = uce_settings(backend, args.concept, given)
        logger.info("closed-form settings for %s", describe(backend, settings, _AUTO))
        cfg = UCEConfig(**settings, **extra)
        result = train(cfg, backend)
        scores = score_edit(backend, result.tensors, cfg.concepts, cfg.preserve[:3])
        result.metadata["concept_guard.concept_score"] = score_metadata(*scores)
        logger.info("%s", score_report(*scores))
        return result

    def save(result: TrainResult) -> Path:
        save_edit(result.tensors, out, result.metadata, overwrite=args.overwrite)
        return out

    return run_training(
        args,
        desc="closed form",
        train=solve,
        save=save,
        summary=lambda r: {
            "solve_seconds": round(r.seconds, 3),
            "residual": r.losses[-1],
            "concept_score": json.loads(r.metadata["concept_guard.concept_score"]),
        },
        message=lambda r, out, s: f"wrote {out}  (solved in {r.seconds:.2f}s, {s:.1f}s in all)",
    )
