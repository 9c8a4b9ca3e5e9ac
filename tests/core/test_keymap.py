"""LDM <-> diffusers UNet key mapping on tiny and real-size SD1.x / SD2.x / SDXL layouts."""

from __future__ import annotations

import pytest
import torch
from concept_guard.core.errors import ArchitectureMismatchError
from concept_guard.core.unet.keymap import (
    UNetKeyMap,
    diffusers_to_ldm_state_dict,
    ldm_to_diffusers_state_dict,
    strip_ldm_prefix,
)
from diffusers import UNet2DConditionModel
from tiny_models import REAL_CONFIGS, tiny_unet

# Number of UNet tensors in the original checkpoints (model.diffusion_model.*).
REAL_KEY_COUNTS = {"sd15": 686, "sd21": 686, "sdxl": 1680}


def _meta_unet(name: str) -> UNet2DConditionModel:
    with torch.device("meta"):  # real sizes, no memory
        return UNet2DConditionModel(**REAL_CONFIGS[name])


UNETS = [pytest.param(kind, id=f"tiny-{kind}") for kind in ("sd1", "sd2", "sdxl")] + [
    pytest.param(name, id=f"real-{name}") for name in REAL_CONFIGS
]


def _build(kind: str) -> UNet2DConditionModel:
    return _meta_unet(kind) if kind in REAL_CONFIGS else tiny_unet(kind)


@pytest.mark.parametrize("kind", UNETS)
def test_every_key_maps_to_a_unique_ldm_key_and_back(kind):
    unet = _build(kind)
    keymap = UNetKeyMap(unet.config)
    keys = list(unet.state_dict())
    ldm = [keymap.to_ldm(k) for k in keys]
    assert len(set(ldm)) == len(keys)
    assert [keymap.to_diffusers(k) for k in ldm] == keys
    assert all(
        k.split(".")[0] in {"input_blocks", "middle_block", "output_blocks", "time_embed", "out", "label_emb"}
        for k in ldm
    )
    if kind in REAL_KEY_COUNTS:
        assert len(keys) == REAL_KEY_COUNTS[kind]


@pytest.mark.parametrize("kind", UNETS)
def test_every_linear_and_conv_module_has_an_ldm_name(kind):
    unet = _build(kind)
    keymap = UNetKeyMap(unet.config)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ldm = [keymap.to_ldm(n) for n in names]
    assert len(set(ldm)) == len(names)
    assert [keymap.to_diffusers(n) for n in ldm] == names


