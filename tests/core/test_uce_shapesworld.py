"""Closed-form erasure (UCE) on the committed ShapesWorld model with every setting on auto, judged on prompts no
setting was chosen on: the recipe's tuned prompts, held-out paraphrases, and every other shape and colour.

The solve takes well under a second; the test's minutes go to sampling (the base GRID once per module)."""

from __future__ import annotations

import pytest
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.uce import UCEConfig, train
from concept_guard.core.score import score_edit
from concept_guard.presets import uce_settings
from concept_guard.shapesworld import load_shapesworld, shapesworld_model_path
from concept_guard.shapesworld.attack import paraphrases
from concept_guard.shapesworld.recipes import ERASED_PROMPTS, GRID, held_out_captions
from test_esd_shapesworld import grid_rates, level_rates, mean, rates

pytestmark = pytest.mark.skipif(
    not (shapesworld_model_path() / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
    reason="the ShapesWorld model weights are not in core/shapesworld/assets/model",
)

#: Bars (measured with scripts/uce_report.py; see docs/results.md): circles left on any tuned prompt, held-out
#: paraphrase or held-out caption in the model's own grammar (measured: at most 1 of 32 samples), and how far any
#: other shape or colour may move on the GRID prompts (measured: at most 4.4 points).
WORST_PROMPT = 0.15
OTHER_POINTS = 0.05


@pytest.fixture(scope="module")
def backend():
    return load_shapesworld()


@pytest.fixture(scope="module")
def judge():
    from concept_guard.shapesworld.judge import load_judge

    return load_judge()


def test_uce_defaults_erase_the_circle_on_unseen_wordings_and_keep_the_rest(backend, judge):
    settings = uce_settings(backend, "circle", {})  # what the node and CLI use with every setting on auto
    cfg = UCEConfig(**settings)
    assert cfg.method == "uce" and cfg.preserve and "a red circle" in cfg.erase_from
    result = train(cfg, backend)
    assert result.seconds < 10
    circle = lambda p: "circle"  # noqa: E731
    others = [p for p in GRID if "circle" not in p]
    before = grid_rates(backend, judge, others)
    before_c = rates(backend, judge, ERASED_PROMPTS["circle"], "shape", circle)
    with attach_edit(backend, result.tensors):
        tuned = rates(backend, judge, ERASED_PROMPTS["circle"], "shape", circle)
        held_out = rates(backend, judge, paraphrases("circle"), "shape", circle, seed=300)
        captions = rates(backend, judge, held_out_captions("circle", count=8), "shape", circle, seed=700)
    after = grid_rates(backend, judge, others, result.tensors)
    (erased,), kept = score_edit(backend, result.tensors, ["a circle"], ["a square", "a red heart"])
    print({"tuned": tuned, "held_out": held_out, "captions": captions, "score": (erased, kept)})
    assert mean(before_c) >= 0.9
    for found in (tuned, held_out, captions):
        assert max(found.values()) <= WORST_PROMPT, found
    for head in ("shape", "colour"):
        b, a = level_rates(before, head), level_rates(after, head)
        moved = {k: round(a[k] - b[k], 3) for k in b}
        assert all(abs(v) <= OTHER_POINTS for v in moved.values()), (head, moved)
    # the concept score agrees with the judge: the circle's guidance is gone, the kept prompts keep theirs
    assert erased.score < 0.5 and all(s.score > 0.7 for s in kept), (erased, kept)
