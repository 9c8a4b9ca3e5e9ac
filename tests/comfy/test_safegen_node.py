"""Node "Erase Visual Concept (SafeGen)" in-process on ComfyUI's own tiny MODEL/CLIP/VAE, as the executor runs it.

Tiny budgets (3 steps, 64 px images) keep each test to seconds; the ``loras`` folder is a temp dir.
"""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
import pytest
import torch
from comfy_harness import build_tiny_clip, build_tiny_model, build_tiny_sdxl, build_tiny_vae
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.core.edits.diff_file import attach_edit, read_edit
from concept_guard.core.errors import ConceptGuardError, OutputPathError
from concept_guard.nodes.safegen import EraseVisualConceptSafeGen
from test_esd_node import backend_eps, files_in, weights_sha
from tiny_checkpoint import lively_

import nodes  # ComfyUI's nodes.py

FAST = dict(mosaic_block=16, steps=3, lr=1e-3, seed=0, file_name="", resolution=64)


@pytest.fixture
def model():
    m = build_tiny_model("eps")
    lively_(m.model.diffusion_model, 0)
    return m


@pytest.fixture(scope="module")
def clip():
    c = build_tiny_clip(seed=1)
    lively_(c.cond_stage_model, 1)
    return c


@pytest.fixture(scope="module")
def vae():
    return build_tiny_vae()


@pytest.fixture
def loras_dir(loras) -> Path:
    """The harness's temp ``loras`` folder, emptied of its ``concept_guard/`` subfolder."""
    (loras / "concept_guard").rmdir()
    return loras


def images(n: int = 3, side: int = 64, seed: int = 1) -> torch.Tensor:
    with torch.inference_mode():
        return torch.rand(n, side, side, 3, generator=torch.Generator().manual_seed(seed))


def run_node(model, clip, vae, imgs=None, **overrides):
    node = EraseVisualConceptSafeGen.PREPARE_CLASS_CLONE({"unique_id": "9"})
    with torch.inference_mode():
        out = node.execute(
            model=model,
            clip=clip,
            vae=vae,
            images=images() if imgs is None else imgs,
            **{**FAST, **overrides},
        )
    return out.result


def probe(model, clip) -> torch.Tensor:
    return backend_eps(ComfyBackend(model, clip), "a red heart")


def test_schema():
    schema = EraseVisualConceptSafeGen.GET_SCHEMA()
    assert schema.node_id == "ConceptGuardSafeGen" and schema.display_name == "Erase Visual Concept (SafeGen)"
    ids = [i.id for i in schema.inputs]
    assert ids[:4] == ["model", "clip", "vae", "images"]
    assert {"benign_images", "mask", "mosaic_block", "steps", "lr", "seed", "file_name", "low_memory"} <= set(
        ids
    )
    assert [o.io_type for o in schema.outputs] == ["MODEL", "STRING", "STRING"]


def test_edit_is_attn1_only_saved_loadable_and_the_host_is_bit_identical(model, clip, vae, loras_dir):
    sha, eps_before = weights_sha(model), probe(model, clip)
    benign = images(2, 48, seed=5)  # another size: resized to 64 px
    edited, path, report = run_node(model, clip, vae, benign_images=benign, file_name="no_hearts")
    assert Path(path) == loras_dir / "concept_guard" / "no_hearts.safetensors"
    assert files_in(loras_dir) == ["concept_guard/no_hearts.safetensors"]
    assert weights_sha(model) == sha and not model.patches
    assert edited.patches and all(".attn1." in k for k in edited.patches)
    eps_edited = probe(edited, clip)
    assert (eps_edited - eps_before).abs().max() > 1e-5
    assert "mosaic_block 16" in report and "saved" in report
    deltas, meta = read_edit(path)
    assert meta["concept_guard.method"] == "safegen" and meta["concept_guard.images"] == "3"
    assert all(".attn1." in k for k in deltas)
    with torch.inference_mode():  # stock LoraLoaderModelOnly applies the same edit
        (via_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(
            model, "concept_guard/no_hearts.safetensors", 1.0
        )
    torch.testing.assert_close(probe(via_lora, clip), eps_edited, rtol=0, atol=1e-6)
    backend = ComfyBackend(model, clip)
    with attach_edit(backend, deltas):
        torch.testing.assert_close(backend_eps(backend, "a red heart"), eps_edited, rtol=0, atol=1e-5)
    # chains into a stock KSampler
    with torch.inference_mode():
        (pos,) = nodes.CLIPTextEncode().encode(clip, "a red heart")
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
        (samples,) = nodes.KSampler().sample(edited, 1, 2, 3.0, "euler", "normal", pos, pos, latent)
    assert torch.isfinite(samples["samples"]).all()
    assert torch.equal(probe(model, clip), eps_before) and weights_sha(model) == sha


def test_benign_prompts_mask_and_sdxl(clip, vae, loras_dir):
    model, xclip = build_tiny_sdxl()
    lively_(model.model.diffusion_model, 4)
    sha = weights_sha(model)
    with torch.inference_mode():
        mask = torch.zeros(1, 64, 64)
        mask[:, 16:48, 16:48] = 1
    edited, path, _ = run_node(
        model, xclip, vae, benign_prompts="a cat, a dog", mask=mask, file_name="xl", steps=2
    )
    deltas, meta = read_edit(path)
    assert meta["concept_guard.arch"] == "sdxl" and all(".attn1." in k for k in deltas)
    assert weights_sha(model) == sha and edited.patches


def test_bad_inputs_are_refused_and_write_nothing(model, clip, vae, loras_dir):
    with torch.inference_mode():
        empty = torch.zeros(0, 64, 64, 3)
        bad_mask = torch.ones(1, 32, 32)
    with pytest.raises(ConceptGuardError, match="No images"):
        run_node(model, clip, vae, empty, file_name="a")
    with pytest.raises(ConceptGuardError, match="Mask 0 is"):
        run_node(model, clip, vae, mask=bad_mask, file_name="b")
    for bad in ("../up", "sub/dir"):
        with pytest.raises(OutputPathError, match="bare name"):
            run_node(model, clip, vae, file_name=bad)
    run_node(model, clip, vae, file_name="taken", steps=1)
    before = (loras_dir / "concept_guard" / "taken.safetensors").read_bytes()
    with pytest.raises(OutputPathError, match="already exists"):
        run_node(model, clip, vae, file_name="taken", steps=1)
    assert (loras_dir / "concept_guard" / "taken.safetensors").read_bytes() == before
    assert files_in(loras_dir) == ["concept_guard/taken.safetensors"]


def test_interrupt_writes_nothing_and_keeps_the_host(model, clip, vae, loras_dir):
    sha = weights_sha(model)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(model, clip, vae, file_name="stopped", steps=20)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert files_in(loras_dir) == [] and weights_sha(model) == sha
    assert all(p.is_inference() for p in model.model.parameters())
