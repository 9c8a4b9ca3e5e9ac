"""ESD efficacy on the committed ShapesWorld model, measured by the judge (issue: Erase Concept).

Before and after use the same seeds, so every change is the edit's. Each test trains one edit
(~tens of seconds on one CPU thread) and samples a few hundred 32x32 images.
"""

from __future__ import annotations

import pytest
import torch
from concept_guard.core.demo import DEMO_ESD, ERASED_PROMPTS, KEPT_PROMPTS, shapesworld_recipe
from concept_guard.core.edits import attach_edit
from concept_guard.core.methods.esd import ESDConfig, train
from concept_guard.core.shapesworld import shapesworld_model_path

pytestmark = pytest.mark.skipif(
    not (shapesworld_model_path() / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
    reason="the ShapesWorld model weights are not in core/shapesworld/assets/model",
)

SAMPLES = 24
# Evaluation prompts use templates (styles, backgrounds) that the training prompts of the recipe do not.
CIRCLE_PROMPTS = ERASED_PROMPTS["circle"]
OTHER_SHAPES = KEPT_PROMPTS


@pytest.fixture(scope="module")
def backend():
    from concept_guard.core.backends.diffusers_backend import DiffusersBackend

    return DiffusersBackend.load("shapesworld")


@pytest.fixture(scope="module")
def judge():
    from concept_guard.core.shapesworld.judge import load_judge

    return load_judge()


def rates(backend, judge, prompts, head, label_of):
    """Fraction of SAMPLES seeded samples per prompt whose ``head`` label is ``label_of(prompt)``."""
    from concept_guard.core.evaluate import EvalConfig, evaluate

    report = evaluate(backend, prompts, EvalConfig(samples=SAMPLES, seed=100), judge=judge)
    return {e["prompt"]: e["rates"][head][label_of(e["prompt"])] for e in report["prompts"]}


def named_all(p):
    from concept_guard.core.shapesworld import world

    return {k: v for k, v in world.parse_prompt(p).items() if isinstance(v, str)}


def named(head):
    from concept_guard.core.shapesworld import world

    return lambda p: world.parse_prompt(p)[head]


def test_esd_x_erases_circle_and_preserves_other_shapes_and_colours(backend, judge):
    shape_of = named("shape")
    before_c = rates(backend, judge, CIRCLE_PROMPTS, "shape", shape_of)
    before_o = rates(backend, judge, OTHER_SHAPES, "shape", shape_of)
    with_colour = [p for p in OTHER_SHAPES if "colour" in named_all(p)]
    before_col = rates(backend, judge, with_colour, "colour", named("colour"))
    assert sum(before_c.values()) / len(before_c) >= 0.9, before_c

    result = train(ESDConfig(seed=0, **shapesworld_recipe("circle"), **DEMO_ESD), backend)
    with attach_edit(backend, result.tensors, 0.5):  # the "erasure dial" of Apply Edited UNet
        half_c = rates(backend, judge, CIRCLE_PROMPTS, "shape", shape_of)
    with attach_edit(backend, result.tensors, 1.0):
        after_c = rates(backend, judge, CIRCLE_PROMPTS, "shape", shape_of)
        after_o = rates(backend, judge, OTHER_SHAPES, "shape", shape_of)
        after_col = rates(backend, judge, with_colour, "colour", named("colour"))
    print({"circle": (before_c, after_c), "others": (before_o, after_o), "colours": (before_col, after_col)})
    assert sum(after_c.values()) / len(after_c) <= 0.10, after_c
    mean = lambda r: sum(r.values()) / len(r)  # noqa: E731
    print({"dial": (mean(before_c), mean(half_c), mean(after_c))})
    assert mean(before_c) > mean(half_c) > mean(after_c), half_c  # measured 0.98 > 0.82 > 0.00
    # Measured (seed 100, 24 samples): other shapes move by at most 2/24 samples (0.083) and one colour
    # by 3/24 (0.125) per prompt; these bounds guard what we have.
    for p in OTHER_SHAPES:
        assert abs(after_o[p] - before_o[p]) <= 0.10 + 1e-9, (p, before_o[p], after_o[p])
        if p in before_col:
            assert abs(after_col[p] - before_col[p]) <= 0.15 + 1e-9, (p, before_col[p], after_col[p])
    # The bar, per shape: each other shape's rate over 4 prompts x 32 samples stays within 5 points.
    before_s, after_s = shape_level_rates(backend, judge), shape_level_rates(backend, judge, result.tensors)
    print({"per shape": (before_s, after_s)})
    for shape in before_s:
        assert abs(after_s[shape] - before_s[shape]) <= 0.05 + 1e-9, (shape, before_s[shape], after_s[shape])


def shape_level_rates(backend, judge, deltas=None) -> dict[str, float]:
    """Mean rate of the named shape over 4 prompts (colours, styles, backgrounds) x 32 samples per shape."""
    import contextlib

    from concept_guard.core.evaluate import EvalConfig, evaluate

    prompts = [
        p
        for s in ("square", "triangle", "star", "heart")
        for p in (f"a green {s} on a white background", f"an outlined blue {s}", f"a filled yellow {s}",
                  f"a red {s} on a black background")
    ]  # fmt: skip
    with attach_edit(backend, deltas, 1.0) if deltas is not None else contextlib.nullcontext():
        report = evaluate(backend, prompts, EvalConfig(samples=32, seed=300), judge=judge)
    by_shape: dict[str, list[float]] = {}
    for e in report["prompts"]:
        shape = named("shape")(e["prompt"])
        by_shape.setdefault(shape, []).append(e["rates"]["shape"][shape])
    return {s: sum(v) / len(v) for s, v in by_shape.items()}


def test_edit_file_round_trip_matches_trained_model(backend, tmp_path):
    from concept_guard.core.edits import read_edit, save_edit

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
