"""The demo nodes: Load ShapesWorld, ShapesWorld Judge, Compare Models — on ComfyUI's own classes."""

from __future__ import annotations

import pytest
import torch
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.comfy_backend.compare import sample_models
from concept_guard.core.errors import ConceptGuardError
from concept_guard.core.grid import grid_tensor, labelled_grid
from concept_guard.core.methods.safegen import pixelate
from concept_guard.nodes.compare import CompareModels
from concept_guard.nodes.shapesworld import LoadShapesWorld, ShapesWorldJudge, ShapesWorldRender
from concept_guard.presets import esd_settings, model_family
from concept_guard.shapesworld import shapesworld_fingerprint, world


@pytest.fixture(scope="module")
def loaded():
    with torch.inference_mode():
        return LoadShapesWorld.execute().result


def test_load_node_gives_the_demo_model_that_auto_settings_recognise(loaded):
    model, clip, vae = loaded
    backend = ComfyBackend(model, clip, vae)
    assert backend.native_latent_size == 8 and backend.vae_scale_factor == 4
    assert backend.fingerprint == shapesworld_fingerprint() and model_family(backend) == "shapesworld"
    assert esd_settings(backend, "circle", {})["method"] == "esd-x-strict"


def test_judge_node_counts_the_label():
    images, _ = world.render_prompt("a red circle on a white background", 6, seed=0)
    batch = world.to_tensor(images).movedim(1, -1)  # ComfyUI IMAGE: [B, H, W, C]
    table, rate = ShapesWorldJudge.execute(images=batch, label="circle").result
    assert rate == 1.0 and "6 images" in table and "circle 1.00" in table
    _, red = ShapesWorldJudge.execute(images=batch, label="Red").result
    _, star = ShapesWorldJudge.execute(images=batch, label="star").result
    assert (red, star) == (1.0, 0.0)
    assert ShapesWorldJudge.validate_inputs(label="circle") is True
    assert "not a ShapesWorld label" in ShapesWorldJudge.validate_inputs(label="dog")


def test_render_node_draws_the_prompt_and_the_judge_counts_mosaics():
    (hearts,) = ShapesWorldRender.execute(prompt="an outlined heart", count=5, seed=3).result
    assert hearts.shape == (5, 32, 32, 3) and 0 <= float(hearts.min()) and float(hearts.max()) <= 1
    table, rate = ShapesWorldJudge.execute(images=hearts, label="heart").result
    assert rate == 1.0 and "outlined 1.00" in table and "mosaic     0.00" in table
    (again,) = ShapesWorldRender.execute(prompt="an outlined heart", count=5, seed=3).result
    assert torch.equal(hearts, again)
    blocky = pixelate(hearts.movedim(-1, 1), 8).movedim(1, -1)
    _, mosaic = ShapesWorldJudge.execute(images=blocky, label="mosaic").result
    assert mosaic == 1.0
    assert ShapesWorldJudge.validate_inputs(label="mosaic") is True
    assert "empty" in ShapesWorldRender.validate_inputs(prompt="  ")


def test_compare_node_lays_out_the_same_seeds_side_by_side(loaded):
    model, clip, vae = loaded
    lines = ["a red circle on a white background", "a blue square, with a much longer description that wraps"]
    with torch.inference_mode():
        images = sample_models([model, model], clip, vae, lines, seed=3, samples=2, steps=4, cfg=5.0)
        grid, report = CompareModels.execute(
            base=model,
            edited=model,
            clip=clip,
            vae=vae,
            prompts="\n".join(lines),
            seed=3,
            samples=2,
            steps=4,
            cfg=5.0,
        ).result
    for base, edited in images:  # the same MODEL twice: the same noise per prompt gives the same pixels
        assert base.shape == (2, 3, 32, 32) and torch.equal(base, edited)
    assert not torch.equal(images[0][0], images[1][0])  # prompts differ
    expected = grid_tensor(labelled_grid(lines, ["base", "edited"], images))
    assert torch.equal(grid, expected)
    assert report.count("+1.00") == 2  # a MODEL compared with itself keeps every prompt's guidance
    assert CompareModels.validate_inputs(prompts=" \n ") != True  # noqa: E712
    with pytest.raises(ConceptGuardError, match="prompts"):
        CompareModels.execute(
            base=model, edited=model, clip=clip, vae=vae, prompts="", seed=0, samples=1, steps=1, cfg=1.0
        )


def test_compare_node_scores_an_erased_concept_low_and_the_rest_near_one(loaded):
    from concept_guard.nodes.closed_form import EraseConceptClosedForm

    model, clip, vae = loaded
    node = EraseConceptClosedForm.PREPARE_CLASS_CLONE({"unique_id": "7"})
    with torch.inference_mode():
        edited, _, erase_report = node.execute(
            model=model,
            clip=clip,
            concepts="circle",
            method="auto",
            anchor="",
            preserve="",
            eta=0.0,
            erase_scale=0.0,
            preserve_scale=0.0,
            lamb=0.0,
            rounds=3,
            file_name="",
            score=False,
        ).result
        _, report = CompareModels.execute(
            base=model,
            edited=edited,
            edited_2=model,
            clip=clip,
            vae=vae,
            prompts="a circle\na blue square",
            seed=0,
            samples=1,
            steps=2,
            cfg=5.0,
        ).result
        _, silent = CompareModels.execute(
            base=model,
            edited=edited,
            clip=clip,
            vae=vae,
            prompts="a circle",
            seed=0,
            samples=1,
            steps=2,
            cfg=5.0,
            score=False,
        ).result
    rows = {line.split()[-3]: [float(v) for v in line.split()[-2:]] for line in report.splitlines()[2:]}
    assert "edited 2" in report.splitlines()[1] and silent == ""
    assert "concept score: off" in erase_report
    (circle, circle_same), (square, square_same) = rows["circle"], rows["square"]
    assert circle < 0.5 and square > 0.7 and circle_same == square_same == 1.0, report
