"""Node "Erase Concept (ESD)" run in-process on ComfyUI's own tiny MODEL/CLIP, as ComfyUI's executor runs it.

Every run uses a tiny budget (3 iterations, 2 DDIM steps, 8×8 latents) so each test takes seconds; the
ComfyUI ``loras`` folder points into a temp dir, so nothing is written to the ComfyUI tree. The tiny
models are re-initialised at fan-in scale (``tiny_checkpoint.lively_``): with the harness's 0.02-scale
weights the text barely moves eps, which would make "the edit changes eps" vacuous.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import pytest
import torch
from comfy_harness import build_tiny_clip, build_tiny_model, build_tiny_sdxl
from concept_guard import __version__
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.comfy_backend.patches import make_patched_model
from concept_guard.core.edits.diff_file import attach_edit, read_edit
from concept_guard.core.errors import ConceptGuardError, OutputPathError, TrainingDivergedError
from concept_guard.nodes import CATEGORY
from concept_guard.nodes import esd as esd_node
from concept_guard.nodes.esd import EraseConceptESD
from concept_guard.presets import ADV_STEPS_ON
from safetensors import safe_open
from tiny_checkpoint import lively_

import nodes  # ComfyUI's nodes.py (KSampler, LoraLoaderModelOnly ...), not our nodes/ package

FAST = dict(
    method="esd-x",
    anchor="",
    eta=2.0,
    iterations=3,
    lr=1e-2,
    seed=0,
    file_name="",
    overwrite=False,
    guidance=3.0,
    sampling_steps=2,
    resolution=64,
)


@pytest.fixture
def model():
    """Fresh per test (several tests check that it is left bit-identical)."""
    m = build_tiny_model("eps")
    lively_(m.model.diffusion_model, 0)
    return m


@pytest.fixture(scope="module")
def clip():
    c = build_tiny_clip(seed=1)
    lively_(c.cond_stage_model, 1)
    return c


@pytest.fixture
def loras_dir(tmp_path, monkeypatch) -> Path:
    """ComfyUI's ``loras`` folder list = one temp folder (restored after the test)."""
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "loras", ([str(loras)], folder_paths.supported_pt_extensions)
    )
    return loras


def run_node(model, clip, concepts: str = "a red circle", *, in_graph: bool = True, **overrides):
    """Call the node as ComfyUI's executor does: a class clone with the hidden inputs, under inference
    mode (``in_graph=False``: the bare class, as a script would)."""
    node = EraseConceptESD.PREPARE_CLASS_CLONE({"unique_id": "7"}) if in_graph else EraseConceptESD
    with torch.inference_mode():
        out = node.execute(model=model, clip=clip, concepts=concepts, **{**FAST, **overrides})
    return out.result


