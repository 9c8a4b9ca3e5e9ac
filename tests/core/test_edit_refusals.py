"""Edit files that are refused, or read only in part: unknown keys, another architecture, wrong shapes,
NaN/inf values, pickled code, files that hold no edit, and LoRA variants the reader does not implement.

The accepted formats are in ``test_edit_formats.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from concept_guard.core.edits.read import read_edit_file
from concept_guard.core.edits.target import TargetUNet
from concept_guard.core.errors import ArchitectureMismatchError, EditFileError
from safetensors.torch import save_file

TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
TO_OUT = "output_blocks.4.1.transformer_blocks.0.attn2.to_out.0"


@pytest.fixture(scope="module")
def target(sd1_backend) -> TargetUNet:
    return TargetUNet.from_backend(sd1_backend)


def test_unknown_keys_are_reported_and_strict_refuses(tmp_path, target):
    tensors = {
        f"diffusion_model.{TO_K}.diff": torch.full(target.weights[f"{TO_K}.weight"].shape, 0.01),
        "diffusion_model.input_blocks.99.1.proj_in.diff": torch.ones(3),
        "some_counter": torch.tensor(3),
    }
    save_file(tensors, tmp_path / "e.safetensors")
    edit = read_edit_file(tmp_path / "e.safetensors", target)
    assert edit.applied == (f"{TO_K}.weight",)
    reasons = dict(edit.ignored)
    assert (
        "has no module 'diffusion_model.input_blocks.99.1.proj_in'"
        in reasons["diffusion_model.input_blocks.99.1.proj_in.diff"]
    )
    assert reasons["some_counter"].startswith("unknown key")
    with pytest.raises(EditFileError, match="2 keys .* would not be applied"):
        read_edit_file(tmp_path / "e.safetensors", target, strict=True)


def test_sdxl_edit_onto_sd1_names_both(tmp_path, target):
    """A kohya SDXL LoRA (2048-wide text states) onto SD1: refused before any key is mapped."""
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    save_file(
        {
            f"{stem}.lora_up.weight": torch.zeros(640, 4),
            f"{stem}.lora_down.weight": torch.zeros(4, 2048),
            f"{stem}.alpha": torch.tensor(4.0),
        },
        tmp_path / "xl.safetensors",
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
    )
    with pytest.raises(
        ArchitectureMismatchError, match=r"made for SDXL .*2048.* loaded model is SD1\.x \(32-wide\)"
    ):
        read_edit_file(tmp_path / "xl.safetensors", target)


def test_edit_of_the_tiny_sdxl_model_onto_sd1(tmp_path, sdxl_backend, target):
    xl = TargetUNet.from_backend(sdxl_backend)
    key = next(k for k in xl.weights if k.endswith("attn2.to_k.weight"))
    save_file({xl.keymap.to_diffusers(key): xl.weights[key] + 0.1}, tmp_path / "esd_xl.safetensors")
    with pytest.raises(ArchitectureMismatchError, match=r"64-wide .* loaded model is SD1\.x \(32-wide\)"):
        read_edit_file(tmp_path / "esd_xl.safetensors", target)


def test_wrong_shapes_are_refused(tmp_path, target):
    out, inp = target.weights[f"{TO_OUT}.weight"].shape
    stem = "lora_unet_" + TO_OUT.replace(".", "_")
    save_file(
        {f"{stem}.lora_up.weight": torch.zeros(out + 1, 2), f"{stem}.lora_down.weight": torch.zeros(2, inp)},
        tmp_path / "bad.safetensors",
    )
    with pytest.raises(
        ArchitectureMismatchError,
        match=rf"shape \({out + 1}, {inp}\), the model's {TO_OUT}.weight is \({out}, {inp}\)",
    ):
        read_edit_file(tmp_path / "bad.safetensors", target)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_refused(tmp_path, target, bad):
    delta = torch.zeros(target.weights[f"{TO_K}.weight"].shape)
    delta[0, 0] = bad
    save_file({f"diffusion_model.{TO_K}.diff": delta}, tmp_path / "nan.safetensors")
    with pytest.raises(EditFileError, match="NaN/inf values in 1 tensors"):
        read_edit_file(tmp_path / "nan.safetensors", target)


class _Exploit:
    """Unpickling this would run a shell command (the classic malicious-checkpoint trick)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, target):
    marker = tmp_path / "pwned"
    torch.save(
        {"state_dict": {f"model.diffusion_model.{TO_K}.weight": _Exploit(marker)}}, tmp_path / "evil.ckpt"
    )
    with pytest.raises(EditFileError, match="Refused to load .*not plain tensors"):
        read_edit_file(tmp_path / "evil.ckpt", target)
    assert not marker.exists()


def test_non_edit_files_are_refused(tmp_path, target):
    (tmp_path / "notes.safetensors").write_text("just some text, named like a model")
    with pytest.raises(EditFileError, match="is not an edit file: it is neither safetensors nor a PyTorch"):
        read_edit_file(tmp_path / "notes.safetensors", target)
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "vae.safetensors")
    with pytest.raises(EditFileError, match="holds no edit for this SD1.x UNet"):
        read_edit_file(tmp_path / "vae.safetensors", target)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(EditFileError, match="holds a list, expected a state dict"):
        read_edit_file(tmp_path / "list.pt", target)


def test_unsupported_lora_variant_is_refused(tmp_path, target):
    stem = "lora_unet_" + TO_K.replace(".", "_")
    save_file(
        {
            f"{stem}.lora_up.weight": torch.zeros(32, 2),
            f"{stem}.lora_down.weight": torch.zeros(2, 32),
            f"{stem}.dora_scale": torch.ones(32, 1),
        },
        tmp_path / "dora.safetensors",
    )
    with pytest.raises(EditFileError, match="DoRA"):
        read_edit_file(tmp_path / "dora.safetensors", target)
