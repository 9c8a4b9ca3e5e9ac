import os

import pytest
import torch
from concept_guard.core.edits.diff_file import read_edit, save_edit
from concept_guard.core.errors import OutputPathError
from concept_guard.core.files import sanitize_name, save_safetensors_atomic
from safetensors import safe_open


def test_atomic_save_with_metadata_and_no_overwrite(tmp_path):
    p = save_safetensors_atomic({"x": torch.ones(2)}, tmp_path / "a.safetensors", {"n": 3, "s": "v"})
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"n": "3", "s": "v"}
    with pytest.raises(OutputPathError, match="already exists"):
        save_safetensors_atomic({"x": torch.zeros(2)}, p)
    with safe_open(str(p), "pt") as f:
        assert torch.equal(f.get_tensor("x"), torch.ones(2))
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_missing_or_unwritable_folder(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        save_safetensors_atomic({"x": torch.ones(1)}, tmp_path / "nope" / "a.safetensors")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(OutputPathError, match="not writable"):
            save_safetensors_atomic({"x": torch.ones(1)}, ro / "a.safetensors")
    finally:
        ro.chmod(0o700)


def test_failed_write_leaves_nothing(tmp_path):
    shared = torch.ones(4)  # safetensors refuses tensors that share memory, after the temp file exists
    with pytest.raises(RuntimeError, match="share memory"):
        save_safetensors_atomic({"x": shared, "y": shared}, tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["", "  ", "../x", "a/b", "a\\b", "..", "ünï", ".hidden", "x" * 200])
def test_sanitize_name_rejects(bad):
    with pytest.raises(OutputPathError, match="bare name"):
        sanitize_name(bad)


def test_sanitize_name_accepts():
    assert sanitize_name(" no_circles-v1.2 ") == "no_circles-v1.2"


def test_edit_round_trip_keys_and_metadata(tmp_path):
    deltas = {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(4, 3),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": torch.randn(4),
    }
    p = save_edit(deltas, tmp_path / "e.safetensors", {"concept_guard.method": "esd-x"}, dtype=torch.float32)
    with safe_open(str(p), "pt") as f:
        assert sorted(f.keys()) == [
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.diff",
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.diff_b",
        ]
    back, meta = read_edit(p)
    assert meta["format"] == "concept_guard.diff/1" and meta["concept_guard.method"] == "esd-x"
    assert set(back) == set(deltas) and all(torch.equal(back[k], deltas[k]) for k in deltas)


def test_attach_edit_reproduces_trained_model_and_detaches(sd1_backend):
    from concept_guard.core.edits.diff_file import attach_edit
    from concept_guard.core.errors import ArchitectureMismatchError

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, sd1_backend.latent_channels, 8, 8, generator=g)
    cond = sd1_backend.encode_text(["a red circle"])
    t = torch.tensor([400])
    with torch.no_grad():
        base = sd1_backend.eps(x, t, cond)
    name = next(n for n in sd1_backend.unet_module_names() if n.endswith("attn2.to_k"))
    ds = sd1_backend.attach_deltas([name])
    with torch.no_grad():
        ds[name].weight.normal_(0, 0.05, generator=g)
        trained = sd1_backend.eps(x, t, cond)
    deltas = ds.state_dict_ldm()
    ds.detach()
    with attach_edit(sd1_backend, deltas, 1.0), torch.no_grad():
        torch.testing.assert_close(sd1_backend.eps(x, t, cond), trained, rtol=0, atol=1e-6)
    with attach_edit(sd1_backend, deltas, 0.0), torch.no_grad():
        assert torch.equal(sd1_backend.eps(x, t, cond), base)
    with torch.no_grad():
        assert torch.equal(sd1_backend.eps(x, t, cond), base)
    with pytest.raises(ArchitectureMismatchError, match="does not have"):
        attach_edit(sd1_backend, {"input_blocks.99.1.proj_in.weight": torch.zeros(1)})
    with pytest.raises(ArchitectureMismatchError, match="shape"):
        attach_edit(sd1_backend, {f"{name}.weight": torch.zeros(1, 1)})
    with torch.no_grad():
        assert torch.equal(sd1_backend.eps(x, t, cond), base)
