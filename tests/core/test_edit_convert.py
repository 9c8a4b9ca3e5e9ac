"""Conversions: .diff <-> LoRA (SVD error, exact at full rank) <-> merged pipeline folder / single file, and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from concept_guard.cli import main as cli_main
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.edits.diff_file import attach_edit, save_edit
from concept_guard.core.edits.export import kohya_name, lora_from_deltas, merge_weights
from concept_guard.core.edits.read import read_edit_file
from concept_guard.core.edits.target import TargetUNet
from concept_guard.core.errors import ConceptGuardError
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import tiny_pipeline, to_ldm_checkpoint

TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
TO_OUT = "output_blocks.4.1.transformer_blocks.0.attn2.to_out.0"
PROJ_IN = "input_blocks.1.1.proj_in"
CONV3 = "input_blocks.1.0.in_layers.2"


@pytest.fixture(scope="module")
def target(sd1_backend) -> TargetUNet:
    return TargetUNet.from_backend(sd1_backend)


@pytest.fixture(scope="module")
def deltas(target) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    keys = [f"{m}.weight" for m in (TO_K, TO_OUT, PROJ_IN, CONV3)] + [f"{TO_OUT}.bias"]
    return {k: torch.randn(target.weights[k].shape, generator=g) * 0.05 for k in keys}


def _eps(backend, deltas=None, strength=1.0):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    cond = backend.encode_text(["a red circle", ""])
    with torch.no_grad():
        if deltas is None:
            return backend.eps(x, torch.tensor([900, 30]), cond)
        with attach_edit(backend, deltas, strength):
            return backend.eps(x, torch.tensor([900, 30]), cond)


def test_svd_error_decreases_with_rank_and_full_rank_is_exact(tmp_path, target, deltas):
    errors = [lora_from_deltas(deltas, rank=r, dtype=torch.float32).relative_error for r in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.5  # random matrices are far from rank 1
    full = lora_from_deltas(deltas, rank=32, dtype=torch.float32)  # min(out, in·kh·kw) = 32 for every weight
    assert full.relative_error < 1e-6
    stem = kohya_name(CONV3)
    assert full.tensors[f"{stem}.lora_up.weight"].shape == (32, 32, 1, 1)
    assert full.tensors[f"{stem}.lora_down.weight"].shape == (32, 32, 3, 3)
    assert float(full.tensors[f"{stem}.alpha"]) == 32.0
    save_file(full.tensors, tmp_path / "full.safetensors")
    back = read_edit_file(tmp_path / "full.safetensors", target)
    assert "kohya, LDM names" in back.source_format and set(back.deltas) == set(deltas)
    for key, delta in deltas.items():
        torch.testing.assert_close(back.deltas[key], delta, rtol=0, atol=1e-6)


def test_rank_must_be_positive(deltas):
    with pytest.raises(ConceptGuardError, match="`rank` must be a positive integer, got 0"):
        lora_from_deltas(deltas, rank=0)


def test_merge_weights_keeps_dtype():
    w = {"a.weight": torch.ones(2, 2, dtype=torch.float16)}
    merged = merge_weights(w, {"a.weight": torch.full((2, 2), 0.5)}, 2.0)
    assert merged["a.weight"].dtype == torch.float16 and torch.equal(
        merged["a.weight"], torch.full((2, 2), 2.0).half()
    )
    with pytest.raises(ConceptGuardError, match="has no weights"):
        merge_weights(w, {"b.weight": torch.ones(1)}, 1.0)


def test_cli_diff_to_lora_prints_decreasing_error_and_back(tmp_path, tiny_dirs, target, deltas, capsys):
    diff = save_edit(
        deltas, tmp_path / "e.safetensors", {"concept_guard.method": "esd-x"}, dtype=torch.float32
    )
    printed = []
    for rank in (2, 8, 32):
        out = tmp_path / f"lora{rank}.safetensors"
        assert (
            cli_main(
                [
                    "convert",
                    "--edit",
                    str(diff),
                    "--to",
                    "lora",
                    "--rank",
                    str(rank),
                    "--dtype",
                    "float32",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        line = re.search(r"rank \d+: relative approximation error .* = ([0-9.e+-]+)", capsys.readouterr().out)
        printed.append(float(line.group(1)))
    assert printed[0] > printed[1] > printed[2] and printed[2] < 1e-6
    with safe_open(str(tmp_path / "lora8.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["concept_guard.method"] == "esd-x" and meta["concept_guard.rank"] == "8"
    back = (
        tmp_path / "back.safetensors"
    )  # LoRA -> .diff needs the model (kohya names are matched to its modules)
    assert (
        cli_main(
            [
                "convert",
                "--edit",
                str(tmp_path / "lora32.safetensors"),
                "--to",
                "diff",
                "--dtype",
                "float32",
                "--model",
                str(tiny_dirs("sd1")),
                "--out",
                str(back),
            ]
        )
        == 0
    )
    edit = read_edit_file(back, target)
    assert "Concept Guard .diff" in edit.source_format
    for key, delta in deltas.items():
        torch.testing.assert_close(edit.deltas[key], delta, rtol=0, atol=1e-6)


def test_cli_lora_with_diffusers_names(tmp_path, tiny_dirs, target, deltas, capsys):
    diff = save_edit(deltas, tmp_path / "e.safetensors", {}, dtype=torch.float32)
    out = tmp_path / "lora.safetensors"
    assert (
        cli_main(
            [
                "convert",
                "--edit",
                str(diff),
                "--to",
                "lora",
                "--rank",
                "4",
                "--lora-names",
                "diffusers",
                "--model",
                str(tiny_dirs("sd1")),
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["relative_error"] > 0
    with safe_open(str(out), "pt") as f:
        assert (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in f.keys()
        )
    assert "kohya, diffusers names" in read_edit_file(out, target).source_format


def test_cli_needs_model_for_non_diff_input(tmp_path, capsys):
    save_file(
        {"lora_unet_x.lora_up.weight": torch.zeros(2, 1), "lora_unet_x.lora_down.weight": torch.zeros(1, 2)},
        tmp_path / "l.safetensors",
    )
    assert (
        cli_main(
            [
                "convert",
                "--edit",
                str(tmp_path / "l.safetensors"),
                "--to",
                "diff",
                "--out",
                str(tmp_path / "o.safetensors"),
            ]
        )
        == 2
    )
    assert "pass `--model`" in capsys.readouterr().err


def test_apply_to_pipeline_folder(tmp_path, tiny_dirs, sd1_backend, deltas, capsys):
    diff = save_edit(
        deltas, tmp_path / "e.safetensors", {"concept_guard.concepts": "circle"}, dtype=torch.float32
    )
    out = tmp_path / "merged"
    before = sorted(p.name for p in (tiny_dirs("sd1") / "unet").iterdir())
    assert (
        cli_main(
            [
                "apply",
                "--model",
                str(tiny_dirs("sd1")),
                "--edit",
                str(diff),
                "--strength",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "Applied: 5 tensors" in capsys.readouterr().out
    merged = DiffusersBackend.load(out)
    torch.testing.assert_close(_eps(merged), _eps(sd1_backend, deltas, 0.5), rtol=0, atol=1e-5)
    info = json.loads((out / "concept_guard_edit.json").read_text())
    assert info["concept_guard.strength"] == "0.5" and info["concept_guard.concepts"] == "circle"
    assert sorted(p.name for p in (tiny_dirs("sd1") / "unet").iterdir()) == before
    assert torch.equal(_eps(DiffusersBackend.load(tiny_dirs("sd1"))), _eps(sd1_backend))  # source untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp folder left
    assert cli_main(["apply", "--model", str(tiny_dirs("sd1")), "--edit", str(diff), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "apply",
                "--model",
                str(tiny_dirs("sd1")),
                "--edit",
                str(diff),
                "--out",
                str(tmp_path / "m.safetensors"),
            ]
        )
        == 2
    )
    assert "is a diffusers folder" in capsys.readouterr().err


def test_apply_and_convert_to_single_file_checkpoint(tmp_path, tokenizer_dir, deltas, capsys):
    pipe = tiny_pipeline("sd1", tokenizer_dir)
    ckpt = tmp_path / "base.safetensors"
    save_file(to_ldm_checkpoint(pipe, "sd1"), ckpt)
    base = DiffusersBackend.load(ckpt, tokenizer=tokenizer_dir)
    diff = save_edit(deltas, tmp_path / "e.safetensors", {}, dtype=torch.float32)
    out = tmp_path / "merged.safetensors"
    assert (
        cli_main(
            [
                "convert",
                "--edit",
                str(diff),
                "--to",
                "checkpoint",
                "--model",
                str(ckpt),
                "--strength",
                "1.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    merged = DiffusersBackend.load(out, tokenizer=tokenizer_dir)
    torch.testing.assert_close(_eps(merged), _eps(base, deltas, 1.5), rtol=0, atol=1e-5)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["concept_guard.strength"] == "1.5"
        assert any(k.startswith("first_stage_model.") for k in f.keys())  # VAE and text encoder carried over
    assert (
        cli_main(["apply", "--model", str(ckpt), "--edit", str(diff), "--out", str(tmp_path / "folder")]) == 2
    )
    assert "is a single file: write a .safetensors checkpoint" in capsys.readouterr().err
