"""The committed ShapesWorld judge: ≥ 98 % held-out accuracy on every head, and its API."""

from __future__ import annotations

import json

import pytest
import torch
from concept_guard.core.errors import ConceptGuardError, ModelLoadError
from concept_guard.shapesworld import world
from concept_guard.shapesworld.judge import (
    JudgeNet,
    JudgeTrainConfig,
    heldout_accuracy,
    load_judge,
    save_judge,
)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_heldout_accuracy_on_every_head(judge):
    acc = heldout_accuracy(
        judge, n=300, seed=2024
    )  # fresh seed: neither the training nor the stored eval set
    assert set(acc) == {"shape", "colour", "background", "style", "target"}
    assert min(acc.values()) >= 0.98, acc
    stored = json.loads(judge.metadata["heldout_accuracy"])
    assert min(stored.values()) >= 0.98


def test_classify_api(judge):
    scenes = [
        world.Scene(shape="star", colour="purple", background="gray", style="outlined", r=11),
        world.Scene(target=True),
    ]
    out = judge.classify(world.to_tensor(world.render_batch(scenes)))
    assert out["shape"][0] == "star" and out["colour"][0] == "purple"
    assert out["background"][0] == "gray" and out["style"][0] == "outlined"
    assert out["target"] == [False, True]


def test_classify_resizes_and_checks_shape(judge):
    img = world.to_tensor(world.render_batch([world.Scene(shape="square", colour="green", r=11)]))
    big = torch.nn.functional.interpolate(img, scale_factor=2, mode="nearest")
    assert judge.classify(big)["shape"] == ["square"]
    with pytest.raises(ConceptGuardError, match=r"`images` must be \[B, 3, H, W\].*got shape \(3, 32, 32\)"):
        judge.classify(img[0])


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found; train one with"):
        load_judge(tmp_path / "none.safetensors")
    path = tmp_path / "other.safetensors"
    from concept_guard.shapesworld.judge import Judge

    save_judge(Judge(JudgeNet(8)), path, cfg=JudgeTrainConfig(width=8), metrics={})
    assert load_judge(path).net.heads["shape"].in_features == 64  # round trip of the config
    from safetensors.torch import load_file, save_file

    save_file(
        load_file(str(path)), str(path), metadata={"labels": json.dumps({"shape": ["x"]}), "config": "{}"}
    )
    with pytest.raises(ModelLoadError, match="was trained for labels"):
        load_judge(path)


def test_config_checks():
    with pytest.raises(ConceptGuardError, match=r"`target_share` must be in \(0, 1\), got 1.5"):
        JudgeTrainConfig(target_share=1.5)
