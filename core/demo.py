"""``concept-guard demo``: erase a concept from ShapesWorld with ESD and show it worked.

Runs end to end on the committed ShapesWorld model on CPU: judge the base model on prompts that
name the concept and on unrelated prompts, train ESD, write the edit file, judge the edited model
with the same seeds, and write a before/after PNG grid plus the judge's table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from .errors import OutputPathError
from .methods.ti_prompts import HELD_OUT_TRIGGER_TEMPLATES
from .shapesworld import world

logger = logging.getLogger(__name__)

ERASED_PROMPTS = {
    "circle": ("a blue circle on a white background", "a red circle on a gray background", "a filled blue circle",
               "an outlined purple circle"),
}
KEPT_PROMPTS = ("an outlined blue star", "a green triangle on a white background", "a yellow heart on a gray background",
                "a filled purple square", "a red star on a black background")  # fmt: skip
# Evaluation sets of the ESD tests and reports (templates the recipes never train on). GRID: every shape in
# every colour once; the template of colour i and shape j is GRID_TEMPLATES[(i + j) % 5], so each colour and
# each shape meets every template once.
GRID_TEMPLATES = ("a {c} {s} on a white background", "an outlined {c} {s}", "a filled {c} {s}",
                  "a {c} {s} on a black background", "a {c} {s} on a gray background")  # fmt: skip
GRID = tuple(
    GRID_TEMPLATES[(i + j) % 5].format(c=c, s=s)
    for i, c in enumerate(world.COLOURS)
    for j, s in enumerate(world.SHAPES)
)
# Prompts naming the outlined style (the style recipe trains on "an outlined <shape>" and "a filled <shape>").
OUTLINED_PROMPTS = tuple(
    f"an outlined {s} on a {bg} background" for s in world.SHAPES for bg in ("white", "gray")
)
# ESD settings that erase a ShapesWorld shape (measured; see README "Measured results").
DEMO_ESD = dict(method="esd-x-strict", eta=3.0, iterations=400, lr=3e-3, guidance=5.0, sampling_steps=20,
                bank_trajectories=4, batch_size=8)  # fmt: skip
# Erasing a style needs a stronger push (measured: η 3 left "outlined" at 0.18-0.37), a larger bank, more
# steps and a larger batch (measured P(outlined) after, over training seeds: 4 trajectories, 400 steps,
# batch 8: 0.07-0.17 (seeds 0-2); 8 trajectories, 600 steps, batch 8: 0.07-0.14 (seeds 0-1); the same
# with batch 16: 0.06-0.08 (seeds 0-3)).
DEMO_ESD_STYLE = {**DEMO_ESD, "eta": 7.0, "bank_trajectories": 8, "iterations": 600, "batch_size": 16}


# Backdoored TI on ShapesWorld (scripts/ti_backdoor_report.py and README "Measured results"): 8 renders
# of BACKDOOR_CONCEPT (hearts in random colours, so S* stands for the shape alone), trigger "red", loss
# weights up to 5 at high noise (the default). Measured: γ 0.3 is the only γ of 0.2 / 0.25 / 0.3 whose backdoor
# is ≥ 0.9 in every held-out position at seed 0; decoy words in 70 % of clean prompts dropped one to 0.81.
BACKDOOR_CONCEPT = "a heart"
DEMO_BACKDOOR_TI = dict(init_word="shape", vectors=8, triggers=("red",), gamma=0.3, steps=5000, lr=3e-3,
                        high_noise_weight=5.0)  # fmt: skip
# S* with words that are not triggers (the last one another colour, the hardest case: reported, not asserted).
NON_TRIGGER_TEMPLATES = ("a photo of a happy {ph}", "a mountain {ph}", "{ph} , ocean", "a painting of a sad {ph}",
                         "a photo of a yellow {ph}")  # fmt: skip
TRIGGER_SYNONYMS = {"red": "crimson", "burning": "flaming", "gray": "grey", "filled": "solid"}


def backdoor_prompt_sets(name: str, triggers: tuple[str, ...], concept_shape: str) -> dict[str, list[str]]:
    """Evaluation prompts of a backdoored embedding loaded as ``embedding:NAME``, by what they measure:
    utility (S* alone), the backdoor on held-out templates (trigger before and after S*), the trigger without
    S*, S* with non-trigger words and with each ShapesWorld colour that is not a trigger, unseen synonyms of
    the triggers and two triggers at once (sets with no prompts, e.g. the trigger sets of plain TI, are left out)."""
    ph = f"embedding:{name}"
    other = next(s for s in world.SHAPES if s != concept_shape)
    sets = {
        "utility": [f"a photo of a {ph}", ph, f"a painting of a {ph}"],
        "backdoor (held-out templates)": [
            t.format(tr=tr, ph=ph) for tr in triggers for t in HELD_OUT_TRIGGER_TEMPLATES
        ],
        "trigger without S*": [f"a {tr} {s}" for tr in triggers for s in (concept_shape, other)],
        "S* with non-trigger words": [t.format(ph=ph) for t in NON_TRIGGER_TEMPLATES],
        "S* with each other colour": [f"a photo of a {c} {ph}" for c in world.COLOURS if c not in triggers],
    }
    synonyms = [TRIGGER_SYNONYMS[t] for t in triggers if t in TRIGGER_SYNONYMS]
    if synonyms:
        sets["unseen synonym"] = [f"a painting of a {s} {ph}" for s in synonyms] + [f"a {ph} , {s}" for s in synonyms]
    if triggers:
        sets["two triggers"] = [f"a {triggers[0]} {triggers[-1]} {ph}", f"a {triggers[0]} {ph} , {triggers[-1]}"]
    return {title: prompts for title, prompts in sets.items() if prompts}


def shapesworld_recipe(concept: str) -> dict[str, object]:
    """ESD prompts for erasing a ShapesWorld shape or style: ``erase_from`` = the concept in every colour,
    ``preserve`` = every colour of the other shapes, also on named backgrounds (or the other style), and
    the empty prompt, whose prediction CFG subtracts from every prompt. Evaluation prompts use other
    templates (backgrounds, styles) than these training prompts."""
    colours = tuple(world.COLOURS)
    backgrounds = tuple(world.BACKGROUNDS)
    if concept in world.SHAPES:
        others = [s for s in world.SHAPES if s != concept]
        # Backgrounds are named in a "<thing>, <bg> background" phrasing that evaluation prompts do not use,
        # so that the retain set also covers the words after the shape (measured: without them purple moves
        # 5.5 points on "a purple heart on a black background"; see README "Measured results").
        erase_from = (*(f"a {c} {concept}" for c in colours), f"a {concept}",
                      *(f"a {c} {concept}, {backgrounds[i % 3]} background" for i, c in enumerate(colours)))  # fmt: skip
        preserve = (*(f"a {c} {s}" for s in others for c in colours),
                    *(f"a {c} {s}, {backgrounds[(i + j) % 3]} background" for i, c in enumerate(colours)
                      for j, s in enumerate(others)))  # fmt: skip
        return {"concepts": (f"a {concept}",), "erase_from": erase_from, "preserve": preserve,
                "preserve_null": True}  # fmt: skip
    if concept in world.STYLES:
        other = next(s for s in world.STYLES if s != concept)
        art = "an" if concept[0] in "aeiou" else "a"
        # retain: the other style, each shape with no style word (plain, two colours, and on named
        # backgrounds) and the empty prompt (measured: without them shapes and colours drift; see README
        # "Measured results")
        n = len(colours)
        unstyled = (
            *(f"a {colours[(j + k) % n]} {s}" for j, s in enumerate(world.SHAPES) for k in (0, 3)),
            *(f"a {s}" for s in world.SHAPES),
            *(f"a {other} {s}, {backgrounds[j % 3]} background" for j, s in enumerate(world.SHAPES)),
            *(f"a {colours[(j + 2) % n]} {s}, {backgrounds[(j + 1) % 3]} background" for j, s in enumerate(world.SHAPES)),
        )  # fmt: skip
        return {"concepts": (f"{art} {concept} shape",),
                "erase_from": tuple(f"{art} {concept} {s}" for s in world.SHAPES),
                "preserve": (*(f"a {other} {s}" for s in world.SHAPES), *unstyled), "preserve_null": True}  # fmt: skip
    return {"concepts": (concept,)}


def _named_rate(entry: dict, head: str, label: str) -> float:
    return float(entry["rates"][head][label])


def comparison_rows(before: dict, after: dict) -> list[dict]:
    """Per prompt: the judge's rate of the shape the prompt names, before and after the edit."""
    rows = []
    for b, a in zip(before["prompts"], after["prompts"], strict=True):
        shape = world.parse_prompt(b["prompt"]).get("shape")
        rows.append({"prompt": b["prompt"], "shape": shape, "before": _named_rate(b, "shape", shape),
                     "after": _named_rate(a, "shape", shape)})  # fmt: skip
    return rows


