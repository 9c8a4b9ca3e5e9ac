"""Reading every accepted edit format onto a tiny SD1 diffusers UNet (refusals: ``test_edit_refusals.py``).

Each file is built here from the tiny model in its reference layout (key names, shapes, dtypes, container),
with the libraries' own writers where they have one (safetensors, ``torch.save``, diffusers'
``save_pretrained``/``save_lora_weights``). The check is always against independently computed merged
weights: the eps of the backend with the read edit attached must equal the eps of a copy of the UNet
whose weights were set to ``W + strength·Δ``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from concept_guard.core.edits.diff_file import attach_edit, save_edit
from concept_guard.core.edits.read import LoadedEdit, lora_delta, read_edit_file
from concept_guard.core.edits.target import TargetUNet
from concept_guard.core.errors import ArchitectureMismatchError
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
TO_V = "input_blocks.2.1.transformer_blocks.0.attn2.to_v"
TO_OUT = "output_blocks.4.1.transformer_blocks.0.attn2.to_out.0"
PROJ_IN = "input_blocks.1.1.proj_in"  # 1x1 conv in SD1's layout
CONV3 = "input_blocks.1.0.in_layers.2"  # 3x3 conv of a res block
LINEAR_MODULES = (TO_K, TO_V, TO_OUT)
ALL_MODULES = (*LINEAR_MODULES, PROJ_IN, CONV3)
STRENGTH = 0.7


@pytest.fixture(scope="module")
def target(sd1_backend) -> TargetUNet:
    return TargetUNet.from_backend(sd1_backend)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _probe(backend):
    x = torch.randn(2, 4, 8, 8, generator=_gen(11))
    return x, torch.tensor([50, 700]), backend.encode_text(["a red circle", "a photo of a dog"])


def _eps_of_merged(
    backend, target: TargetUNet, deltas: dict[str, torch.Tensor], strength: float
) -> torch.Tensor:
    """eps of a private UNet copy whose weights are set to W + strength·Δ (the expected result)."""
    unet = copy.deepcopy(backend.unet)
    state = unet.state_dict()
    for key, delta in deltas.items():
        dkey = target.keymap.to_diffusers(key)
        state[dkey] = state[dkey] + strength * delta.reshape(state[dkey].shape)
    unet.load_state_dict(state)
    x, t, cond = _probe(backend)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond.context).sample.float()


def _eps_with_edit(backend, edit: LoadedEdit, strength: float) -> torch.Tensor:
    x, t, cond = _probe(backend)
    with attach_edit(backend, edit.deltas, strength), torch.no_grad():
        return backend.eps(x, t, cond)


def _random_deltas(
    target: TargetUNet, modules, seed: int = 0, *, bias: bool = True
) -> dict[str, torch.Tensor]:
    g, out = _gen(seed), {}
    for m in modules:
        out[f"{m}.weight"] = torch.randn(target.weights[f"{m}.weight"].shape, generator=g) * 0.05
        if bias and f"{m}.bias" in target.weights:
            out[f"{m}.bias"] = torch.randn(target.weights[f"{m}.bias"].shape, generator=g) * 0.05
    return out


def _lora_parts(target: TargetUNet, modules, seed: int = 1, rank: int = 3, alpha: float = 2.0):
    """module -> (up, down, alpha, expected ΔW) in kohya's shapes (conv: up [out,r,1,1], down [r,in,kh,kw])."""
    g, out = _gen(seed), {}
    for m in modules:
        shape = target.weights[f"{m}.weight"].shape
        down_shape = (rank, *shape[1:])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        up, down = torch.randn(up_shape, generator=g) * 0.1, torch.randn(down_shape, generator=g) * 0.1
        expected = (alpha / rank) * (up.reshape(shape[0], rank) @ down.reshape(rank, -1))
        out[m] = (up, down, torch.tensor(alpha), expected.reshape(shape))
    return out


# ----- the formats: each returns (path, expected LDM-keyed deltas) -----------------------------------


def _ours(tmp, target, backend):
    deltas = _random_deltas(target, ALL_MODULES)
    return save_edit(
        deltas, tmp / "ours.safetensors", {"concept_guard.method": "esd-x"}, dtype=torch.float32
    ), deltas


def _comfy_diff_kohya_names(tmp, target, backend):
    deltas = _random_deltas(target, (TO_K, TO_OUT))
    tensors = {
        f"lora_unet_{k.rsplit('.', 1)[0].replace('.', '_')}.{'diff' if k.endswith('weight') else 'diff_b'}": v
        for k, v in deltas.items()
    }
    save_file(tensors, tmp / "comfy_diff.safetensors")
    return tmp / "comfy_diff.safetensors", deltas


