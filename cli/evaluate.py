"""``concept-guard eval``: judge rates of a model on a prompt set, as a table, JSON, and a PNG grid."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

import torch

from ..core.errors import OutputPathError
from ..core.grid import labelled_grid
from ._run import load_backend

logger = logging.getLogger(__name__)

GRID_COLUMNS = 8


def _cell(rates: dict, head: str, named: str | None) -> str:
    table = rates[head]
    if named:
        return f"{named} {table[named]:.2f}"
    top = max(table, key=table.get)
    return f"~{top} {table[top]:.2f}"


def format_table(report: dict) -> str:
    """A fixed-width table: per prompt the rate of each named label (``~label`` = top label, not named)."""
    from ..shapesworld import world

    heads = tuple(world.LABELS)
    width = max(len(e["prompt"]) for e in report["prompts"]) + 2
    lines = [f"{'prompt':<{width}}" + "".join(f"{h:<18}" for h in heads) + "target"]
    for e in report["prompts"]:
        named = world.parse_prompt(e["prompt"])
        cells = "".join(
            f"{_cell(e['rates'], h, named.get(h) if isinstance(named.get(h), str) else None):<18}"
            for h in heads
        )
        lines.append(f"{e['prompt']:<{width}}{cells}{e['rates']['target']:.2f}")
    s = report["summary"]
    lines.append("")
    lines.append("summary: " + ", ".join(f"{k}={v}" for k, v in s.items() if v is not None))
    return "\n".join(lines)


def write_grid(path: Path, prompts: list[str], images: list[torch.Tensor]) -> Path:
    """A PNG with one row per prompt (its text on the left) and up to 8 samples per row."""
    labelled_grid(prompts, ["samples"], [[x[:GRID_COLUMNS]] for x in images], tile=64).save(path)
    return path


def _run(args: argparse.Namespace) -> int:
    from ..shapesworld.evaluate import EvalConfig, evaluate, preservation, resolve_prompts
    from ..shapesworld.judge import load_judge

    prompts = resolve_prompts(args.prompts, args.prompt_set)
    cfg = EvalConfig(samples=args.samples, seed=args.seed, steps=args.steps, guidance=args.guidance)
    grid = Path(args.grid) if args.grid else None
    if grid is not None and (grid.suffix.lower() != ".png" or not grid.parent.is_dir()):
        raise OutputPathError(f"`--grid` must be a .png path in an existing folder, got {args.grid!r}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = load_backend(args.model, device=args.device)
    if args.embedding:
        from ..core.embeddings import add_embedding

        for path in args.embedding:
            add_embedding(backend, path)
    judge = load_judge(args.judge)
    unrelated = resolve_prompts(args.preserve, None) if args.preserve else None
    base = None
    if args.edit and unrelated:  # the base model on the unrelated prompts, same seeds: the preservation table
        base = evaluate(backend, unrelated, cfg, judge=judge, model_name=str(args.model))
    with contextlib.ExitStack() as stack:
        if args.edit:
            from ..core.edits.diff_file import attach_edit
            from ..core.edits.read import read_edit_file
            from ..core.edits.target import TargetUNet

            loaded = read_edit_file(args.edit, TargetUNet.from_backend(backend))
            logger.info("applying %s (%s) at strength %s", args.edit, loaded.source_format, args.strength)
            stack.enter_context(attach_edit(backend, loaded.deltas, args.strength))
        if base is not None:
            edited = evaluate(backend, unrelated, cfg, judge=judge, model_name=str(args.model))
        report = evaluate(
            backend,
            prompts,
            cfg,
            judge=judge,
            model_name=str(args.model),
            edit=args.edit,
            embedding=", ".join(args.embedding) if args.embedding else None,
            keep_images=grid is not None,
        )
    images = report.pop("_images", None)
    if grid is not None:
        write_grid(grid, prompts, images)
        logger.info("wrote grid %s", grid)
    if base is not None:
        report["preservation"] = preservation(edited, base)
    print(json.dumps(report) if args.json else format_table(report))
    if base is not None and not args.json:
        print("\npreservation (prompts unrelated to the edit; rate of each named label, base -> edited):")
        for row in report["preservation"]:
            print(
                f"  {row['prompt']:<40} {row['head']:<10} {row['label']:<10} {row['base']:.2f} -> {row['now']:.2f}"
                f"  ({row['change']:+.2f})"
            )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command."""
    from ..shapesworld.evaluate import PROMPT_SETS

    p = subparsers.add_parser(
        "eval",
        help="sample a model on prompts and report ShapesWorld judge rates",
        description="Sample N seeded images per prompt (DDIM + CFG) and report the fraction the judge gives each "
        "shape/colour/background/style label, and the target-pattern rate. --json prints one JSON object.",
    )
    p.add_argument(
        "--model", default="shapesworld", help="'shapesworld' (default), a pipeline folder or a checkpoint"
    )
    p.add_argument("--prompts", nargs="+", metavar="PROMPT", help="prompts to evaluate")
    p.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), help="a standard prompt set")
    p.add_argument("--samples", type=int, default=32, help="samples per prompt (default 32)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED+i (default 0)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5)")
    p.add_argument(
        "--edit", default=None, help="a weight edit to apply first (any format `concept-guard apply` reads)"
    )
    p.add_argument(
        "--preserve",
        nargs="+",
        metavar="PROMPT",
        default=None,
        help="with --edit: prompts unrelated to the edit, judged with and without it (preservation table)",
    )
    p.add_argument("--strength", type=float, default=1.0, help="strength of --edit (default 1)")
    p.add_argument(
        "--embedding",
        action="append",
        default=None,
        metavar="FILE",
        help="textual-inversion file usable in prompts as embedding:NAME (NAME = file stem); repeatable",
    )
    p.add_argument("--grid", help="write a labelled PNG grid (one row per prompt) to this file")
    p.add_argument("--judge", default=None, help="judge file (default: the committed ShapesWorld judge)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_run)
