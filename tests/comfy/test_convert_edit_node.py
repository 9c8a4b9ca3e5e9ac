"""Node "Convert Edit" on ComfyUI's own tiny MODEL (in-process, CPU).

The converted LoRA is loaded by ComfyUI's stock ``LoraLoaderModelOnly``, and the weights *it* computes
are the reference: their distance from the original edit must be the relative error the node reports.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import comfy.model_management
import pytest
import torch
from comfy_harness import CONTEXT_DIM, build_tiny_sdxl
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.comfy_backend.model_info import unet_target
from concept_guard.core.backend import Conditioning
from concept_guard.core.edits.diff_file import read_edit, save_edit
from concept_guard.core.errors import ArchitectureMismatchError, OutputPathError
from concept_guard.nodes import NODE_CLASSES
from concept_guard.nodes.apply_edit import ApplyEditedUNet
from concept_guard.nodes.convert_edit import ConvertEdit
from safetensors import safe_open
from safetensors.torch import save_file

MODULES = (
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",  # Linear 64 -> 32 (reads the text context)
    "output_blocks.1.1.transformer_blocks.0.attn2.to_out.0",  # Linear 64 -> 64, with bias
    "input_blocks.1.1.proj_in",  # 1x1 conv
    "input_blocks.1.0.in_layers.2",  # 3x3 conv, 32 x 288
    "out.2",  # the last 3x3 conv (4 x 288): so the edit moves eps visibly
)
FULL_RANK = 64  # >= min(out, in·kh·kw) of every module above
EDIT = "concept_guard/ours.safetensors"
ERROR_LINE = re.compile(r"rank (\d+): relative approximation error .* = ([0-9.e+-]+)")


def _eps(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 77, CONTEXT_DIM, generator=g)
    return ComfyBackend(model).eps(x, torch.tensor([50, 700]), Conditioning(context=ctx))


def _diff_edit(model, loras: Path) -> dict[str, torch.Tensor]:
    """A full-rank random edit saved as our .diff file ``EDIT`` (fp32, so it is the exact reference)."""
    weights, g, deltas = unet_target(model).weights, torch.Generator().manual_seed(0), {}
    for m in MODULES:
        for kind in ("weight", "bias"):
            if f"{m}.{kind}" in weights:
                deltas[f"{m}.{kind}"] = torch.randn(weights[f"{m}.{kind}"].shape, generator=g) * 0.05
    save_edit(deltas, loras / EDIT, {"concept_guard.method": "esd-x"}, dtype=torch.float32)
    return deltas


def _convert(model, edit: str, to: str, file_name: str, *, rank: int = FULL_RANK, overwrite: bool = False):
    out = ConvertEdit.execute(
        model=model, edit=edit, to=to, rank=rank, file_name=file_name, overwrite=overwrite
    )
    path, report = out.result
    return Path(path), report


def _weights_after_loading(model) -> dict[str, torch.Tensor]:
    """The UNet weights ComfyUI computes for a patched MODEL (loaded by its own model manager)."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return {k: v.detach().float().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_schema():
    schema = ConvertEdit.GET_SCHEMA()
    assert (schema.node_id, schema.display_name, schema.category) == (
        "ConceptGuardConvertEdit",
        "Convert Edit",
        "Concept Guard",
    )
    names = [i.id for i in schema.inputs]
    assert names == ["model", "edit", "to", "rank", "file_name", "overwrite"]
    to, overwrite = schema.inputs[2], schema.inputs[5]
    assert to.options == ["diff", "lora"] and overwrite.default is False
    assert schema.is_output_node and [o.display_name for o in schema.outputs] == ["path", "report"]
    assert "Apply Edited UNet" in schema.description and "CheckpointSave" in schema.description
    assert ConvertEdit in NODE_CLASSES


@pytest.mark.parametrize("rank", [FULL_RANK, 2])
@pytest.mark.parametrize("strength", [1.0, -0.7])
def test_lora_through_stock_loader_matches_diff_through_apply(rank, strength, loras, tiny_model, stock_nodes):
    deltas = _diff_edit(tiny_model, loras)
    base_weights = _weights_after_loading(tiny_model)
    path, report = _convert(tiny_model, EDIT, "lora", f"ours_r{rank}", rank=rank)
    assert path == loras / "concept_guard" / f"ours_r{rank}.safetensors" and path.is_file()
    reported_rank, reported = ERROR_LINE.search(report).groups()
    reported = float(reported)
    assert (
        int(reported_rank) == rank
        and f"Wrote {path} (lora)" in report
        and "Format: Concept Guard .diff" in report
    )
    meta = _metadata(path)
    assert meta["format"] == "concept_guard.lora/1" and meta["concept_guard.rank"] == str(rank)
    assert (
        meta["concept_guard.converted_from"] == "ours.safetensors" and meta["concept_guard.method"] == "esd-x"
    )

    # The reported error is the one of the weights stock ComfyUI builds from the LoRA file.
    (stock,) = stock_nodes.LoraLoaderModelOnly().load_lora_model_only(
        tiny_model, f"concept_guard/{path.name}", 1.0
    )
    loaded = _weights_after_loading(stock)
    residual = sum(float((loaded[k] - base_weights[k] - d).norm()) ** 2 for k, d in deltas.items())
    measured = (residual / sum(float(d.norm()) ** 2 for d in deltas.values())) ** 0.5
    if rank == FULL_RANK:
        assert reported < 1e-3  # fp16 factors: exact up to fp16 rounding
    else:
        assert reported > 0.1
    assert measured == pytest.approx(reported, rel=1e-2, abs=1e-5)

    # eps: the LoRA through the stock loader vs the .diff through our node, at the same strength.
    (stock,) = stock_nodes.LoraLoaderModelOnly().load_lora_model_only(
        tiny_model, f"concept_guard/{path.name}", strength
    )
    ours = ApplyEditedUNet.execute(model=tiny_model, edit=EDIT, strength=strength).result[0]
    base, eps_diff, eps_lora = _eps(tiny_model), _eps(ours), _eps(stock)
    effect = float((eps_diff - base).norm())
    ratio = float((eps_lora - eps_diff).norm()) / effect
    assert effect > 1e-2 * float(base.norm()), (effect, float(base.norm()))
    # An eps error no larger than the weights' (measured: about 1x at full rank, 0.1x at rank 2) ...
    assert ratio <= 2 * reported, (ratio, reported)
    if rank == FULL_RANK:
        torch.testing.assert_close(eps_lora, eps_diff, rtol=0, atol=1e-4)
    else:  # ... and a truncated LoRA is visibly not the edit.
        assert ratio > 0.02, ratio