def _kohya(tmp, target, backend, diffusers_names: bool):
    parts, tensors = _lora_parts(target, ALL_MODULES), {}
    for m, (up, down, alpha, _) in parts.items():
        name = target.keymap.to_diffusers(m) if diffusers_names else m
        stem = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down, f"{stem}.alpha": alpha}
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(
        8, 3
    )  # text encoder: ignored
    path = tmp / f"kohya_{diffusers_names}.safetensors"
    save_file(tensors, path, metadata={"ss_network_dim": "3", "ss_network_alpha": "2.0"})
    return path, {f"{m}.weight": p[3] for m, p in parts.items()}


def _peft_diffusers(tmp, target, backend):
    """diffusers' own LoRA writer: ``unet.<diffusers module>.lora_A/lora_B.weight`` (no alpha: scale 1)."""
    parts, layers = _lora_parts(target, ALL_MODULES, alpha=3.0), {}  # alpha == rank: scale 1
    for m, (up, down, _, _) in parts.items():
        name = target.keymap.to_diffusers(m)
        layers |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    StableDiffusionPipeline.save_lora_weights(tmp / "peft", unet_lora_layers=layers)
    return tmp / "peft" / "pytorch_lora_weights.safetensors", {f"{m}.weight": p[3] for m, p in parts.items()}


def _attn_processor(tmp, target, backend):
    """Old diffusers attention-processor LoRA: ``…attn2.processor.to_k_lora.up.weight``."""
    parts, tensors = _lora_parts(target, LINEAR_MODULES, alpha=3.0), {}
    for m, (up, down, _, _) in parts.items():
        attn, _, proj = target.keymap.to_diffusers(m).removesuffix(".0").rpartition(".")
        tensors |= {
            f"{attn}.processor.{proj}_lora.up.weight": up,
            f"{attn}.processor.{proj}_lora.down.weight": down,
        }
    torch.save(tensors, tmp / "pytorch_lora_weights.bin")
    return tmp / "pytorch_lora_weights.bin", {f"{m}.weight": p[3] for m, p in parts.items()}


def _partial_weights(target, deltas, dtype):
    return {target.keymap.to_diffusers(k): (target.weights[k] + v).to(dtype) for k, v in deltas.items()}


def _esd_2025(tmp, target, backend):
    """esd_sd.py saves only the trained parameters, diffusers keys, bf16 (``save_file``)."""
    deltas = _random_deltas(target, LINEAR_MODULES)
    tensors = _partial_weights(target, deltas, torch.bfloat16)
    save_file(tensors, tmp / "esd-circle-from-circle-esd-x.safetensors")
    expected = {k: tensors[target.keymap.to_diffusers(k)].float() - target.weights[k] for k in deltas}
    return tmp / "esd-circle-from-circle-esd-x.safetensors", expected


def _uce(tmp, target, backend):
    deltas = _random_deltas(target, (TO_K, TO_V), bias=False)
    save_file(_partial_weights(target, deltas, torch.float32), tmp / "uce.safetensors")
    return tmp / "uce.safetensors", deltas


def _compvis(tmp, target, backend, nested: bool):
    """CompVis ESD: ``torch.save(model.state_dict())`` of a LatentDiffusion (UNet + VAE + CLIP + schedule)."""
    deltas = _random_deltas(target, ALL_MODULES)
    sd = {f"model.diffusion_model.{k}": (w + deltas.get(k, 0)).clone() for k, w in target.weights.items()}
    sd |= {
        "betas": torch.linspace(1e-4, 2e-2, 10),
        "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(32),
    }
    path = tmp / f"compvis_{nested}.pt"
    torch.save({"state_dict": sd, "global_step": 1000} if nested else sd, path)
    return path, deltas


def _full_diffusers_unet(tmp, target, backend):
    deltas = _random_deltas(target, ALL_MODULES)
    unet = copy.deepcopy(backend.unet)
    state = unet.state_dict()
    for k, v in deltas.items():
        state[target.keymap.to_diffusers(k)] += v
    unet.load_state_dict(state)
    unet.save_pretrained(tmp / "unet")
    return tmp / "unet" / "diffusion_pytorch_model.safetensors", deltas