def weights_sha(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def probe_eps(model, clip, prompt: str = "a red circle") -> torch.Tensor:
    """eps of ``model`` on a fixed x_t, t and prompt (through our ComfyBackend, ComfyUI's apply_model)."""
    return backend_eps(ComfyBackend(model, clip), prompt)


def backend_eps(backend: ComfyBackend, prompt: str = "a red circle") -> torch.Tensor:
    cond = backend.encode_text([prompt]).expand_to(2)
    x = torch.randn(2, backend.latent_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    return backend.eps(x, torch.tensor([50, 600]), cond)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_schema_validates_with_display_name_and_category():
    schema = EraseConceptESD.GET_SCHEMA()  # runs ComfyUI's Schema.validate
    assert schema.node_id == "ConceptGuardEraseESD"
    assert schema.display_name == "Erase Concept (ESD)" and schema.category == CATEGORY == "Concept Guard"
    ids = [i.id for i in schema.inputs]
    assert ids[:2] == ["model", "clip"]
    assert {"concepts", "method", "anchor", "eta", "iterations", "lr", "seed", "file_name"} <= set(ids)
    assert [o.io_type for o in schema.outputs] == ["MODEL", "STRING", "STRING"]
    info = EraseConceptESD.INPUT_TYPES()  # the V1 view ComfyUI serves in /object_info
    assert {"auto", "esd-x"} <= set(info["required"]["method"][1]["options"]) and "resolution" in info[
        "optional"
    ]
    # No "control after generate" widget: the frontend would otherwise re-seed (= retrain) on every queue.
    assert info["required"]["seed"][1]["control_after_generate"] is False


def test_output_model_is_edited_chains_into_ksampler_and_input_is_bit_identical(model, clip, loras_dir):
    sha_before, eps_before = weights_sha(model), probe_eps(model, clip)
    edited, path, _ = run_node(model, clip)
    assert path == "" and files_in(loras_dir) == []  # empty file name: nothing written
    assert weights_sha(model) == sha_before  # checked before anything loads the output MODEL
    assert not model.patches and not model.weight_wrapper_patches
    assert edited is not model and edited.patches and all(".attn2." in k for k in edited.patches)
    eps_edited = probe_eps(edited, clip)
    assert (eps_edited - eps_before).abs().max() > 1e-4  # the edit reaches the forward pass

    # The output chains straight into a stock KSampler (under inference mode, as in a graph).
    with torch.inference_mode():
        (positive,) = nodes.CLIPTextEncode().encode(clip, "a red circle")
        (negative,) = nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
        (samples,) = nodes.KSampler().sample(edited, 1, 2, 3.0, "euler", "normal", positive, negative, latent)
    assert samples["samples"].shape == (1, 4, 8, 8) and torch.isfinite(samples["samples"]).all()

    assert torch.equal(probe_eps(model, clip), eps_before)  # still bit-identical afterwards
    assert weights_sha(model) == sha_before


def test_saved_file_has_diff_keys_metadata_and_loads_through_lora_loader(model, clip, loras_dir):
    edited, path, _ = run_node(model, clip, concepts="a red circle, a star", file_name="no_circles")
    assert Path(path) == loras_dir / "concept_guard" / "no_circles.safetensors"
    assert files_in(loras_dir) == ["concept_guard/no_circles.safetensors"]  # no temp file left behind
    with safe_open(path, framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    assert keys and all(k.startswith("diffusion_model.") and k.endswith((".diff", ".diff_b")) for k in keys)
    assert all(".attn2." in k for k in keys)  # esd-x trains cross-attention only
    assert meta["concept_guard.method"] == "esd-x"
    assert meta["concept_guard.concepts"] == "a red circle, a star" and meta["concept_guard.anchor"] == ""
    assert (meta["concept_guard.eta"], meta["concept_guard.iterations"], meta["concept_guard.lr"]) == (
        "2.0",
        "3",
        "0.01",
    )
    assert meta["concept_guard.base_fingerprint"] == ComfyBackend(model).fingerprint
    assert meta["concept_guard.version"] == __version__
    assert json.loads(meta["concept_guard.config"])["latent_size"] == 8

    eps_node = probe_eps(edited, clip)
    # Stock LoraLoaderModelOnly applies the file exactly as the node's MODEL carries the edit ...
    with torch.inference_mode():
        (via_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(
            model, "concept_guard/no_circles.safetensors", 1.0
        )
    assert set(via_lora.patches) == {
        f"{k.rsplit('.', 1)[0]}.{'bias' if k.endswith('_b') else 'weight'}" for k in keys
    }
    torch.testing.assert_close(probe_eps(via_lora, clip), eps_node, rtol=0, atol=1e-6)
    # ... and the node's MODEL is the base plus exactly the file's deltas.
    deltas, _ = read_edit(path)
    backend = ComfyBackend(model, clip)
    with attach_edit(backend, deltas):
        base_plus_delta = backend_eps(backend)
    torch.testing.assert_close(base_plus_delta, eps_node, rtol=0, atol=1e-5)


def test_existing_file_is_an_error_unless_overwrite(model, clip, loras_dir):
    _, path, _ = run_node(model, clip, file_name="edit", seed=1)
    before = Path(path).read_bytes()
    with pytest.raises(OutputPathError, match="already exists.*turn on `overwrite`"):
        run_node(model, clip, file_name="edit.safetensors", seed=2)
    assert Path(path).read_bytes() == before and files_in(loras_dir) == ["concept_guard/edit.safetensors"]
    _, again, _ = run_node(model, clip, file_name="edit", seed=2, overwrite=True)
    assert again == path and Path(path).read_bytes() != before
    assert json.loads(read_edit(path)[1]["concept_guard.config"])["seed"] == 2


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/tmp/x", "a\\b", "x..y"])
def test_path_like_file_name_is_rejected_before_training(name, model, clip, loras_dir, monkeypatch):
    trained = []
    monkeypatch.setattr(esd_node, "train", lambda *a, **k: trained.append(1))  # must never be reached
    with pytest.raises(OutputPathError, match="bare name.*got"):
        run_node(model, clip, file_name=name)
    assert not trained and files_in(loras_dir.parent.parent) == []


@pytest.mark.parametrize("concepts", ["", "   ", " , ,"])
def test_empty_concept_is_reported_by_validate_inputs_and_execute(concepts, model, clip, loras_dir):
    message = EraseConceptESD.validate_inputs(concepts=concepts)
    assert isinstance(message, str) and "concepts" in message and "empty" in message
    assert EraseConceptESD.validate_inputs(concepts="circle") is True
    with pytest.raises(ConceptGuardError, match="concepts"):
        run_node(model, clip, concepts=concepts, file_name="never")
    assert files_in(loras_dir) == []


def test_interrupt_leaves_the_host_model_untouched_and_writes_nothing(model, clip, loras_dir):
    sha_before, eps_before = weights_sha(model), probe_eps(model, clip)
    steps_seen = []

    def hook(
        value, total, preview, node_id=None
    ):  # ComfyUI's progress hook; the user presses Cancel at step 2
        steps_seen.append(value)
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(model, clip, file_name="interrupted", iterations=10)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    assert [v for v in steps_seen if v] == [1, 2]  # stopped at the next step's check (0 = bank building)
    assert steps_seen[0] == 0
    assert files_in(loras_dir) == []
    assert weights_sha(model) == sha_before
    assert not model.patches and not model.weight_wrapper_patches
    assert torch.equal(probe_eps(model, clip), eps_before)
    assert all(p.is_inference() for p in model.model.parameters())  # training copies swapped back


def test_nan_loss_raises_diverged_and_writes_nothing(model, clip, loras_dir):
    """A broken upstream patch (NaN in the output conv) makes every eps NaN: the NaN guard must stop."""
    out_conv = model.model.diffusion_model.state_dict()["out.2.weight"]
    broken = make_patched_model(model, {"out.2.weight": torch.full_like(out_conv, float("nan"))}, 1.0)
    sha_before = weights_sha(model)
    with pytest.raises(TrainingDivergedError, match="nan.*nothing was written"):
        run_node(broken, clip, file_name="diverged")
    assert files_in(loras_dir) == []
    comfy.model_management.load_models_gpu([model])  # unpatches the shared module
    assert weights_sha(model) == sha_before


def test_execute_works_outside_a_graph(model, clip, loras_dir):
    assert EraseConceptESD.hidden is None  # no executor filled the hidden inputs (unique_id)
    edited, path, _ = run_node(model, clip, in_graph=False, iterations=1)
    assert path == "" and edited.patches


@pytest.mark.parametrize("kind", ["sdxl", "v-prediction"])
def test_sdxl_and_vprediction_models_train(kind, clip, loras_dir):
    if kind == "sdxl":
        model, clip = build_tiny_sdxl()
        lively_(clip.cond_stage_model, 5)
    else:
        model = build_tiny_model("v", seed=3)
    lively_(model.model.diffusion_model, 4)
    sha_before, eps_before = weights_sha(model), probe_eps(model, clip)
    edited, path, _ = run_node(model, clip, file_name=f"edit_{kind}")
    deltas, meta = read_edit(path)
    assert meta["concept_guard.arch"] == ("sdxl" if kind == "sdxl" else "sd2")
    assert deltas and all(".attn2." in k for k in deltas)
    assert weights_sha(model) == sha_before
    assert (probe_eps(edited, clip) - eps_before).abs().max() > 1e-4
    assert torch.equal(probe_eps(model, clip), eps_before)


def test_adversarial_on_trains_against_the_attack_and_leaves_the_input_bit_identical(model, clip, loras_dir):
    sha_before, eps_before = weights_sha(model), probe_eps(model, clip)
    edited, path, report = run_node(model, clip, adversarial="on", file_name="robust")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["concept_guard.adv_steps"] == str(ADV_STEPS_ON) and "adv_steps 100" in report
    assert (probe_eps(edited, clip) - eps_before).abs().max() > 1e-4
    assert torch.equal(probe_eps(model, clip), eps_before) and weights_sha(model) == sha_before
