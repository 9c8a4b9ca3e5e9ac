"""ESD efficacy on the committed ShapesWorld model, measured by the judge (issue: Erase Concept).

Before and after use the same seeds, so every change is the edit's. Each efficacy test trains one
edit (~1.5-2 min on one CPU thread) and samples a few hundred 32x32 images; the base model's rates on
the shared GRID prompts are sampled once per module.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.esd import ESDConfig, train
from concept_guard.core.score import score_edit, score_report
from concept_guard.presets import esd_settings
from concept_guard.shapesworld import load_shapesworld, shapesworld_model_path, world
from concept_guard.shapesworld.recipes import (
    DEMO_ESD,
    DEMO_ESD_STYLE,
    ERASED_PROMPTS,
    GRID,
    KEPT_PROMPTS,
    OUTLINED_PROMPTS,
    shapesworld_recipe,
)

pytestmark = pytest.mark.skipif(
    not (shapesworld_model_path() / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
    reason="the ShapesWorld model weights are not in core/shapesworld/assets/model",
)

SAMPLES = 24
# Evaluation prompts use templates (styles, backgrounds) that the training prompts of the recipes do not.
CIRCLE_PROMPTS = ERASED_PROMPTS["circle"]
# Circle prompts in wordings that neither the recipe nor CIRCLE_PROMPTS use (a synonym, no colour, filler words).
HELD_OUT_CIRCLE = (
    "a green disc",
    "a circle",
    "a photo of a purple circle",
    "a simple yellow circle, high quality",
)
OTHER_SHAPES = KEPT_PROMPTS
# Circle rate under concept inversion of the adversarial edit (mean of three prompts); plain ESD: 0.97–1.00.
INVERSION_BAR = 0.8
# GRID: every shape in every colour once (25 prompts x 32 samples, seed 500 + index).


@pytest.fixture(scope="module")
def backend():

    return load_shapesworld()


@pytest.fixture(scope="module")
def judge():
    from concept_guard.shapesworld.judge import load_judge

    return load_judge()


@pytest.fixture(scope="module")
def grid_before(backend, judge):
    return grid_rates(backend, judge, GRID)


def grid_rates(backend, judge, prompts, deltas=None) -> dict[str, dict]:
    """Judge rates per GRID prompt (32 seeded samples each; a prompt's seed is fixed by its place in GRID)."""
    from concept_guard.shapesworld.evaluate import EvalConfig, evaluate

    out = {}
    with attach_edit(backend, deltas, 1.0) if deltas is not None else contextlib.nullcontext():
        for p in prompts:  # one prompt at a time so that a subset of GRID keeps each prompt's seed
            report = evaluate(backend, [p], EvalConfig(samples=32, seed=500 + GRID.index(p)), judge=judge)
            out[p] = report["prompts"][0]["rates"]
    return out


def level_rates(rates: dict[str, dict], head: str) -> dict[str, float]:
    """Mean rate of the named ``head`` label (shape or colour) over the prompts naming each label."""
    by: dict[str, list[float]] = {}
    for p, rate in named_rates(rates, head).items():
        by.setdefault(named_all(p)[head], []).append(rate)
    return {k: round(sum(v) / len(v), 4) for k, v in by.items()}


def judged(backend, judge, prompts, seed=100) -> dict[str, dict]:
    """Judge rates of every head per prompt, SAMPLES seeded samples each (sampled once for all heads)."""
    from concept_guard.shapesworld.evaluate import EvalConfig, evaluate

    report = evaluate(backend, prompts, EvalConfig(samples=SAMPLES, seed=seed), judge=judge)
    return {e["prompt"]: e["rates"] for e in report["prompts"]}


def rates(backend, judge, prompts, head, label_of, seed=100):
    """Fraction of SAMPLES seeded samples per prompt whose ``head`` label is ``label_of(prompt)``."""
    return {p: r[head][label_of(p)] for p, r in judged(backend, judge, prompts, seed).items()}


def named_rates(judged_rates: dict[str, dict], head: str) -> dict[str, float]:
    """Per prompt that names a ``head`` label: the rate of that label."""
    return {p: r[head][named_all(p)[head]] for p, r in judged_rates.items() if head in named_all(p)}


def named_all(p):
    return {k: v for k, v in world.parse_prompt(p).items() if isinstance(v, str)}


def named(head):
    return lambda p: world.parse_prompt(p)[head]


def mean(r: dict[str, float]) -> float:
    return sum(r.values()) / len(r)


def assert_within(before: dict[str, float], after: dict[str, float], points: float, what: str) -> None:
    for k in before:
        assert abs(after[k] - before[k]) <= points + 1e-9, (what, k, before[k], after[k])


def test_esd_x_strict_erases_circle_and_preserves_other_shapes_and_colours(backend, judge, grid_before):
    shape_of = named("shape")
    before_c = rates(backend, judge, CIRCLE_PROMPTS, "shape", shape_of)
    before_others = judged(backend, judge, OTHER_SHAPES)
    before_o, before_col = named_rates(before_others, "shape"), named_rates(before_others, "colour")
    assert mean(before_c) >= 0.9, before_c

    settings = esd_settings(backend, "circle", {})  # what a user gets with every setting on auto
    assert ESDConfig(**settings) == ESDConfig(**shapesworld_recipe("circle"), **DEMO_ESD)
    result = train(ESDConfig(seed=0, **settings), backend)
    with attach_edit(backend, result.tensors, 0.5):  # the "erasure dial" of Apply Edited UNet
        half_c = rates(backend, judge, CIRCLE_PROMPTS, "shape", shape_of)
    with attach_edit(backend, result.tensors, 1.0):
        after_c = rates(backend, judge, CIRCLE_PROMPTS, "shape", shape_of)
        after_others = judged(backend, judge, OTHER_SHAPES)
        held_out_c = rates(backend, judge, HELD_OUT_CIRCLE, "shape", lambda p: "circle")
    after_o, after_col = named_rates(after_others, "shape"), named_rates(after_others, "colour")
    print({"circle": (before_c, after_c), "others": (before_o, after_o), "colours": (before_col, after_col)})
    print({"held-out circle prompts": held_out_c})
    assert mean(after_c) <= 0.10, after_c
    assert mean(held_out_c) <= 0.20, held_out_c  # wordings no recipe prompt uses
    # The judge-free concept score agrees: the circle's guidance is gone, the other shapes' stays.
    erased, kept = score_edit(
        backend, result.tensors, ["a circle", "a blue circle"], ["a blue square", "a red heart"]
    )
    print({"concept score": [(s.prompt, s.score) for s in (*erased, *kept)]})
    assert max(s.score for s in erased) < 0.5 < min(s.score for s in kept)  # measured: 0.36 and 0.80
    assert "NOT ERASED" not in score_report(erased, kept)
    print({"dial": (mean(before_c), mean(half_c), mean(after_c))})
    assert mean(before_c) > mean(half_c) > mean(after_c), half_c  # measured 0.98 > 0.82 > 0.04
    # Per prompt (24 samples) bounds that guard what we have (measured at worst: shape 2/24 on "a yellow
    # heart on a gray background", colour 1/24); the issue's bar is per shape and per colour below.
    assert_within(before_o, after_o, 0.10, "shape per prompt")
    assert_within(before_col, after_col, 0.20, "colour per prompt")
    # The bar: on GRID prompts of the other shapes, each shape's rate (5 prompts x 32 samples) and
    # each colour's rate (4 prompts x 32 samples) stays within 5 points of the base model's.
    others = [p for p in GRID if shape_of(p) != "circle"]
    after_g = grid_rates(backend, judge, others, result.tensors)
    before_g = {p: grid_before[p] for p in others}
    shapes = (level_rates(before_g, "shape"), level_rates(after_g, "shape"))
    colours = (level_rates(before_g, "colour"), level_rates(after_g, "colour"))
    print({"per shape": shapes, "per colour": colours})
    assert_within(*shapes, 0.05, "shape")
    # Purple moves the most (about 5 points; measured: see docs/results.md).
    assert_within(*colours, 0.05, "colour")


def test_adversarial_esd_erases_and_resists_concept_inversion(backend, judge):
    """``adversarial on`` over the auto recipe (what the node and CLI run): circles stay erased, and the attack
    harness's concept inversion (a textual-inversion embedding learned from circle renders against the edited
    model, three prompts) brings far fewer back than from plain ESD (0.97–1.00; docs/results.md)."""
    from concept_guard.presets import adversarial_steps
    from concept_guard.shapesworld.attack import AttackConfig, run_attacks

    settings = esd_settings(backend, "circle", {"adv_steps": adversarial_steps("on")})
    result = train(ESDConfig(seed=0, **settings), backend)
    cfg = AttackConfig(samples=32, reference=False, prompt_steps=0)
    rows = run_attacks(backend, result.tensors, "circle", prompts=list(HELD_OUT_CIRCLE), cfg=cfg, judge=judge)
    found = {r["prompt"]: r["edited"] for r in rows}
    inversion = {r["prompt"]: r["edited"] for r in rows if r["attack"] == "concept inversion"}
    print({"adversarial ESD under attack": found})
    assert max(found[p] for p in HELD_OUT_CIRCLE) <= 0.15, found
    assert len(inversion) == 3 and mean(inversion) <= INVERSION_BAR, inversion  # measured 0.65


def test_esd_x_strict_erases_outlined_style_and_preserves_shapes(backend, judge, grid_before):
    style_of = lambda p: "outlined"  # noqa: E731
    before = rates(backend, judge, OUTLINED_PROMPTS, "style", style_of, seed=700)
    assert mean(before) >= 0.9, before
    result = train(ESDConfig(seed=0, **shapesworld_recipe("outlined"), **DEMO_ESD_STYLE), backend)
    no_style = [p for p in GRID if "outlined" not in p]  # 4 prompts per shape: filled or no style word
    with attach_edit(backend, result.tensors, 1.0):
        after = rates(backend, judge, OUTLINED_PROMPTS, "style", style_of, seed=700)
    after_g = grid_rates(backend, judge, no_style, result.tensors)
    before_g = {p: grid_before[p] for p in no_style}
    shapes = (level_rates(before_g, "shape"), level_rates(after_g, "shape"))
    filled = (
        mean({p: r["style"]["filled"] for p, r in before_g.items()}),
        mean({p: r["style"]["filled"] for p, r in after_g.items()}),
    )
    print({"outlined": (mean(before), mean(after), before, after), "per shape": shapes, "filled": filled})
    # The bar (measured with scripts/esd_style_report.py: see docs/results.md).
    assert mean(after) <= 0.10, after
    assert_within(*shapes, 0.05, "shape")


def test_edit_file_round_trip_matches_trained_model(backend, tmp_path):
    from concept_guard.core.edits.diff_file import read_edit, save_edit

    result = train(ESDConfig(concepts=("a circle",), seed=1, **{**DEMO_ESD, "iterations": 20}), backend)
    path = save_edit(result.tensors, tmp_path / "e.safetensors", result.metadata, dtype=torch.float32)
    deltas, meta = read_edit(path)
    assert meta["concept_guard.base_fingerprint"] == backend.fingerprint
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, t = backend.encode_text(["a red circle", "a blue square"]), torch.tensor([700, 200])
    with torch.no_grad():
        with attach_edit(backend, result.tensors):
            trained = backend.eps(x, t, cond)
        with attach_edit(backend, deltas):
            loaded = backend.eps(x, t, cond)
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)


def test_demo_command_runs_end_to_end(tmp_path, capsys):
    """``concept-guard demo`` (the README's first command) on a short run: table, edit, grid and report."""
    from concept_guard.cli import main as cli_main

    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--iterations", "2", "--samples", "2", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert (
        "ESD (esd-x-strict) erased 'circle'" in printed and "a blue circle on a white background" in printed
    )
    assert {p.name for p in out.iterdir()} >= {"no_circle.safetensors", "before_after.png", "report.json"}
