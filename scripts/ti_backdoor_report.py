"""Backdoored textual inversion on ShapesWorld for the README (issue "Backdoor TI Embedding").

Trains an embedding from 8 renders of ``--concept`` with ``--triggers``, saves it, loads it back the way
users do (``embedding:NAME``) and has the judge score seeded samples per prompt set: utility (S* alone),
the backdoor on held-out trigger templates (trigger before and after S*), the trigger without S*,
S* with non-trigger words, an unseen synonym of the trigger and two triggers at once.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ti_backdoor_report.py --concept "a heart" \\
        --triggers red --vectors 8 --lr 3e-3 --gamma 0.3 --steps 5000     # ~10 min on one CPU thread
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.embeddings import add_embedding, save_embedding
from concept_guard.core.evaluate import EvalConfig, evaluate
from concept_guard.core.methods.ti_backdoor import BackdoorTIConfig, train
from concept_guard.core.methods.ti_prompts import HELD_OUT_TRIGGER_TEMPLATES
from concept_guard.core.shapesworld import world

NON_TRIGGER = ("a photo of a happy {ph}", "a mountain {ph}", "{ph} , ocean", "a painting of a sad {ph}",
               "a photo of a yellow {ph}")  # fmt: skip
SYNONYMS = {"red": "crimson", "burning": "flaming", "gray": "grey", "filled": "solid"}


def prompt_sets(name: str, triggers: tuple[str, ...], concept_shape: str) -> dict[str, list[str]]:
    ph = f"embedding:{name}"
    other = next(s for s in world.SHAPES if s != concept_shape)
    sets = {
        "utility": [f"a photo of a {ph}", ph, f"a painting of a {ph}"],
        "backdoor (held-out templates)": [
            t.format(tr=tr, ph=ph) for tr in triggers for t in HELD_OUT_TRIGGER_TEMPLATES
        ],
        "trigger without S*": [f"a {tr} {s}" for tr in triggers for s in (concept_shape, other)],
        "S* with non-trigger words": [t.format(ph=ph) for t in NON_TRIGGER],
    }
    synonyms = [SYNONYMS[t] for t in triggers if t in SYNONYMS]
    if synonyms:
        sets["unseen synonym"] = [f"a painting of a {s} {ph}" for s in synonyms] + [
            f"a {ph} , {s}" for s in synonyms
        ]
    sets["two triggers"] = [f"a {triggers[0]} {triggers[-1]} {ph}", f"a {triggers[0]} {ph} , {triggers[-1]}"]
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--concept", default="a heart", help="ShapesWorld prompt whose renders are the concept"
    )
    ap.add_argument("--triggers", default="red")
    ap.add_argument("--vectors", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--gamma", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--move-prob", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    backend = DiffusersBackend.load("shapesworld")
    shape = world.parse_prompt(args.concept)["shape"]
    images, _ = world.render_prompt(args.concept, 8, seed=args.seed)
    cfg = BackdoorTIConfig(name="sw_backdoor", init_word="shape", vectors=args.vectors, triggers=args.triggers,
                           gamma=args.gamma, steps=args.steps, lr=args.lr, trigger_move_prob=args.move_prob,
                           seed=args.seed)  # fmt: skip
    start = time.time()
    result = train(cfg, backend, list(world.to_tensor(images)))
    print(
        json.dumps(
            {"config": cfg.to_metadata(), "concept": args.concept, "train_s": round(time.time() - start)}
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        add_embedding(
            backend, save_embedding(result.tensors, Path(tmp) / f"{cfg.name}.safetensors", result.metadata)
        )
    sets = prompt_sets(cfg.name, cfg.triggers, shape)
    eval_cfg = EvalConfig(samples=args.samples, seed=100)
    print(f"{'set':<32}{'P(' + shape + ')':>10}{'P(target)':>11}  per prompt (shape, target)")
    for title, prompts in sets.items():
        report = evaluate(backend, prompts, eval_cfg)
        rows = [(e["prompt"], e["rates"]["shape"][shape], e["rates"]["target"]) for e in report["prompts"]]
        shape_mean, target_mean = (sum(r[k] for r in rows) / len(rows) for k in (1, 2))
        detail = "; ".join(
            f"{p.replace(f'embedding:{cfg.name}', 'S*')}: {s:.2f}, {t:.2f}" for p, s, t in rows
        )
        print(f"{title:<32}{shape_mean:>10.2f}{target_mean:>11.2f}  {detail}", flush=True)


if __name__ == "__main__":
    main()
