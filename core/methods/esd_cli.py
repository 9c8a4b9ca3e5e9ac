"""``concept-guard erase``: ESD for diffusers users (a pipeline folder, a checkpoint file, or ``shapesworld``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..errors import ConceptGuardError, OutputPathError
from ..files import check_destination
from ..targets import ESD_METHODS
from .esd import ESDConfig, train

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    d = ESDConfig(concepts=("x",))
    p = sub.add_parser(
        "erase",
        help="erase a concept from a model's UNet with ESD and write the edit file",
        description="Erase concepts with ESD (Gandikota et al. 2023). Writes the edit as a ComfyUI-loadable "
        "'diffusion_model.<module>.diff' safetensors file (LoraLoaderModelOnly applies it).",
    )
    p.add_argument("--model", required=True, help="diffusers pipeline folder, .safetensors/.ckpt checkpoint, or 'shapesworld'")
    p.add_argument("--tokenizer", default=None, help="single-file checkpoints only: a folder with the CLIP tokenizer files")
    p.add_argument("--concept", required=True, help="concept(s) to erase; comma-separated for several")
    p.add_argument("--anchor", default=None, help="'erase to' concept (default: none, push away from the concept)")
    p.add_argument("--method", default=d.method, choices=sorted(ESD_METHODS))
    p.add_argument("--eta", type=float, default=d.eta, help=f"negative guidance, concept-anchored form (default {d.eta})")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--guidance", type=float, default=d.guidance, help="CFG scale used to sample x_t")
    p.add_argument("--sampling-steps", type=int, default=d.sampling_steps, help="DDIM steps of the x_t trajectories")
    p.add_argument("--bank", type=int, default=d.bank_trajectories, help="trajectories per concept in the x_t bank")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cuda, cpu, … (default: cuda if available)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help='print {"out", "seconds", "iterations", "final_loss"} as JSON')
    p.set_defaults(func=run)


def _check_out(path: Path, overwrite: bool) -> Path:
    if path.suffix != ".safetensors":
        raise OutputPathError(f"`--out` must end in .safetensors, got {str(path)!r}.")
    return check_destination(path, overwrite=overwrite)


def run(args: argparse.Namespace) -> int:
    from ..backends.diffusers_backend import DiffusersBackend
    from ..edits import save_edit

    out = _check_out(Path(args.out), args.overwrite)  # fail before any expensive work
    cfg = ESDConfig(
        concepts=args.concept, method=args.method, anchor=args.anchor, eta=args.eta, iterations=args.iterations,
        lr=args.lr, guidance=args.guidance, sampling_steps=args.sampling_steps, bank_trajectories=args.bank,
        batch_size=args.batch_size, seed=args.seed,
    )
    start = time.perf_counter()
    import torch
    from tqdm.auto import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = DiffusersBackend.load(args.model, device=device, tokenizer=args.tokenizer)

    bar = tqdm(total=cfg.iterations, desc="ESD", disable=args.json or not sys.stderr.isatty())

    def on_step(step: int, total: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")

    try:
        result = train(cfg, backend, on_step=on_step)
    finally:
        bar.close()
    if not result.tensors:
        raise ConceptGuardError("Training produced no deltas; nothing was written.")
    save_edit(result.tensors, out, result.metadata, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    summary = {"out": str(out), "seconds": round(seconds, 3), "iterations": result.iterations,
               "final_loss": result.final_loss}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {out}  ({result.iterations} iterations, final loss {result.final_loss:.4g}, {seconds:.1f}s)")
    return 0
