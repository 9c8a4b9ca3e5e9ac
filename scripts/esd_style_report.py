"""ESD erasing the "outlined" style from ShapesWorld, at several training seeds, for docs/results.md:
the recipe ``shapesworld_recipe("outlined")`` with ``DEMO_ESD_STYLE``; the judge's
P(outlined) on ``OUTLINED_PROMPTS`` (32 samples each, seed 700), its shape rate on the ``GRID`` prompts
that name no outlined style (4 per shape) and its colour rate on all 25 ``GRID`` prompts (32 samples
each, seed 500), before and after. Same prompts and seeds as ``tests/core/test_esd_shapesworld.py``.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/esd_style_report.py --seeds 0 1 2 3   # ~5 min per seed
"""

import argparse
import contextlib
import time

import torch
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.esd import ESDConfig, train
from concept_guard.shapesworld import load_shapesworld, world
from concept_guard.shapesworld.evaluate import EvalConfig, evaluate
from concept_guard.shapesworld.recipes import DEMO_ESD_STYLE, GRID, OUTLINED_PROMPTS, shapesworld_recipe


def measure(backend: DiffusersBackend, deltas: dict | None = None) -> dict[str, float]:
    """``{"outlined": P, "<shape>": P(shape), "<colour>": P(colour)}`` of the base model or with ``deltas``."""
    with attach_edit(backend, deltas, 1.0) if deltas is not None else contextlib.nullcontext():
        styled = evaluate(backend, list(OUTLINED_PROMPTS), EvalConfig(samples=32, seed=700))["prompts"]
        grid = evaluate(backend, list(GRID), EvalConfig(samples=32, seed=500))["prompts"]
    out = {"outlined": sum(e["rates"]["style"]["outlined"] for e in styled) / len(styled)}
    for head, keep in (("shape", lambda p: "outlined" not in p), ("colour", lambda p: True)):
        by: dict[str, list[float]] = {}
        for e in grid:
            if keep(e["prompt"]):
                label = world.parse_prompt(e["prompt"])[head]
                by.setdefault(label, []).append(e["rates"][head][label])
        out |= {label: sum(v) / len(v) for label, v in by.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    backend = load_shapesworld()
    base = measure(backend)
    labels = ["outlined", *world.SHAPES, *world.COLOURS]
    print("| training seed | seconds | " + " | ".join(f"{k} ({base[k]:.2f})" for k in labels) + " |")
    print("|---" * (len(labels) + 2) + "|")
    for seed in args.seeds:
        start = time.time()
        result = train(ESDConfig(seed=seed, **shapesworld_recipe("outlined"), **DEMO_ESD_STYLE), backend)
        after = measure(backend, result.tensors)
        cells = [
            f"{after[k]:.3f}" if k == "outlined" else f"{after[k]:.2f} ({100 * (after[k] - base[k]):+.1f})"
            for k in labels
        ]
        print(f"| {seed} | {time.time() - start:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
