"""Adversarial ESD on ShapesWorld for docs/results.md: erase "circle" with the auto recipe plus
``adversarial on`` (optionally other attack settings), then judge what an attacker gets back (held-out
paraphrases and concept inversion, as ``concept-guard attack``) and what happens to every other shape and
colour (the GRID prompts, 32 samples each, seeds 500 + index, as tests/core/test_esd_shapesworld.py).

    .venv/bin/python scripts/esd_adversarial_report.py --seed 0 [--set adv_retain=0.5 ...] [--threads 2]

Prints one JSON line: settings, training seconds, attack rows, per-shape and per-colour GRID rates.
"""

import argparse
import json
import time

import torch
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.esd import ESDConfig, train
from concept_guard.presets import adversarial_steps, esd_settings
from concept_guard.shapesworld import load_shapesworld, world
from concept_guard.shapesworld.attack import AttackConfig, paraphrases, run_attacks
from concept_guard.shapesworld.evaluate import EvalConfig, evaluate
from concept_guard.shapesworld.recipes import GRID


def grid_levels(backend, edit) -> dict[str, float]:
    """Mean rate of the named shape and colour over the GRID prompts naming it (circle prompts included)."""
    by: dict[str, list[float]] = {}
    with attach_edit(backend, edit):
        for i, prompt in enumerate(GRID):
            rates = evaluate(backend, [prompt], EvalConfig(samples=32, seed=500 + i))["prompts"][0]["rates"]
            for head, label in world.parse_prompt(prompt).items():
                if head in ("shape", "colour") and isinstance(label, str):
                    by.setdefault(label, []).append(rates[head][label])
    return {k: round(sum(v) / len(v), 4) for k, v in by.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adversarial", default="on", choices=["on", "off"])
    p.add_argument("--set", nargs="*", default=[], help="ESDConfig overrides, e.g. adv_retain=0.5")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backend = load_shapesworld()
    overrides = {k: type(getattr(ESDConfig, k))(v) for k, v in (kv.split("=") for kv in args.set)}
    given = {"adv_steps": adversarial_steps(args.adversarial), **overrides}
    cfg = ESDConfig(seed=args.seed, **esd_settings(backend, "circle", given))
    start = time.time()
    result = train(cfg, backend)
    seconds = round(time.time() - start, 1)
    attack = AttackConfig(samples=32, reference=False)
    rows = run_attacks(backend, result.tensors, "circle", prompts=paraphrases("circle"), cfg=attack)
    out = {
        "seed": args.seed,
        "adversarial": args.adversarial,
        "overrides": overrides,
        "train_seconds": seconds,
    }
    out |= {"attack": {r["prompt"]: r["edited"] for r in rows}, "grid": grid_levels(backend, result.tensors)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
