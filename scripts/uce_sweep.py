"""Closed-form settings on ShapesWorld for docs/results.md ("Settings tried"): erase "circle" with the auto settings
plus each override, then judge the held-out paraphrases and the GRID prompts of the other shapes.

    .venv/bin/python scripts/uce_sweep.py SAMPLES '{}' '{"erase_scale": 3}' '{"eta": 1}' ...

Prints per setting: the paraphrases' circle rates (mean / worst), and the worst other-shape and colour rate over
the GRID prompts without a circle (one prompt at a time, seeds 0 + index as `concept-guard eval`).
"""

import json
import sys

import torch
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.uce import UCEConfig, train
from concept_guard.presets import uce_settings
from concept_guard.shapesworld import load_shapesworld, world
from concept_guard.shapesworld.attack import paraphrases
from concept_guard.shapesworld.evaluate import EvalConfig, evaluate
from concept_guard.shapesworld.recipes import GRID


def main() -> None:
    torch.set_num_threads(2)
    backend = load_shapesworld()
    ev = EvalConfig(samples=int(sys.argv[1]))
    grid = [g for g in GRID if "circle" not in g]
    for line in sys.argv[2:]:
        overrides = json.loads(line)
        result = train(UCEConfig(**uce_settings(backend, "circle", overrides)), backend)
        with attach_edit(backend, result.tensors):
            held = [
                e["rates"]["shape"]["circle"] for e in evaluate(backend, paraphrases("circle"), ev)["prompts"]
            ]
            kept = evaluate(backend, grid, ev)["prompts"]
        worst = {"shape": 1.0, "colour": 1.0}
        for e in kept:
            named = world.parse_prompt(e["prompt"])
            for head in worst:
                worst[head] = min(worst[head], e["rates"][head][named[head]])
        print(
            f"{line}: paraphrases mean {sum(held) / len(held):.2f} worst {max(held):.2f} | worst other shape "
            f"{worst['shape']:.2f}, worst colour {worst['colour']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
