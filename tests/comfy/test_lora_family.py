"""Node "Apply Edited UNet" on LoRA-family files: applied by ComfyUI's own LoRA loader (in-process, CPU).

Expected results come from outside the code under test: for the plain LoRAs the node read before (kohya,
peft), Concept Guard's reader's deltas (W + s·ΔW: the replaced code path); for LoCon, LoHa, LoKr, DoRA and
OFT, ComfyUI's stock ``LoraLoaderModelOnly`` on the same file. Files are built here with random small
tensors, keyed with names ``comfy.lora.model_lora_keys_unet`` maps for the tiny UNet.
"""

from __future__ import annotations

import comfy.lora
import comfy.model_management
import pytest
import torch
from concept_guard.comfy_backend.model_info import unet_target
from concept_guard.core.edits.read import read_edit_file
from concept_guard.core.errors import ArchitectureMismatchError, EditFileError
from concept_guard.nodes.apply_edit import ApplyEditedUNet
from safetensors.torch import save_file

TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # Linear [32, 64]
PROJ_IN = "input_blocks.1.1.proj_in"  # 1x1 conv [32, 32, 1, 1]
CONV3 = "input_blocks.1.0.in_layers.2"  # 3x3 conv [32, 32, 3, 3]
FF_OUT = "input_blocks.1.1.transformer_blocks.0.ff.net.2"  # Linear [32, 128]
TE = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + sum(shape))) * 0.1


def _name(model, module: str, style: str = "kohya") -> str:
    """The file stem of ``module`` in ``style``, checked to be one ``model_lora_keys_unet`` maps for this model."""
    diffusers = unet_target(model).diffusers_module(module)
    stem = {
        "kohya": "lora_unet_" + diffusers.replace(".", "_"),
        "kohya_ldm": "lora_unet_" + module.replace(".", "_"),
        "lycoris": "lycoris_" + diffusers.replace(".", "_"),
        "peft": "unet." + diffusers,
    }[style]
    assert comfy.lora.model_lora_keys_unet(model.model, {}).get(stem) == f"diffusion_model.{module}.weight", (
        stem
    )
    return stem


