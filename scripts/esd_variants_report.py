"""ESD variants on ShapesWorld for docs/results.md: the synonym "disc" under esd-x and
esd-u, and the anchor case circle -> square. Judge shape rates, 16 seeded samples per prompt.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/esd_variants_report.py     # ~6 min on one CPU thread
"""

import json
import time

import torch
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.esd import ESDConfig, train
from concept_guard.shapesworld import load_shapesworld
from concept_guard.shapesworld.evaluate import EvalConfig, evaluate
from concept_guard.shapesworld.recipes import DEMO_ESD, shapesworld_recipe

PROMPTS = [
    "a red disc",
    "a blue disc",
    "a crimson disc",
    "a filled blue circle",
    "an outlined purple circle",
    "a green triangle",
    "a yellow heart",
]
VARIANTS = [
    ("esd-x", {"method": "esd-x"}),
    ("esd-u", {"method": "esd-u", "lr": 1e-4}),
    ("esd-x anchor->square", {"method": "esd-x", "anchor": "a square"}),
]


def shape_rates(report: dict) -> dict:
    return {
        e["prompt"]: {k: v for k, v in e["rates"]["shape"].items() if v >= 0.05} for e in report["prompts"]
    }


def main() -> None:
    torch.set_num_threads(1)
    backend = load_shapesworld()
    cfg = EvalConfig(samples=16, seed=100)
    print("base", json.dumps(shape_rates(evaluate(backend, PROMPTS, cfg))), flush=True)
    for name, extra in VARIANTS:
        start = time.time()
        result = train(ESDConfig(seed=0, **shapesworld_recipe("circle"), **{**DEMO_ESD, **extra}), backend)
        with attach_edit(backend, result.tensors, 1.0):
            report = evaluate(backend, PROMPTS, cfg)
        print(name, f"{time.time() - start:.0f}s", json.dumps(shape_rates(report)), flush=True)


if __name__ == "__main__":
    main()
