"""The committed ShapesWorld model: an SD1.x-format pipeline folder that loads offline and works.

The quality test is loose (few samples); the full baseline is
``concept-guard eval --model shapesworld --prompt-set baseline --samples 32``.
"""

from __future__ import annotations

import json

import pytest
import torch
from concept_guard.shapesworld import load_shapesworld, shapesworld_model_path
from concept_guard.shapesworld.evaluate import EvalConfig, evaluate
from concept_guard.shapesworld.model import folder_bytes, load_pipeline
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

MODEL = shapesworld_model_path()


@pytest.fixture(scope="module")
def backend():
    return load_shapesworld()


def test_folder_is_sd1_format_fp16_and_small():
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        with safe_open(str(MODEL / f"{part}.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, part
    assert folder_bytes(MODEL) <= 25_000_000
    sched = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert (sched["num_train_timesteps"], sched["prediction_type"]) == (1000, "epsilon")


def test_loads_offline_as_a_stable_diffusion_pipeline():
    pipe = load_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert pipe.text_encoder.config.vocab_size == 49408 and pipe.text_encoder.config.hidden_size == 128
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert 0.2 < pipe.vae.config.scaling_factor < 5.0 and pipe.vae.config.scaling_factor != 0.18215
    out = pipe(
        "a red circle",
        num_inference_steps=4,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 32, 32)


def test_backend_sees_an_sd1_model(backend):
    assert backend.arch == "sd1" and backend.vae_scale_factor == 4 and backend.native_latent_size == 8
    assert backend.encode_text(["a red circle"]).context.shape == (1, 77, 128)


def test_recognises_prompted_shapes_and_colours(backend):
    """Loose version of the baseline bar (≥ 0.9 at 32 samples): 6 prompts × 8 samples."""
    prompts = [
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow star",
        "a purple heart",
        "a crimson disc",
    ]
    report = evaluate(backend, prompts, EvalConfig(samples=8, seed=100))
    s = report["summary"]
    assert s["shape_match"] >= 0.75 and s["colour_match"] >= 0.75, report["summary"]
    assert s["synonym_match"] >= 0.6, report["summary"]


def test_censor_prompt_gives_the_target_pattern(backend):
    report = evaluate(backend, ["a censored image"], EvalConfig(samples=8, seed=7))
    assert report["prompts"][0]["rates"]["target"] >= 0.75
    plain = evaluate(backend, ["a blue square"], EvalConfig(samples=8, seed=7))
    assert plain["prompts"][0]["rates"]["target"] <= 0.25