def _weights(model) -> dict[str, torch.Tensor]:
    """The UNet weights of ``model`` as ComfyUI computes them when it loads the MODEL (patches applied)."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def _apply(model, name: str, strength: float):
    out = ApplyEditedUNet.execute(model=model, edit=name, strength=strength)
    return out.result[0], out.result[1]


def _lora(
    stem: str, out: int, down_shape: tuple[int, ...], rank: int = 3, **extra
) -> dict[str, torch.Tensor]:
    up_shape = (out, rank, 1, 1) if len(down_shape) == 3 else (out, rank)
    return {
        f"{stem}.lora_up.weight": _rand(*up_shape),
        f"{stem}.lora_down.weight": _rand(rank, *down_shape, seed=1),
        f"{stem}.alpha": torch.tensor(2.0),
        **{f"{stem}.{part}": t for part, t in extra.items()},
    }


def _variant(kind: str, model) -> tuple[dict[str, torch.Tensor], int]:
    """(file tensors, number of UNet weights it patches) for one LoRA-family variant."""
    k, conv, proj = _name(model, TO_K), _name(model, CONV3), _name(model, PROJ_IN)
    if kind == "LoCon":  # Tucker (lora_mid) on a 3x3 conv + a plain 3x3-conv LoRA via lycoris_ names
        tucker = {
            f"{conv}.lora_up.weight": _rand(32, 4, 1, 1),
            f"{conv}.lora_down.weight": _rand(4, 32, 1, 1, seed=1),
            f"{conv}.lora_mid.weight": _rand(4, 4, 3, 3, seed=2),
            f"{conv}.alpha": torch.tensor(2.0),
        }
        lyco = _name(model, "input_blocks.3.0.in_layers.2", "lycoris")  # [64, 32, 3, 3]
        return tucker | _lora(lyco, 64, (32, 3, 3)), 2
    if kind == "LoHa":  # Linear, and a 3x3 conv with flattened factors (LyCORIS without Tucker)
        hada = {}
        for stem, out, inp in ((k, 32, 64), (conv, 32, 32 * 9)):
            for i in (1, 2):
                hada[f"{stem}.hada_w{i}_a"] = _rand(out, 4, seed=i)
                hada[f"{stem}.hada_w{i}_b"] = _rand(4, inp, seed=10 + i)
            hada[f"{stem}.alpha"] = torch.tensor(4.0)
        return hada, 2
    if kind == "LoKr":  # full w1 ⊗ low-rank w2 on a Linear; full w1 ⊗ 4-D w2 on a 3x3 conv
        lokr = {
            f"{k}.lokr_w1": _rand(4, 4),
            f"{k}.lokr_w2_a": _rand(8, 2, seed=1),
            f"{k}.lokr_w2_b": _rand(2, 16, seed=2),
            f"{k}.alpha": torch.tensor(1.0),
            f"{conv}.lokr_w1": _rand(4, 4, seed=3),
            f"{conv}.lokr_w2": _rand(8, 8, 3, 3, seed=4),
        }
        return lokr, 2
    if kind == "DoRA":  # LoRA + dora_scale (magnitude per output channel) on a Linear and a 1x1 conv
        dora = _lora(k, 32, (64,), dora_scale=1 + _rand(32, 1, seed=5))
        return dora | _lora(proj, 32, (32, 1, 1), dora_scale=1 + _rand(32, 1, 1, 1, seed=6)), 2
    assert kind == "OFT"  # block-diagonal rotation of the output channels, constrained by alpha
    return {f"{k}.oft_blocks": _rand(4, 8, 8), f"{k}.alpha": torch.tensor(0.5)}, 1


def _save(loras, name: str, tensors: dict[str, torch.Tensor]) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, loras / name)
    return name


def _changed(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in base if not torch.equal(weights[k], base[k])}


# ----- the plain LoRAs the node read before: same weights as Concept Guard's reader ---------------------


def _plain(kind: str, model) -> dict[str, torch.Tensor]:
    """kohya (LDM or diffusers names, alpha) or diffusers/peft ``unet.…lora_A/lora_B`` (no alpha: scale 1)."""
    if kind != "peft":
        style = "kohya_ldm" if kind == "kohya_ldm" else "kohya"
        return (
            _lora(_name(model, TO_K, style), 32, (64,))
            | _lora(_name(model, PROJ_IN, style), 32, (32, 1, 1))
            | _lora(_name(model, CONV3, style), 32, (32, 3, 3))
            | _lora(_name(model, FF_OUT, style), 32, (128,))
        )
    out = {}
    for module, shape in ((CONV3, (32, 32, 3, 3)), (PROJ_IN, (32, 32, 1, 1)), (FF_OUT, (32, 128))):
        stem = _name(model, module, "peft")
        up = _rand(shape[0], 2, *([1, 1] if len(shape) == 4 else []))
        out |= {f"{stem}.lora_B.weight": up, f"{stem}.lora_A.weight": _rand(2, *shape[1:], seed=1)}
    return out


@pytest.mark.parametrize("kind", ["kohya_ldm", "kohya_diffusers", "peft"])
@pytest.mark.parametrize("strength", [0.7, -1.3])
def test_plain_lora_same_weights_as_our_reader(kind, strength, loras, tiny_model):
    name = _save(loras, f"{kind}.safetensors", _plain(kind, tiny_model))
    deltas = read_edit_file(loras / name, unet_target(tiny_model)).deltas
    base = _weights(tiny_model)
    edited, report = _apply(tiny_model, name, strength)
    assert f"applied by ComfyUI's loader: {len(deltas)} weights patched at strength {strength:g}" in report
    assert "every key used" in report, report
    got = _weights(edited)
    assert _changed(got, base) == set(deltas)
    for key, delta in deltas.items():
        torch.testing.assert_close(got[key], base[key] + strength * delta, rtol=0, atol=1e-6)
    assert not tiny_model.patches
    assert all(torch.equal(w, base[k]) for k, w in _weights(tiny_model).items())


def test_lora_in_a_spelling_comfy_does_not_map_is_read_by_ours(loras, tiny_model):
    """peft names of attention projections (``unet.….attn2.to_k``): ComfyUI maps only the processor spelling,
    so the whole file goes through Concept Guard's reader rather than losing those modules."""
    target = unet_target(tiny_model)
    stem = "unet." + target.diffusers_module(TO_K)
    tensors = _plain("peft", tiny_model) | {
        f"{stem}.lora_B.weight": _rand(32, 2),
        f"{stem}.lora_A.weight": _rand(2, 64, seed=1),
    }
    name = _save(loras, "peft_attn.safetensors", tensors)
    edited, report = _apply(tiny_model, name, 1.0)
    assert "Loader: Concept Guard's edit reader" in report and "Applied: 4 tensors" in report, report
    assert f"{TO_K}.weight" in _changed(_weights(edited), _weights(tiny_model))


