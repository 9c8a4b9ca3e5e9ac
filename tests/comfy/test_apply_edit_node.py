"""Node "Apply Edited UNet" on ComfyUI's own tiny MODEL (in-process, CPU).

Expected results come from outside our code: a second tiny MODEL whose weights were set to ``W + s·Δ``,
and ComfyUI's stock ``LoraLoaderModelOnly`` on the same file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import comfy.model_management
import folder_paths
import pytest
import torch
from comfy_harness import CONTEXT_DIM, build_tiny_model, build_tiny_sdxl
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.comfy_backend.model_info import unet_target
from concept_guard.comfy_backend.patches import make_patched_model
from concept_guard.core.backend import Conditioning
from concept_guard.core.edits.diff_file import save_edit
from concept_guard.core.errors import ArchitectureMismatchError
from concept_guard.core.methods.esd import ESDConfig, train
from concept_guard.nodes.apply_edit import ApplyEditedUNet
from safetensors.torch import save_file

TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
TO_V = "input_blocks.3.1.transformer_blocks.0.attn2.to_v"
TO_OUT = "output_blocks.1.1.transformer_blocks.0.attn2.to_out.0"
PROJ_IN = "input_blocks.1.1.proj_in"  # 1x1 conv
CONV3 = "input_blocks.1.0.in_layers.2"  # 3x3 conv
MODULES = (TO_K, TO_V, TO_OUT, PROJ_IN, CONV3)


def _eps(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 77, CONTEXT_DIM, generator=g)
    return ComfyBackend(model).eps(x, torch.tensor([50, 700]), Conditioning(context=ctx))


def _sha(model) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(model.model.diffusion_model.state_dict().items()):
        digest.update(name.encode() + t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _merged_model(expected: dict[str, torch.Tensor], strength: float):
    """An independent MODEL (same seed as the fixture) whose weights are set to W + strength·Δ."""
    model = build_tiny_model("eps")
    with torch.inference_mode():
        state = model.model.diffusion_model.state_dict()
        for key, delta in expected.items():
            state[key].add_(strength * delta.reshape(state[key].shape))
    return model


def _apply(model, name: str, strength: float):
    out = ApplyEditedUNet.execute(model=model, edit=name, strength=strength)
    return out.result[0], out.result[1]


def _deltas(weights, modules=MODULES, seed=0, bias=True):
    g, out = torch.Generator().manual_seed(seed), {}
    for m in modules:
        out[f"{m}.weight"] = torch.randn(weights[f"{m}.weight"].shape, generator=g) * 0.05
        if bias and f"{m}.bias" in weights:
            out[f"{m}.bias"] = torch.randn(weights[f"{m}.bias"].shape, generator=g) * 0.05
    return out


def _kohya_lora(
    target, folder: Path, name: str, *, diffusers_names=False, processor=False, rank=3, alpha=2.0
):
    """kohya (LDM or diffusers names) or old diffusers attention-processor LoRA; returns expected deltas."""
    g, tensors, expected = torch.Generator().manual_seed(1), {}, {}
    modules = (TO_K, TO_V, TO_OUT) if processor else MODULES
    for m in modules:
        shape = target.weights[f"{m}.weight"].shape
        up = torch.randn((shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank), generator=g) * 0.1
        down = torch.randn((rank, *shape[1:]), generator=g) * 0.1
        scale = 1.0 if processor else alpha / rank
        expected[f"{m}.weight"] = (scale * up.reshape(shape[0], rank) @ down.reshape(rank, -1)).reshape(shape)
        if processor:
            attn, _, proj = target.keymap.to_diffusers(m).removesuffix(".0").rpartition(".")
            tensors |= {
                f"unet.{attn}.processor.{proj}_lora.up.weight": up,
                f"unet.{attn}.processor.{proj}_lora.down.weight": down,
            }
            continue
        stem = "lora_unet_" + (target.keymap.to_diffusers(m) if diffusers_names else m).replace(".", "_")
        tensors |= {
            f"{stem}.lora_up.weight": up,
            f"{stem}.lora_down.weight": down,
            f"{stem}.alpha": torch.tensor(alpha),
        }
    save_file(tensors, folder / name)
    return expected


def _build(kind: str, target, folder: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """One file in the loras folder in the layout ``kind``; returns (name, expected LDM deltas)."""
    if kind == "concept_guard_diff":
        deltas = _deltas(target.weights)
        save_edit(
            deltas,
            folder / "concept_guard" / "ours.safetensors",
            {"concept_guard.method": "esd-x"},
            dtype=torch.float32,
        )
        return "concept_guard/ours.safetensors", deltas
    if kind in ("kohya_ldm", "kohya_diffusers", "diffusers_processor"):
        name = f"{kind}.safetensors"
        return name, _kohya_lora(
            target,
            folder,
            name,
            diffusers_names=kind == "kohya_diffusers",
            processor=kind == "diffusers_processor",
        )
    if kind == "comfy_diff_kohya_names":
        deltas = _deltas(target.weights, (TO_K, TO_OUT))
        save_file(
            {
                f"lora_unet_{k.rsplit('.', 1)[0].replace('.', '_')}.{'diff' if k.endswith('weight') else 'diff_b'}": v
                for k, v in deltas.items()
            },
            folder / "diff_kohya.safetensors",
        )
        return "diff_kohya.safetensors", deltas
    deltas = _deltas(target.weights, (TO_K, TO_V) if kind == "uce" else MODULES, bias=kind != "uce")
    if kind in ("esd_2025", "uce"):  # partial UNet state dicts, diffusers names, full weights
        save_file(
            {target.keymap.to_diffusers(k): (target.weights[k] + v).contiguous() for k, v in deltas.items()},
            folder / f"{kind}.safetensors",
        )
        return f"{kind}.safetensors", deltas
    sd = {f"model.diffusion_model.{k}": (w + deltas.get(k, 0)).clone() for k, w in target.weights.items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": sd, "global_step": 7}, folder / "compvis_esd.ckpt")  # kind == "compvis_ckpt"
    return "compvis_esd.ckpt", deltas


FORMATS = [
    "concept_guard_diff",
    "kohya_ldm",
    "kohya_diffusers",
    "diffusers_processor",
    "comfy_diff_kohya_names",
    "esd_2025",
    "uce",
    "compvis_ckpt",
]
#: Formats the node hands to ComfyUI's LoRA loader (the rest go through Concept Guard's reader).
COMFY_LOADED = ["kohya_ldm", "kohya_diffusers", "diffusers_processor"]
STOCK_LOADABLE = [
    "concept_guard_diff",
    "kohya_ldm",
    "kohya_diffusers",
    "diffusers_processor",
    "comfy_diff_kohya_names",
]


def test_schema_lists_loras_and_our_subfolder(loras):
    save_file({"x": torch.zeros(1)}, loras / "concept_guard" / "a.safetensors")
    save_file({"x": torch.zeros(1)}, loras / "b.safetensors")
    schema = ApplyEditedUNet.GET_SCHEMA()
    assert (schema.node_id, schema.display_name, schema.category) == (
        "ConceptGuardApplyEditedUNet",
        "Apply Edited UNet",
        "Concept Guard",
    )
    edit, strength = schema.inputs[1], schema.inputs[2]
    assert edit.options == ["b.safetensors", "concept_guard/a.safetensors"]
    assert (strength.default, strength.min, strength.max) == (1.0, -2.0, 2.0)


@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_matches_merged_weights(kind, loras, tiny_model):
    name, expected = _build(kind, unet_target(tiny_model), loras)
    before, base = _sha(tiny_model), _eps(tiny_model)
    edited, report = _apply(tiny_model, name, 0.8)
    torch.testing.assert_close(_eps(edited), _eps(_merged_model(expected, 0.8)), rtol=0, atol=1e-5)
    if kind in COMFY_LOADED:  # LoRAs ComfyUI maps whole: its own loader applies them
        assert f"applied by ComfyUI's loader: {len(expected)} weights patched at strength 0.8" in report
    else:
        assert f"Applied: {len(expected)} tensors" in report and "at strength 0.8" in report
        assert "Loader: Concept Guard's edit reader" in report
    # The input MODEL is untouched: no patches of its own, and once it is the loaded one, its base weights.
    assert not tiny_model.patches and torch.equal(_eps(tiny_model), base) and _sha(tiny_model) == before


@pytest.mark.parametrize("kind", STOCK_LOADABLE)
@pytest.mark.parametrize("strength", [0.6, -1.3])
def test_same_eps_as_stock_lora_loader(kind, strength, loras, tiny_model, stock_nodes):
    name, _ = _build(kind, unet_target(tiny_model), loras)
    (stock,) = stock_nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_model, name, strength)
    ours, _ = _apply(tiny_model, name, strength)
    assert not torch.equal(_eps(stock), _eps(tiny_model))
    torch.testing.assert_close(_eps(ours), _eps(stock), rtol=0, atol=1e-6)


def test_esd_round_trip_and_strength_zero(loras, tiny_model, tiny_clip):
    """As the ESD node does: train, keep fp16 deltas, patch the MODEL, save the file; then apply the file."""
    cfg = ESDConfig(
        concepts=("circle",), iterations=3, sampling_steps=4, bank_trajectories=1, latent_size=8, lr=1e-3
    )
    backend = ComfyBackend(tiny_model, tiny_clip)
    with backend.training():
        result = train(cfg, backend)
    deltas = {k: v.half() for k, v in result.tensors.items()}
    trained = make_patched_model(tiny_model, deltas, 1.0)
    save_edit(deltas, loras / "concept_guard" / "no_circle.safetensors", result.metadata)
    base = _eps(tiny_model)
    at_one, report = _apply(tiny_model, "concept_guard/no_circle.safetensors", 1.0)
    torch.testing.assert_close(_eps(at_one), _eps(trained), rtol=0, atol=1e-5)
    assert not torch.equal(_eps(trained), base)
    assert "Concept Guard .diff" in report and "concept_guard.concepts=circle" in report
    at_zero, _ = _apply(tiny_model, "concept_guard/no_circle.safetensors", 0.0)
    assert torch.equal(_eps(at_zero), base)


def test_full_weight_file_is_a_difference_from_the_unpatched_model(loras, tiny_model, stock_nodes):
    """A LoRA loaded in front of the node patches the shared module in place; the edit is still file - base."""
    target = unet_target(tiny_model)
    name, expected = _build("esd_2025", target, loras)
    lora_name, lora_expected = _build("kohya_ldm", target, loras)
    (with_lora,) = stock_nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_model, lora_name, 1.0)
    _eps(with_lora)  # loads it: weights now patched in place
    edited, _ = _apply(with_lora, name, 1.0)
    combined = {k: expected.get(k, 0) + lora_expected.get(k, 0) for k in {*expected, *lora_expected}}
    torch.testing.assert_close(_eps(edited), _eps(_merged_model(combined, 1.0)), rtol=0, atol=1e-5)


def test_sd1_edit_on_sdxl_names_both(loras, tiny_model):
    name, _ = _build("esd_2025", unet_target(tiny_model), loras)
    sdxl, _ = build_tiny_sdxl()
    with pytest.raises(
        ArchitectureMismatchError, match=r"made for a model with 64-wide .* loaded model is SDXL \(96-wide\)"
    ):
        _apply(sdxl, name, 1.0)


def test_edit_on_tiny_sdxl(loras):
    sdxl, _ = build_tiny_sdxl()
    target = unet_target(sdxl)
    assert target.arch == "sdxl" and "label_emb.0.0.weight" in target.weights
    key = "label_emb.0.0.weight"
    delta, base = torch.randn(target.weights[key].shape) * 0.01, target.weights[key].clone()
    save_file({"lora_unet_label_emb_0_0.diff": delta}, loras / "xl.safetensors")
    edited, report = _apply(sdxl, "xl.safetensors", 1.0)
    assert "Applied: 1 tensors" in report
    comfy.model_management.load_models_gpu([edited], force_full_load=True)
    torch.testing.assert_close(edited.model.diffusion_model.state_dict()[key], base + delta)


def test_missing_file_is_a_clear_error(loras, tiny_model):
    with pytest.raises(FileNotFoundError, match="'loras' with filename 'gone.safetensors' not found"):
        _apply(tiny_model, "gone.safetensors", 1.0)


def test_merged_single_file_loads_in_stock_checkpoint_loader(tmp_path, monkeypatch, loras, stock_nodes):
    """``concept-guard apply`` on a single file -> stock CheckpointLoaderSimple loads it, and its eps equal the
    base checkpoint (same loader) + our node at the same strength. ComfyUI detects SD1.5 from 320 channels and
    768-wide text, so this UNet has the real widths (one level, ~26M parameters); the checkpoint holds only
    the UNet (ComfyUI then warns that there is no VAE/CLIP: those tensors would be copied as they are)."""
    from concept_guard.cli import main as cli_main
    from concept_guard.core.unet.keymap import UNetKeyMap, diffusers_to_ldm_state_dict
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(320,),
        layers_per_block=1,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
    )
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths,
        "checkpoints",
        ([str(checkpoints)], folder_paths.supported_pt_extensions),
    )
    state = diffusers_to_ldm_state_dict(
        unet.state_dict(), UNetKeyMap(unet.config), prefix="model.diffusion_model."
    )
    save_file({k: v.contiguous() for k, v in state.items()}, checkpoints / "base.safetensors")
    del unet, state
    g = torch.Generator().manual_seed(5)
    deltas = {
        f"{TO_K}.weight": torch.randn(320, 768, generator=g) * 0.02,
        f"{CONV3}.weight": torch.randn(320, 320, 3, 3, generator=g) * 0.02,
    }
    edit = save_edit(deltas, loras / "concept_guard" / "e.safetensors", {}, dtype=torch.float32)
    assert (
        cli_main(
            [
                "apply",
                "--model",
                str(checkpoints / "base.safetensors"),
                "--edit",
                str(edit),
                "--strength",
                "0.75",
                "--out",
                str(checkpoints / "merged.safetensors"),
            ]
        )
        == 0
    )

    loader = stock_nodes.CheckpointLoaderSimple()
    base = loader.load_checkpoint("base.safetensors")[0]
    merged = loader.load_checkpoint("merged.safetensors")[0]
    assert type(merged.model.model_config).__name__ == "SD15"
    via_node, _ = _apply(base, "concept_guard/e.safetensors", 0.75)
    g = torch.Generator().manual_seed(9)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), Conditioning(context=torch.randn(1, 77, 768, generator=g))

    def eps(model):
        return ComfyBackend(model).eps(x, torch.tensor([400]), ctx)

    eps_merged = eps(merged)
    torch.testing.assert_close(eps_merged, eps(via_node), rtol=0, atol=1e-5)
    assert (eps_merged - eps(base)).abs().max() > 1e-3