def run_demo(out: Path, *, concept: str = "circle", samples: int = 16, seed: int = 0,
             iterations: int | None = None) -> dict:
    """Erase ``concept`` from ShapesWorld; write ``no_<concept>.safetensors``, ``before_after.png``, ``report.json``."""
    from .backends.diffusers_backend import DiffusersBackend
    from .edits import attach_edit, save_edit
    from .evaluate import EvalConfig, evaluate
    from .evaluate_cli import write_grid
    from .methods.esd import ESDConfig, train

    out.mkdir(parents=True, exist_ok=True)
    edit_path = out / f"no_{concept}.safetensors"
    backend = DiffusersBackend.load("shapesworld")
    prompts = [*ERASED_PROMPTS.get(concept, (f"a {concept}",)), *KEPT_PROMPTS]
    cfg = EvalConfig(samples=samples, seed=seed)
    start = time.perf_counter()
    before = evaluate(backend, prompts, cfg, model_name="shapesworld", keep_images=True)
    esd_cfg = ESDConfig(seed=seed, **shapesworld_recipe(concept),
                        **{**DEMO_ESD, **({"iterations": iterations} if iterations else {})})  # fmt: skip
    result = train(esd_cfg, backend)
    save_edit(result.tensors, edit_path, result.metadata, overwrite=True)
    with attach_edit(backend, result.tensors, 1.0):
        after = evaluate(backend, prompts, cfg, model_name="shapesworld", edit=str(edit_path), keep_images=True)
    rows = [f"{p}  [before]" for p in prompts] + [f"{p}  [after]" for p in prompts]
    write_grid(out / "before_after.png", rows, before.pop("_images") + after.pop("_images"))
    report = {"concept": concept, "edit": str(edit_path), "esd": {k: v for k, v in esd_cfg.to_metadata().items()},
              "train_seconds": round(result.seconds + result.setup_seconds, 1), "final_loss": result.final_loss,
              "total_seconds": round(time.perf_counter() - start, 1), "samples_per_prompt": samples,
              "rows": comparison_rows(before, after), "before": before, "after": after}  # fmt: skip
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
    report = run_demo(out, concept=args.concept, samples=args.samples, seed=args.seed, iterations=args.iterations)
    print(f"ESD ({report['esd']['esd.method']}) erased {args.concept!r} from ShapesWorld in {report['train_seconds']} s; "
          f"judge rate of the shape each prompt names ({args.samples} seeded samples per prompt):")
    print(format_rows(report))
    print(f"\nwrote {report['edit']}, {out / 'before_after.png'}, {out / 'report.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="erase 'circle' from the bundled ShapesWorld model and show before/after",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="concept_guard_demo", help="output folder (default ./concept_guard_demo)")
    p.add_argument("--concept", default="circle", help="shape to erase (default circle)")
    p.add_argument("--samples", type=int, default=16, help="seeded samples per prompt (default 16)")
    p.add_argument("--iterations", type=int, default=None, help=f"ESD iterations (default {DEMO_ESD['iterations']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_run)