def _full_ldm_checkpoint(tmp, target, backend):
    from tiny_models import to_ldm_checkpoint

    deltas = _random_deltas(target, ALL_MODULES)
    pipe = StableDiffusionPipeline(
        vae=backend.vae,
        text_encoder=backend.text_encoders[0],
        tokenizer=backend.tokenizers[0],
        unet=backend.unet,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd = to_ldm_checkpoint(pipe, "sd1")
    for k, v in deltas.items():
        sd[f"model.diffusion_model.{k}"] = sd[f"model.diffusion_model.{k}"] + v
    save_file(sd, tmp / "model.safetensors")
    return tmp / "model.safetensors", deltas


def _full_ldm_unet(tmp, target, backend):
    """A UNet-only file with bare LDM keys, as ComfyUI's "Load Diffusion Model" reads (fp16)."""
    deltas = _random_deltas(target, ALL_MODULES)
    tensors = {k: (w + deltas.get(k, 0)).half() for k, w in target.weights.items()}
    save_file(tensors, tmp / "unet_ldm.safetensors")
    return tmp / "unet_ldm.safetensors", {k: tensors[k].float() - target.weights[k] for k in deltas}


FORMATS = {
    "concept_guard_diff": (_ours, "Concept Guard .diff"),
    "comfy_diff_kohya_names": (_comfy_diff_kohya_names, "ComfyUI .diff"),
    "kohya_ldm_names": (lambda *a: _kohya(*a, diffusers_names=False), "LoRA (kohya, LDM names)"),
    "kohya_diffusers_names": (lambda *a: _kohya(*a, diffusers_names=True), "LoRA (kohya, diffusers names)"),
    "peft_diffusers": (_peft_diffusers, "LoRA (diffusers names)"),
    "attn_processor": (_attn_processor, "LoRA (diffusers names)"),
    "esd_2025_partial_bf16": (_esd_2025, "ESD 2025 style"),
    "uce_to_k_to_v": (_uce, "UCE style"),
    "compvis_pt": (lambda *a: _compvis(*a, nested=False), "full LDM checkpoint"),
    "compvis_ckpt_state_dict": (lambda *a: _compvis(*a, nested=True), "full LDM checkpoint"),
    "full_diffusers_unet": (_full_diffusers_unet, "full UNet state dict"),
    "full_ldm_checkpoint": (_full_ldm_checkpoint, "full LDM checkpoint"),
    "full_ldm_unet_fp16": (_full_ldm_unet, "full UNet state dict (LDM names)"),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_applies_as_merged_weights(fmt, tmp_path, sd1_backend, target):
    build, label = FORMATS[fmt]
    path, expected = build(tmp_path, target, sd1_backend)
    edit = read_edit_file(path, target)
    assert label in edit.source_format, edit.source_format
    assert set(edit.deltas) == set(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(
            edit.deltas[key], delta.reshape(edit.deltas[key].shape), rtol=1e-5, atol=1e-7
        )
    torch.testing.assert_close(
        _eps_with_edit(sd1_backend, edit, STRENGTH),
        _eps_of_merged(sd1_backend, target, expected, STRENGTH),
        rtol=0,
        atol=1e-5,
    )
    if "full" in fmt or "compvis" in fmt:  # every other UNet tensor equals the base: counted, not applied
        assert edit.unchanged == len(target.weights) - len(expected)
    assert f"Applied: {len(expected)} tensors" in edit.summary()


def test_ignored_parts_are_reported(tmp_path, sd1_backend, target):
    path, _ = _kohya(tmp_path, target, sd1_backend, diffusers_names=False)
    edit = read_edit_file(path, target)
    assert [k for k, _ in edit.ignored] == ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]
    assert "text encoder" in edit.ignored[0][1] and "Ignored: 1 keys" in edit.summary()
    assert "ss_network_dim=3" in edit.summary()
    path, _ = _compvis(tmp_path, target, sd1_backend, nested=True)
    edit = read_edit_file(path, target)
    reasons = dict(edit.ignored)
    assert edit.metadata["global_step"] == "1000"  # scalars of a PyTorch checkpoint become metadata
    assert set(reasons) == {
        "betas",
        "first_stage_model.decoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    }


def test_lora_delta_matches_kohya_scaling():
    up, down = torch.randn(6, 2), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(lora_delta(up, down, torch.tensor(1.0)), 0.5 * up @ down.reshape(2, -1))
    torch.testing.assert_close(lora_delta(up, down, None), up @ down.reshape(2, -1))
    with pytest.raises(ArchitectureMismatchError, match="different ranks"):
        lora_delta(torch.randn(6, 3), down, None)


def test_esd_round_trip_and_strength_zero(tmp_path, sd1_backend, target):
    from concept_guard.core.methods.esd import ESDConfig, train

    cfg = ESDConfig(
        concepts=("circle",), iterations=3, sampling_steps=4, bank_trajectories=1, latent_size=8, lr=1e-3
    )
    result = train(cfg, sd1_backend)
    path = save_edit(result.tensors, tmp_path / "esd.safetensors", result.metadata, dtype=torch.float32)
    x, t, cond = _probe(sd1_backend)
    with torch.no_grad():
        base = sd1_backend.eps(x, t, cond)
        with attach_edit(sd1_backend, result.tensors, 1.0):
            trained = sd1_backend.eps(x, t, cond)
    edit = read_edit_file(path, target)
    assert "Concept Guard .diff" in edit.source_format and "concept_guard.method=esd-x" in edit.summary()
    torch.testing.assert_close(_eps_with_edit(sd1_backend, edit, 1.0), trained, rtol=0, atol=1e-5)
    assert not torch.equal(trained, base)
    assert torch.equal(_eps_with_edit(sd1_backend, edit, 0.0), base)
