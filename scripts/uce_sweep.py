"""Closed-form settings on ShapesWorld for docs/results.md ("Settings tried"): erase "circle" with the auto settings
plus each override, then judge what no setting was chosen on.

    .venv/bin/python scripts/uce_sweep.py SAMPLES '{}' '{"eta": 0}' '{"captions": [0, 0], "eta": 0}' ...

An override is a JSON object of ``UCEConfig`` fields, plus ``"captions": [erased, preserved]``: how many of the
model's own captions the recipe adds (auto: 100 and 200; ``[0, 0]`` = the ESD recipe's prompts alone).

Prints per setting: circle rates on "a filled blue circle" (a tuned prompt), on the held-out paraphrases and on
the held-out captions (mean / worst), and the worst other-shape and colour rate over the GRID prompts without a
circle (one prompt at a time, seeds 0 + index as `concept-guard eval`).
"""

import json
import sys

import torch
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.uce import UCEConfig, train
from concept_guard.presets import uce_settings
from concept_guard.shapesworld import load_shapesworld, recipes, world
from concept_guard.shapesworld.attack import paraphrases
from concept_guard.shapesworld.evaluate import EvalConfig, evaluate
from concept_guard.shapesworld.recipes import GRID, held_out_captions


def _circle_rates(backend, prompts, ev) -> list[float]:
    return [e["rates"]["shape"]["circle"] for e in evaluate(backend, prompts, ev)["prompts"]]


def _settings(backend, overrides: dict) -> dict:
    erase, keep = overrides.pop("captions", (100, 200))
    saved = dict(recipes.CLOSED_FORM_CAPTIONS)
    recipes.CLOSED_FORM_CAPTIONS.update(erase=(erase, 1), preserve=(keep, 2))
    try:
        return uce_settings(backend, "circle", overrides)
    finally:
        recipes.CLOSED_FORM_CAPTIONS.update(saved)


def main() -> None:
    torch.set_num_threads(2)
    backend = load_shapesworld()
    ev = EvalConfig(samples=int(sys.argv[1]))
    grid = [g for g in GRID if "circle" not in g]
    held_captions = list(held_out_captions("circle"))
    for line in sys.argv[2:]:
        result = train(UCEConfig(**_settings(backend, json.loads(line))), backend)
        with attach_edit(backend, result.tensors):
            (filled,) = _circle_rates(backend, ["a filled blue circle"], ev)
            held = _circle_rates(backend, paraphrases("circle"), ev)
            caps = _circle_rates(backend, held_captions, ev)
            kept = evaluate(backend, grid, ev)["prompts"]
        worst = {"shape": 1.0, "colour": 1.0}
        for e in kept:
            named = world.parse_prompt(e["prompt"])
            for head in worst:
                worst[head] = min(worst[head], e["rates"][head][named[head]])
        print(
            f"{line}: filled blue {filled:.2f} | paraphrases mean {sum(held) / len(held):.2f} worst "
            f"{max(held):.2f} | captions mean {sum(caps) / len(caps):.2f} worst {max(caps):.2f} | worst other "
            f"shape {worst['shape']:.2f}, worst colour {worst['colour']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
