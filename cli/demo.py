"""``concept-guard demo``: erase a concept from ShapesWorld with ESD and show it worked.

Runs end to end on the committed ShapesWorld model on CPU: judge the base model on prompts that
name the concept and on unrelated prompts, train ESD, write the edit file, judge the edited model
with the same seeds, and write a before/after PNG grid plus the judge's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from ..core.errors import OutputPathError
from ..presets import esd_settings
from ..shapesworld import load_shapesworld, world
from ..shapesworld.recipes import DEMO_ESD, ERASED_PROMPTS, KEPT_PROMPTS

logger = logging.getLogger(__name__)


def _named_rate(entry: dict, head: str, label: str) -> float:
    return float(entry["rates"][head][label])


def comparison_rows(before: dict, after: dict) -> list[dict]:
    """Per prompt: the judge's rate of the shape the prompt names, before and after the edit."""
    rows = []
    for b, a in zip(before["prompts"], after["prompts"], strict=True):
        shape = world.parse_prompt(b["prompt"]).get("shape")
        rows.append(
            {
                "prompt": b["prompt"],
                "shape": shape,
                "before": _named_rate(b, "shape", shape),
                "after": _named_rate(a, "shape", shape),
            }
        )
    return rows


def run_demo(
    out: Path, *, concept: str = "circle", samples: int = 16, seed: int = 0, iterations: int | None = None
) -> dict:
    """Erase ``concept`` from ShapesWorld; write ``no_<concept>.safetensors``, ``before_after.png``, ``report.json``."""
    from ..core.edits.diff_file import attach_edit, save_edit
    from ..core.grid import labelled_grid
    from ..core.methods.esd import ESDConfig, train
    from ..shapesworld.evaluate import EvalConfig, evaluate

    out.mkdir(parents=True, exist_ok=True)
    edit_path = out / f"no_{concept}.safetensors"
    backend = load_shapesworld()
    prompts = [*ERASED_PROMPTS.get(concept, (f"a {concept}",)), *KEPT_PROMPTS]
    cfg = EvalConfig(samples=samples, seed=seed)
    start = time.perf_counter()
    before = evaluate(backend, prompts, cfg, model_name="shapesworld", keep_images=True)
    esd_cfg = ESDConfig(seed=seed, **esd_settings(backend, concept, {"iterations": iterations}))
    result = train(esd_cfg, backend)
    save_edit(result.tensors, edit_path, result.metadata, overwrite=True)
    with attach_edit(backend, result.tensors, 1.0):
        after = evaluate(
            backend, prompts, cfg, model_name="shapesworld", edit=str(edit_path), keep_images=True
        )
    pairs = [[b[:8], a[:8]] for b, a in zip(before.pop("_images"), after.pop("_images"), strict=True)]
    labelled_grid(prompts, ["before", f"after (no {concept})"], pairs, tile=64).save(out / "before_after.png")
    report = {
        "concept": concept,
        "edit": str(edit_path),
        "esd": dataclasses.asdict(esd_cfg),
        "train_seconds": round(result.seconds + result.setup_seconds, 1),
        "final_loss": result.final_loss,
        "total_seconds": round(time.perf_counter() - start, 1),
        "samples_per_prompt": samples,
        "rows": comparison_rows(before, after),
        "before": before,
        "after": after,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=list))
    return report


def format_rows(report: dict) -> str:
    width = max(len(r["prompt"]) for r in report["rows"]) + 2
    lines = [f"{'prompt':<{width}}{'shape':<10}{'before':>8}{'after':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['prompt']:<{width}}{r['shape']:<10}{r['before']:>8.2f}{r['after']:>8.2f}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"`--out` {str(out)!r} is a file; give a folder.")
    report = run_demo(
        out, concept=args.concept, samples=args.samples, seed=args.seed, iterations=args.iterations
    )
    print(
        f"ESD ({report['esd']['method']}) erased {args.concept!r} from ShapesWorld in {report['train_seconds']} s; "
        f"judge rate of the shape each prompt names ({args.samples} seeded samples per prompt):"
    )
    print(format_rows(report))
    print(f"\nwrote {report['edit']}, {out / 'before_after.png'}, {out / 'report.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="erase 'circle' from the bundled ShapesWorld model and show before/after",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default="concept_guard_demo", help="output folder (default ./concept_guard_demo)")
    p.add_argument("--concept", default="circle", help="shape to erase (default circle)")
    p.add_argument("--samples", type=int, default=16, help="seeded samples per prompt (default 16)")
    p.add_argument(
        "--iterations", type=int, default=None, help=f"ESD iterations (default {DEMO_ESD['iterations']})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_run)