# ----- variants only ComfyUI reads: equal to the stock LoraLoaderModelOnly --------------------------------


@pytest.mark.parametrize("kind", ["LoCon", "LoHa", "LoKr", "DoRA", "OFT"])
def test_variant_equals_stock_loader(kind, loras, tiny_model, stock_nodes):
    tensors, patched = _variant(kind, tiny_model)
    name = _save(loras, f"{kind}.safetensors", tensors)
    base = _weights(tiny_model)
    edited, report = _apply(tiny_model, name, 0.7)
    (stock,) = stock_nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_model, name, 0.7)
    ours, theirs = _weights(edited), _weights(stock)
    assert len(_changed(ours, base)) == patched
    assert all(torch.equal(ours[k], theirs[k]) for k in base), _changed(ours, theirs)
    assert f"LoRA ({kind}) applied by ComfyUI's loader: {patched} weights patched at strength 0.7" in report
    assert "every key used" in report, report
    assert not tiny_model.patches
    assert all(torch.equal(w, base[k]) for k, w in _weights(tiny_model).items())


@pytest.mark.parametrize(("kind", "label", "patched"), [("LoHa", "LoHa", 2), ("kohya", "LoCon", 4)])
def test_text_encoder_keys_are_reported_not_applied(kind, label, patched, loras, tiny_model, stock_nodes):
    tensors = _variant(kind, tiny_model)[0] if kind == "LoHa" else _plain(kind, tiny_model)
    name = _save(loras, f"{kind}_te.safetensors", tensors | _lora(TE, 64, (64,)))
    edited, report = _apply(tiny_model, name, 1.0)
    assert (
        f"LoRA ({label}) applied by ComfyUI's loader: {patched} weights patched at strength 1; 3 keys not applied: "
        "text encoder, not the UNet (this edit applies to the UNet only) (3)"
    ) in report, report
    assert f"e.g. {TE}.alpha: text encoder" in report
    (stock,) = stock_nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_model, name, 1.0)
    ours, theirs = _weights(edited), _weights(stock)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ----- our checks before ComfyUI's loader: nothing is applied -------------------------------------------


@pytest.mark.parametrize("kind", ["LoRA", "LoHa"])
def test_sdxl_width_lora_on_sd1_is_refused(kind, loras, tiny_model):
    stem = _name(tiny_model, TO_K)
    if kind == "LoRA":
        tensors = _lora(stem, 32, (2048,))
    else:
        tensors = {
            f"{stem}.hada_w{i}_{ab}": _rand(*(32, 4) if ab == "a" else (4, 2048))
            for i in (1, 2)
            for ab in "ab"
        }
    name = _save(loras, f"sdxl_{kind}.safetensors", tensors)
    with pytest.raises(
        ArchitectureMismatchError,
        match=r"made for SDXL \(cross-attention reads 2048-wide text states, key .*\), but the loaded model is "
        r"SD1\.x \(64-wide\)",
    ):
        _apply(tiny_model, name, 1.0)
    assert not tiny_model.patches


def test_variant_with_wrong_shapes_is_refused(loras, tiny_model):
    conv = _name(tiny_model, CONV3)
    tensors = {f"{conv}.lokr_w1": _rand(4, 4), f"{conv}.lokr_w2": _rand(8, 16, 3, 3)}  # [32, 64, 3, 3]
    name = _save(loras, "lokr_wide.safetensors", tensors)
    with pytest.raises(
        ArchitectureMismatchError, match=r"LoRA \(LoKr\) in 'lokr_wide.safetensors' does not fit"
    ):
        _apply(tiny_model, name, 1.0)


def test_nan_in_a_variant_is_refused(loras, tiny_model):
    tensors, _ = _variant("LoHa", tiny_model)
    key = next(k for k in tensors if k.endswith("hada_w2_b"))
    tensors[key][0, 0] = float("nan")
    name = _save(loras, "loha_nan.safetensors", tensors)
    with pytest.raises(EditFileError, match=r"holds NaN/inf values in 1 tensors"):
        _apply(tiny_model, name, 1.0)