SD15_PAIRS = [
    (
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    ),
    (
        "input_blocks.2.1.transformer_blocks.0.attn1.to_out.0",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
    ),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks.4.0.in_layers.0", "down_blocks.1.resnets.0.norm1"),
    ("input_blocks.4.0.in_layers.2", "down_blocks.1.resnets.0.conv1"),
    ("input_blocks.4.0.emb_layers.1", "down_blocks.1.resnets.0.time_emb_proj"),
    ("input_blocks.4.0.out_layers.0", "down_blocks.1.resnets.0.norm2"),
    ("input_blocks.4.0.out_layers.3", "down_blocks.1.resnets.0.conv2"),
    (
        "input_blocks.7.1.transformer_blocks.0.ff.net.0.proj",
        "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj",
    ),
    ("input_blocks.11.0.out_layers.3", "down_blocks.3.resnets.1.conv2"),
    ("middle_block.0.in_layers.2", "mid_block.resnets.0.conv1"),
    ("middle_block.1", "mid_block.attentions.0"),
    ("middle_block.1.proj_in", "mid_block.attentions.0.proj_in"),
    ("middle_block.2.out_layers.3", "mid_block.resnets.1.conv2"),
    ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    (
        "output_blocks.3.1.transformer_blocks.0.attn2.to_v",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    ),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.11.1.proj_out", "up_blocks.3.attentions.2.proj_out"),
    ("output_blocks.11.0.skip_connection", "up_blocks.3.resnets.2.conv_shortcut"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
]

SDXL_PAIRS = [
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    (
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
    ),
    (
        "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
    ),
    (
        "middle_block.1.transformer_blocks.9.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.9.attn1.to_q",
    ),
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
]


@pytest.mark.parametrize(("name", "pairs"), [("sd15", SD15_PAIRS), ("sdxl", SDXL_PAIRS)])
def test_known_real_names(name, pairs):
    unet = _meta_unet(name)
    keymap = UNetKeyMap(unet.config)
    modules = dict(unet.named_modules())
    for ldm, diffusers in pairs:
        assert diffusers in modules, diffusers
        assert keymap.to_ldm(diffusers) == ldm
        assert keymap.to_diffusers(ldm) == diffusers
        assert keymap.to_ldm(diffusers + ".weight") == ldm + ".weight"


def test_ldm_prefixes_are_accepted_and_added():
    keymap = UNetKeyMap(_meta_unet("sd15").config)
    name = "input_blocks.1.1.proj_in.weight"
    for prefix in ("", "diffusion_model.", "model.diffusion_model."):
        assert keymap.to_diffusers(prefix + name) == "down_blocks.0.attentions.0.proj_in.weight"
    assert strip_ldm_prefix("model.diffusion_model.out.2.bias") == "out.2.bias"
    assert (
        keymap.to_ldm("conv_out.bias", prefix="model.diffusion_model.") == "model.diffusion_model.out.2.bias"
    )


def test_state_dict_round_trip_reshapes_linear_and_conv_projections():
    unet = tiny_unet("sd2")  # linear proj_in/proj_out in diffusers
    keymap = UNetKeyMap(unet.config)
    sd = unet.state_dict()
    ldm = diffusers_to_ldm_state_dict(sd, keymap, prefix="model.diffusion_model.")
    # An LDM file may store the projections as 1x1 convs; loading must reshape them back.
    ldm = {
        k: v[:, :, None, None] if k.endswith(("proj_in.weight", "proj_out.weight")) else v
        for k, v in ldm.items()
    }
    back = ldm_to_diffusers_state_dict(ldm, keymap, {k: v.shape for k, v in sd.items()})
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    unet.load_state_dict(back, strict=True)


def test_shape_mismatch_is_reported():
    unet = tiny_unet("sd1")
    keymap = UNetKeyMap(unet.config)
    bad = {"model.diffusion_model.out.2.weight": torch.zeros(3, 3)}
    with pytest.raises(ArchitectureMismatchError, match=r"shape \(3, 3\).*different UNet"):
        ldm_to_diffusers_state_dict(bad, keymap, {"conv_out.weight": unet.conv_out.weight.shape})


def test_unknown_names_raise_with_examples():
    keymap = UNetKeyMap(_meta_unet("sd15").config)
    with pytest.raises(
        ArchitectureMismatchError, match=r"No diffusers name for 'input_blocks\.99\.1\.proj_in'"
    ):
        keymap.to_diffusers("input_blocks.99.1.proj_in")
    with pytest.raises(ArchitectureMismatchError, match=r"not a res-block part"):
        keymap.to_diffusers("input_blocks.1.0.mystery.weight")
    with pytest.raises(ArchitectureMismatchError, match="No LDM name"):
        keymap.to_ldm("down_blocks.7.resnets.0.conv1")


def test_non_sd_unets_are_rejected():
    with pytest.raises(ArchitectureMismatchError, match="class embeddings"):
        UNetKeyMap({**_meta_unet("sd15").config, "class_embed_type": "timestep"})
    with pytest.raises(ArchitectureMismatchError, match="`down_block_types`"):
        UNetKeyMap({"block_out_channels": [320]})
    with pytest.raises(ArchitectureMismatchError, match="SimpleCrossAttnDownBlock2D"):
        UNetKeyMap({"down_block_types": ["SimpleCrossAttnDownBlock2D"], "up_block_types": ["UpBlock2D"]})
