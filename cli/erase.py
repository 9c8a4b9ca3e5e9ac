"""``concept-guard erase``: ESD for diffusers users (a pipeline folder, a checkpoint file, or ``shapesworld``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..core.errors import ConceptGuardError
from ..core.methods.esd import ESDConfig, train
from ..core.targets import ESD_METHODS
from ..core.trainer import TrainResult
from ._run import check_out, run_training

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    d = ESDConfig(concepts=("x",))
    p = sub.add_parser(
        "erase",
        help="erase a concept from a model's UNet with ESD and write the edit file",
        description="Erase concepts with ESD (Gandikota et al. 2023). Writes the edit as a ComfyUI-loadable "
        "'diffusion_model.<module>.diff' safetensors file (LoraLoaderModelOnly applies it).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="diffusers pipeline folder, .safetensors/.ckpt checkpoint, or 'shapesworld'",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="single-file checkpoints only: a folder with the CLIP tokenizer files",
    )
    p.add_argument("--concept", required=True, help="concept(s) to erase; comma-separated for several")
    p.add_argument(
        "--anchor", default=None, help="'erase to' concept (default: none, push away from the concept)"
    )
    p.add_argument("--method", default=d.method, choices=sorted(ESD_METHODS))
    p.add_argument(
        "--eta", type=float, default=d.eta, help=f"negative guidance, concept-anchored form (default {d.eta})"
    )
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--guidance", type=float, default=d.guidance, help="CFG scale used to sample x_t")
    p.add_argument(
        "--sampling-steps", type=int, default=d.sampling_steps, help="DDIM steps of the x_t trajectories"
    )
    p.add_argument(
        "--bank", type=int, default=d.bank_trajectories, help="trajectories per concept in the x_t bank"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cuda, cpu, … (default: cuda if available)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--json", action="store_true", help='print {"out", "seconds", "iterations", "final_loss"} as JSON'
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.edits.diff_file import save_edit

    out = check_out(args.out, args.overwrite)  # fail before any expensive work
    cfg = ESDConfig(
        concepts=args.concept,
        method=args.method,
        anchor=args.anchor,
        eta=args.eta,
        iterations=args.iterations,
        lr=args.lr,
        guidance=args.guidance,
        sampling_steps=args.sampling_steps,
        bank_trajectories=args.bank,
        batch_size=args.batch_size,
        seed=args.seed,
    )

    def save(result: TrainResult) -> Path:
        if not result.tensors:
            raise ConceptGuardError("Training produced no deltas; nothing was written.")
        save_edit(result.tensors, out, result.metadata, overwrite=args.overwrite)
        return out

    return run_training(
        args,
        desc="ESD",
        total=cfg.iterations,
        train=lambda backend, on_step: train(cfg, backend, on_step=on_step),
        save=save,
        summary=lambda r: {"iterations": r.iterations, "final_loss": r.final_loss},
        message=lambda r, out, s: (
            f"wrote {out}  ({r.iterations} iterations, final loss {r.final_loss:.4g}, {s:.1f}s)"
        ),
    )
