import os

import pytest
import torch
from concept_guard.core.edits import read_edit, save_edit
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
    deltas = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(4, 3),
              "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": torch.randn(4)}
    p = save_edit(deltas, tmp_path / "e.safetensors", {"concept_guard.method": "esd-x"}, dtype=torch.float32)
    with safe_open(str(p), "pt") as f:
        assert sorted(f.keys()) == [
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.diff",
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.diff_b",
        ]
    back, meta = read_edit(p)
    assert meta["format"] == "concept_guard.diff/1" and meta["concept_guard.method"] == "esd-x"
    assert set(back) == set(deltas) and all(torch.equal(back[k], deltas[k]) for k in deltas)
