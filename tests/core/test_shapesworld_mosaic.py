"""The committed ShapesWorld mosaic detector: held-out accuracy on clean renders (censor cards included) and on
mosaics of every block size, through the ShapesWorld VAE as generated images are; and its API."""

from __future__ import annotations

import json

import pytest
import torch
from concept_guard.core.errors import ConceptGuardError, ModelLoadError
from concept_guard.core.methods.safegen import pixelate
from concept_guard.shapesworld import world
from concept_guard.shapesworld.mosaic import (
    MosaicDetector,
    MosaicNet,
    MosaicTrainConfig,
    heldout_accuracy,
    load_detector,
    save_detector,
)


@pytest.fixture(scope="module")
def detector():
    return load_detector()


def test_heldout_accuracy_per_block(detector):
    """≥ 95 % everywhere but 4-px cells (one latent cell of the ShapesWorld VAE, which smooths many of them
    away: ≥ 85 %); the model's own samples are clean."""
    acc = heldout_accuracy(detector, n=120, seed=2024)  # neither the training nor the stored eval seed
    assert {"clean", "block_4", "block_8", "block_16", "region", "samples"} <= set(acc)
    stored = json.loads(detector.metadata["heldout_accuracy"])
    for got in (acc, stored):
        assert got["block_4"] >= 0.85 and min(v for k, v in got.items() if k != "block_4") >= 0.95, got


def test_detect_api_and_the_censor_card(detector):
    scenes = [world.Scene(shape="heart", colour="red", r=11), world.Scene(target=True)]
    clean = world.to_tensor(world.render_batch(scenes))
    assert detector.detect(clean) == [False, False]  # the censor card is not a mosaic
    assert detector.detect(pixelate(clean[:1], 8)) == [True]
    big = torch.nn.functional.interpolate(pixelate(clean[:1], 8), scale_factor=2, mode="nearest")
    assert detector.detect(big) == [True]  # resized to 32 px
    with pytest.raises(ConceptGuardError, match=r"`images` must be \[B, 3, H, W\]"):
        detector.detect(clean[0])


def test_load_errors_and_round_trip(tmp_path):
    with pytest.raises(ModelLoadError, match="not found; train one with"):
        load_detector(tmp_path / "none.safetensors")
    path = tmp_path / "small.safetensors"
    save_detector(MosaicDetector(MosaicNet(4)), path, cfg=MosaicTrainConfig(width=4), metrics={})
    assert load_detector(path).net.head.in_features == 16
    from concept_guard.shapesworld import shapesworld_judge_path

    with pytest.raises(ModelLoadError, match="not a mosaic detector"):
        load_detector(shapesworld_judge_path())
    with pytest.raises(ConceptGuardError, match=r"`region_share` must be in \[0, 1\)"):
        MosaicTrainConfig(region_share=1.0)
