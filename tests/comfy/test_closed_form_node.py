"""Node "Erase Concept (closed form)" in-process on ComfyUI's own tiny MODEL/CLIP, as the executor runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfy_harness import build_tiny_clip, build_tiny_model, build_tiny_sdxl
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.comfy_backend.patches import make_patched_model
from concept_guard.core.edits.diff_file import read_edit
from concept_guard.core.errors import ConceptGuardError, OutputPathError
from concept_guard.core.methods.uce import UCE_MODULES
from concept_guard.nodes import closed_form as closed_form_node
from concept_guard.nodes.closed_form import EraseConceptClosedForm
from test_esd_node import files_in, probe_eps, weights_sha
from tiny_checkpoint import lively_

import nodes  # ComfyUI's nodes.py

FAST = dict(
    method="uce",
    anchor="",
    preserve="a blue square, a star",
    eta=0.0,
    erase_scale=0.0,
    preserve_scale=0.0,
    lamb=0.0,
    rounds=2,
    file_name="",
    resolution=64,
)


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


@pytest.fixture
def loras_dir(loras) -> Path:
    """The harness's temp ``loras`` folder, emptied of its ``concept_guard/`` subfolder."""
    (loras / "concept_guard").rmdir()
    return loras


def run_node(model, clip, concepts: str = "a red circle", **overrides):
    node = EraseConceptClosedForm.PREPARE_CLASS_CLONE({"unique_id": "5"})
    with torch.inference_mode():
        out = node.execute(model=model, clip=clip, concepts=concepts, **{**FAST, **overrides})
    return out.result


def test_schema():
    schema = EraseConceptClosedForm.GET_SCHEMA()
    assert schema.node_id == "ConceptGuardEraseClosedForm"
    assert schema.display_name == "Erase Concept (closed form)"
    ids = [i.id for i in schema.inputs]
    assert ids[:3] == ["model", "clip", "concepts"]
    assert {"method", "anchor", "preserve", "eta", "erase_scale", "lamb", "rounds", "file_name"} <= set(ids)
    assert [o.io_type for o in schema.outputs] == ["MODEL", "STRING", "STRING"]
    assert EraseConceptClosedForm.validate_inputs(concepts=" , ").startswith("`concepts` is empty")
    assert "must be one of" in EraseConceptClosedForm.validate_inputs(concepts="x", method="maybe")


def test_unet_weight_reads_what_the_forward_pass_uses_patches_included(model, clip):
    backend = ComfyBackend(model, clip)
    name = UCE_MODULES.select(backend.unet_module_names())[0]
    raw = dict(model.model.diffusion_model.named_modules())[name].weight.detach().float()
    with torch.inference_mode():
        assert torch.equal(backend.unet_weight(name), raw)
        delta = torch.randn(raw.shape, generator=torch.Generator().manual_seed(0))
        patched = make_patched_model(model, {f"{name}.weight": delta})
        read = ComfyBackend(patched, clip).unet_weight(name)
    torch.testing.assert_close(read, raw + delta, rtol=0, atol=1e-6)


def test_node_edits_kv_only_saves_a_file_the_stock_loader_applies_and_leaves_the_input(
    model, clip, loras_dir
):
    sha_before, eps_before = weights_sha(model), probe_eps(model, clip)
    edited, path, report = run_node(model, clip, method="rece", file_name="no_circle")
    assert weights_sha(model) == sha_before and not model.patches
    assert edited.patches and all(
        k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in edited.patches
    )
    assert "solved in" in report and "concept score" in report and "saved" in report
    assert files_in(loras_dir) == ["concept_guard/no_circle.safetensors"]
    deltas, meta = read_edit(path)
    assert meta["concept_guard.method"] == "rece" and "concept_guard.concept_score" in meta
    eps_node = probe_eps(edited, clip)
    assert (eps_node - eps_before).abs().max() > 1e-4
    with torch.inference_mode():
        (via_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(
            model, "concept_guard/no_circle.safetensors", 1.0
        )
    torch.testing.assert_close(probe_eps(via_lora, clip), eps_node, rtol=0, atol=1e-6)
    assert torch.equal(probe_eps(model, clip), eps_before)


def test_stacks_on_an_edited_model(model, clip, loras_dir):
    """Solving on a MODEL that already carries an edit solves against the edited weights, and keeps that edit."""
    first, _, _ = run_node(model, clip, concepts="a star", preserve="a square")
    second, _, _ = run_node(first, clip, concepts="a red circle", preserve="a square")
    assert set(first.patches) <= set(second.patches)
    name = next(iter(first.patches))
    assert len(second.patches[name]) == 2  # the first edit's patch, then the second's


def test_bad_inputs_give_one_reason_and_write_nothing(model, clip, loras_dir, monkeypatch):
    solved = []
    monkeypatch.setattr(closed_form_node, "train", lambda *a, **k: solved.append(1))  # must never run
    with pytest.raises(ConceptGuardError, match="names the erased concept"):
        run_node(model, clip, concepts="circle", preserve="a square, a blue circle", file_name="x")
    with pytest.raises(OutputPathError, match="bare name"):
        run_node(model, clip, file_name="../x")
    assert solved == [] and files_in(loras_dir) == []


def test_existing_file_is_kept_unless_overwrite(model, clip, loras_dir):
    _, path, _ = run_node(model, clip, file_name="edit")
    before = Path(path).read_bytes()
    with pytest.raises(OutputPathError, match="already exists.*turn on `overwrite`"):
        run_node(model, clip, file_name="edit", method="rece")
    assert Path(path).read_bytes() == before
    run_node(model, clip, file_name="edit", method="rece", overwrite=True)
    assert Path(path).read_bytes() != before


def test_sdxl_model():
    model, clip = build_tiny_sdxl()
    lively_(model.model.diffusion_model, 4)
    lively_(clip.cond_stage_model, 5)
    sha = weights_sha(model)
    edited, _, _ = run_node(model, clip, preserve="a square")
    assert edited.patches and weights_sha(model) == sha
