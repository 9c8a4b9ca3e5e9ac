"""Node "Attack Erasure" on the demo model, in-process as ComfyUI's executor runs it: the closed-form edit of
"circle" against its own name, a paraphrase and a searched plain-text prompt."""

from __future__ import annotations

import pytest
import torch
from concept_guard.core.backend import PLACEHOLDER
from concept_guard.core.errors import ConceptGuardError
from concept_guard.nodes.attack import AttackErasure
from concept_guard.nodes.closed_form import EraseConceptClosedForm
from concept_guard.nodes.shapesworld import LoadShapesWorld, ShapesWorldJudge, ShapesWorldRender

AUTO = dict(method="auto", anchor="", preserve="", eta=0.0, erase_scale=0.0, preserve_scale=0.0, lamb=0.0)


@pytest.fixture(scope="module")
def world():
    with torch.inference_mode():
        model, clip, vae = LoadShapesWorld.execute().result
        node = EraseConceptClosedForm.PREPARE_CLASS_CLONE({"unique_id": "2"})
        edited = node.execute(
            model=model, clip=clip, concepts="circle", rounds=3, file_name="", score=False, **AUTO
        ).result[0]
        (circles,) = ShapesWorldRender.execute(prompt="a circle", count=8, seed=0).result
    return model, edited, clip, vae, circles


def attack(base, edited, clip, vae, images, **overrides):
    node = AttackErasure.PREPARE_CLASS_CLONE({"unique_id": "9"})
    settings = dict(
        concept="a circle", paraphrases="a disc\n\n", search_steps=40, samples=2, steps=10, cfg=5.0
    )
    with torch.inference_mode():
        return node.execute(
            base=base,
            edited=edited,
            clip=clip,
            vae=vae,
            images=images,
            **{**settings, "seed": 0, **overrides},
        ).result


def _rows(report: str) -> dict[str, float]:
    rows = {}
    for line in report.splitlines()[2:-1]:
        value, rest = line.split(maxsplit=1)
        rows[rest.split("  ")[0].strip()] = float(value)
    return rows


def test_the_erased_name_recovers_little_and_the_strongest_attack_is_shown(world):
    model, edited, clip, vae, circles = world
    grid, samples, report = attack(model, edited, clip, vae, circles)
    rows = _rows(report)
    assert set(rows) == {"the concept's name", "paraphrase", "prompt search"}, report
    assert rows["the concept's name"] < 0.3, report  # the edit took the name's margin away
    values = [float(line.split()[0]) for line in report.splitlines()[2:-1]]
    assert values == sorted(values, reverse=True)  # strongest first
    found = report.splitlines()[-1].split("strongest: ")[1]
    assert PLACEHOLDER not in report and found.endswith("a circle'")
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and samples.shape == (2, 32, 32, 3)
    table, _ = ShapesWorldJudge.execute(images=samples, label="circle").result  # the samples feed the judge
    assert "2 images" in table


def test_against_itself_the_name_recovers_all_and_bad_input_is_refused(world):
    model, _, clip, vae, circles = world
    _, _, report = attack(
        model, model, clip, vae, circles, paraphrases="", search_steps=0, samples=1, steps=2
    )
    assert _rows(report) == {"the concept's name": 1.0}
    assert "empty" in AttackErasure.validate_inputs(concept="  ")
    with pytest.raises(ConceptGuardError, match="image"):
        attack(model, model, clip, vae, circles[:0], search_steps=0)
