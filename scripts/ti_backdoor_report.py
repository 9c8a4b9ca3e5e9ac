"""Backdoored textual inversion on ShapesWorld for docs/results.md.

Trains an embedding from 8 renders of ``--concept`` with ``--triggers``, saves it, loads it back the way
users do (``embedding:NAME``) and has the judge score seeded samples per prompt set: utility (S* alone),
the backdoor on held-out trigger templates (trigger before and after S*), the trigger without S*,
S* with non-trigger words, an unseen synonym of the trigger and two triggers at once.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ti_backdoor_report.py    # ~8 min on one CPU thread
    OMP_NUM_THREADS=1 .venv/bin/python scripts/ti_backdoor_report.py --seed 1 --save s1/sw_backdoor.safetensors
    # score that file again on more samples and other seeds, without training:
    .venv/bin/python scripts/ti_backdoor_report.py --embedding s1/sw_backdoor.safetensors --samples 64 --eval-seed 300

The defaults are the recipe of ``shapesworld/recipes.py`` (``BACKDOOR_CONCEPT``, ``DEMO_BACKDOOR_TI``), which the ShapesWorld
test trains too: concept "a heart", trigger "red", 8 vectors, lr 3e-3, γ 0.3, 5000 steps, loss weights up to
5 at high noise.
"""

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from concept_guard.core.embeddings import add_embedding, save_embedding
from concept_guard.core.methods.ti_backdoor import BackdoorTIConfig, train
from concept_guard.shapesworld import load_shapesworld, world
from concept_guard.shapesworld.evaluate import EvalConfig, evaluate
from concept_guard.shapesworld.recipes import BACKDOOR_CONCEPT, DEMO_BACKDOOR_TI, backdoor_prompt_sets

#: The recipe every default comes from.
RECIPE = BackdoorTIConfig(name="sw_backdoor", **DEMO_BACKDOOR_TI)


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--concept", default=BACKDOOR_CONCEPT, help="ShapesWorld prompt whose renders are the concept"
    )
    ap.add_argument("--triggers", default=",".join(RECIPE.triggers))
    ap.add_argument("--vectors", type=int, default=RECIPE.vectors)
    ap.add_argument("--lr", type=float, default=RECIPE.lr)
    ap.add_argument("--gamma", type=float, default=RECIPE.gamma)
    ap.add_argument("--steps", type=int, default=RECIPE.steps)
    ap.add_argument("--move-prob", type=float, default=RECIPE.trigger_move_prob)
    ap.add_argument("--steer-prob", type=float, default=RECIPE.steer_prob)
    ap.add_argument("--high-noise-weight", type=float, default=RECIPE.high_noise_weight)
    ap.add_argument("--decoy-prob", type=float, default=RECIPE.decoy_prob)
    ap.add_argument(
        "--anchor-steps", type=int, default=None, help="default: steps // 6 with keep words, else 0"
    )
    ap.add_argument("--keep-words", default=",".join(RECIPE.keep_words))
    ap.add_argument("--keep-prob", type=float, default=RECIPE.keep_prob)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=100, help="prompt i is sampled with seed EVAL_SEED+i")
    ap.add_argument("--save", default=None, help="also keep the embedding file here")
    ap.add_argument(
        "--embedding",
        default=None,
        help="score this saved embedding (trained with --triggers) instead of training one; its stem is the name",
    )
    return ap.parse_args()


def _config(args: argparse.Namespace) -> BackdoorTIConfig:
    return replace(
        RECIPE,
        triggers=args.triggers,
        vectors=args.vectors,
        lr=args.lr,
        gamma=args.gamma,
        steps=args.steps,
        trigger_move_prob=args.move_prob,
        steer_prob=args.steer_prob,
        high_noise_weight=args.high_noise_weight,
        decoy_prob=args.decoy_prob,
        anchor_steps=args.anchor_steps,
        keep_words=args.keep_words,
        keep_prob=args.keep_prob,
        seed=args.seed,
    )


def _load_or_train(args: argparse.Namespace, cfg: BackdoorTIConfig, backend, images) -> str:
    """Add ``--embedding`` to the backend, or train one on ``images`` and add that; returns its name."""
    if args.embedding:
        add_embedding(backend, args.embedding)
        print(json.dumps({"embedding": args.embedding, "triggers": cfg.triggers}))
        return Path(args.embedding).stem
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        result = train(cfg, backend, list(world.to_tensor(images)))
        train_s = round(time.time() - start)
        print(json.dumps({"config": cfg.to_metadata(), "concept": args.concept, "train_s": train_s}))
        path = Path(args.save) if args.save else Path(tmp) / f"{cfg.name}.safetensors"
        add_embedding(backend, save_embedding(result.tensors, path, result.metadata, overwrite=True))
    return cfg.name


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(1)
    backend = load_shapesworld()
    shape = world.parse_prompt(args.concept)["shape"]
    images, _ = world.render_prompt(args.concept, 8, seed=args.seed)
    cfg = _config(args)
    name = _load_or_train(args, cfg, backend, images)
    sets = backdoor_prompt_sets(name, cfg.triggers, shape)
    eval_cfg = EvalConfig(samples=args.samples, seed=args.eval_seed)
    print(f"{'set':<32}{'P(' + shape + ')':>10}{'P(target)':>11}  per prompt (shape, target)")
    for title, prompts in sets.items():
        report = evaluate(backend, prompts, eval_cfg)
        rows = [(e["prompt"], e["rates"]["shape"][shape], e["rates"]["target"]) for e in report["prompts"]]
        shape_mean, target_mean = (sum(r[k] for r in rows) / len(rows) for k in (1, 2))
        detail = "; ".join(f"{p.replace(f'embedding:{name}', 'S*')}: {s:.2f}, {t:.2f}" for p, s, t in rows)
        print(f"{title:<32}{shape_mean:>10.2f}{target_mean:>11.2f}  {detail}", flush=True)


if __name__ == "__main__":
    main()
