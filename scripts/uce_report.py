"""Closed-form erasure (UCE/RECE) on ShapesWorld for docs/results.md: erase "circle" with the auto settings of
``concept-guard erase --method uce|rece`` (optionally overridden), then judge the tuned prompts, what an attacker
gets back (held-out paraphrases, held-out captions in the model's own grammar, concept inversion against the edited model, as ``concept-guard attack``) and
every other shape and colour (the GRID prompts, 32 samples each, seeds 500 + index, as the ESD report).

    .venv/bin/python scripts/uce_report.py --method uce [--set lamb=0.1 ...] [--no-inversion] [--threads 2]
    .venv/bin/python scripts/uce_report.py --method base      # the same tables for the unedited model

The solve is deterministic (no training seed); ``--eval-seed`` moves every sampling seed. Prints one JSON line.
"""

import argparse
import contextlib
import json

import torch
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.uce import UCEConfig, train
from concept_guard.core.score import score_edit
from concept_guard.presets import uce_settings
from concept_guard.shapesworld import load_shapesworld, world
from concept_guard.shapesworld.attack import AttackConfig, paraphrases, run_attacks
from concept_guard.shapesworld.evaluate import EvalConfig, evaluate
from concept_guard.shapesworld.recipes import ERASED_PROMPTS, GRID, held_out_captions


def _edited(backend, edit):
    return attach_edit(backend, edit) if edit else contextlib.nullcontext()


def grid_levels(backend, edit, seed: int) -> dict[str, float]:
    """Mean rate of the named shape and colour over the GRID prompts naming it (circle prompts included)."""
    by: dict[str, list[float]] = {}
    with _edited(backend, edit):
        for i, prompt in enumerate(GRID):
            rates = evaluate(backend, [prompt], EvalConfig(samples=32, seed=seed + i))["prompts"][0]["rates"]
            for head, label in world.parse_prompt(prompt).items():
                if head in ("shape", "colour") and isinstance(label, str):
                    by.setdefault(label, []).append(rates[head][label])
    return {k: round(sum(v) / len(v), 4) for k, v in by.items()}


def tuned_rates(backend, edit, seed: int) -> dict[str, float]:
    with _edited(backend, edit):
        report = evaluate(backend, ERASED_PROMPTS["circle"], EvalConfig(samples=32, seed=seed))
    return {e["prompt"]: e["rates"]["shape"]["circle"] for e in report["prompts"]}


def caption_rates(backend, edit, seed: int) -> dict[str, float]:
    """Circle rates on captions in the model's own grammar that no recipe trains on."""
    with _edited(backend, edit):
        report = evaluate(backend, held_out_captions("circle"), EvalConfig(samples=32, seed=seed))
    return {e["prompt"]: e["rates"]["shape"]["circle"] for e in report["prompts"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="uce", choices=["uce", "rece", "base"])
    p.add_argument("--set", nargs="*", default=[], help="UCEConfig overrides, e.g. lamb=0.1")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--no-inversion", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backend = load_shapesworld()
    out: dict[str, object] = {"method": args.method, "eval_seed": args.eval_seed}
    edit = {}
    if args.method != "base":
        overrides = {
            k: float(v) if "." in v or "e" in v else int(v) for k, v in (kv.split("=") for kv in args.set)
        }
        settings = uce_settings(backend, "circle", {"method": args.method, **overrides})
        cfg = UCEConfig(**settings)
        result = train(cfg, backend)
        edit = result.tensors
        erased, kept = score_edit(backend, edit, cfg.concepts, ("a square", "a red heart", "a blue star"))
        out |= {
            "overrides": overrides,
            "solve_seconds": round(result.seconds, 3),
            "residual": result.losses[-1],
        }
        out |= {"concept_score": {s.prompt: s.score for s in (*erased, *kept)}}
    out["tuned"] = tuned_rates(backend, edit, 100 + args.eval_seed)
    out["captions"] = caption_rates(backend, edit, 700 + args.eval_seed)
    attack = AttackConfig(
        samples=32,
        seed=300 + args.eval_seed,
        reference=False,
        inversion_steps=0 if args.no_inversion else 1500,
    )
    if edit:
        rows = run_attacks(backend, edit, "circle", prompts=paraphrases("circle"), cfg=attack)
        out["attack"] = {f"{r['attack']}: {r['prompt']}": r["edited"] for r in rows}
    out["grid"] = grid_levels(backend, edit, 500 + args.eval_seed)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