@pytest.mark.parametrize("rank", [FULL_RANK, 3])
def test_lora_to_diff_round_trip(rank, loras, tiny_model, stock_nodes):
    deltas = _diff_edit(tiny_model, loras)
    lora, _ = _convert(tiny_model, EDIT, "lora", "as_lora", rank=rank)
    back, report = _convert(tiny_model, f"concept_guard/{lora.name}", "diff", "back")
    assert "relative approximation error" not in report and "low-rank LoRA (kohya, LDM names)" in report
    meta = _metadata(back)
    assert (
        meta["format"] == "concept_guard.diff/1"
        and meta["concept_guard.converted_from"] == "as_lora.safetensors"
    )
    assert meta["concept_guard.rank"] == str(rank)  # the LoRA's header travels on
    round_trip, _ = read_edit(back)
    assert set(round_trip) == set(deltas)
    if rank == FULL_RANK:
        for k, d in deltas.items():
            torch.testing.assert_close(round_trip[k], d, rtol=0, atol=2e-4)
    # LoRA -> diff is lossless: the .diff through our node equals the LoRA through the stock loader.
    (stock,) = stock_nodes.LoraLoaderModelOnly().load_lora_model_only(
        tiny_model, f"concept_guard/{lora.name}", 0.8
    )
    ours = ApplyEditedUNet.execute(model=tiny_model, edit=f"concept_guard/{back.name}", strength=0.8).result[
        0
    ]
    torch.testing.assert_close(_eps(ours), _eps(stock), rtol=0, atol=2e-5)


def test_full_weight_file_becomes_its_difference_from_the_model(loras, tiny_model):
    """The MODEL input matters: a partial UNet state dict (diffusers names) converts to ``file - model``."""
    target = unet_target(tiny_model)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    delta = torch.randn(target.weights[key].shape, generator=torch.Generator().manual_seed(3)) * 0.05
    save_file(
        {target.keymap.to_diffusers(key): (target.weights[key] + delta).contiguous()},
        loras / "esd.safetensors",
    )
    path, report = _convert(tiny_model, "esd.safetensors", "diff", "esd_as_diff")
    deltas, _ = read_edit(path)
    assert list(deltas) == [key] and "Applied: 1 tensors" in report
    torch.testing.assert_close(deltas[key], delta, rtol=0, atol=1e-4)


def test_edit_for_another_architecture_is_refused(loras, tiny_model):
    _diff_edit(tiny_model, loras)
    sdxl, _ = build_tiny_sdxl()
    with pytest.raises(ArchitectureMismatchError):
        _convert(sdxl, EDIT, "lora", "xl")
    assert not (loras / "concept_guard" / "xl.safetensors").exists()


def test_existing_file_without_overwrite_is_refused_and_untouched(loras, tiny_model):
    _diff_edit(tiny_model, loras)
    existing = loras / "concept_guard" / "taken.safetensors"
    save_file({"keep": torch.ones(3)}, existing)
    before = _sha(existing)
    with pytest.raises(OutputPathError, match=r"taken\.safetensors' already exists.*overwrite"):
        _convert(tiny_model, EDIT, "lora", "taken")
    assert _sha(existing) == before
    assert sorted(p.name for p in existing.parent.iterdir()) == [
        "ours.safetensors",
        "taken.safetensors",
    ]  # no temp
    path, _ = _convert(tiny_model, EDIT, "lora", "taken.safetensors", overwrite=True)
    assert path == existing and _sha(existing) != before


@pytest.mark.parametrize("name", ["../escape", "sub/name", "/tmp/abs", "..", "a\\b", "  "])
def test_path_like_or_empty_names_are_refused(name, loras, tiny_model, tmp_path):
    _diff_edit(tiny_model, loras)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputPathError, match="file_name"):
        _convert(tiny_model, EDIT, "lora", name)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
