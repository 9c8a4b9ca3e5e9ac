"""What kind of Stable Diffusion UNet this is: the architecture family from a diffusers config, and a
diffusers ``UNet2DConditionModel`` config inferred from LDM tensor shapes (for checkpoints that carry none)."""

from __future__ import annotations

import re

import torch

from ..errors import ModelLoadError


def detect_arch(config) -> str:
    """``"sdxl"`` for ``addition_embed_type="text_time"``, ``"sd1"``/``"sd2"`` by text width (768/1024);
    tiny test configs by structure (linear transformer projections -> sd2-like, else sd1-like)."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    width = config.get("cross_attention_dim")
    if width == 768:
        return "sd1"
    if width == 1024:
        return "sd2"
    return "sd2" if config.get("use_linear_projection") else "sd1"


def key_indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _depth(sd: dict[str, torch.Tensor], block: str) -> int:
    return len(key_indices(sd, re.escape(block) + r"\.transformer_blocks\.(\d+)\."))


def _unet_levels(sd: dict[str, torch.Tensor]) -> list[dict]:
    """Walk ``input_blocks``: res blocks per level, their width, attention depth; downsamplers end levels."""
    levels, current = [], {"layers": 0, "channels": 0, "depth": 0}
    for n in key_indices(sd, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in sd:
            levels.append(current)
            current = {"layers": 0, "channels": 0, "depth": 0}
            continue
        current["layers"] += 1
        current["channels"] = int(sd[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0])
        current["depth"] = max(current["depth"], _depth(sd, f"input_blocks.{n}.1"))
    levels.append(current)
    return levels


def infer_unet_config(sd: dict[str, torch.Tensor], *, pooled_dim: int = 1280) -> dict:
    """A diffusers ``UNet2DConditionModel`` config from an LDM UNet state dict (prefix stripped)."""
    try:
        levels = _unet_levels(sd)
        conv_in, conv_out = sd["input_blocks.0.0.weight"], sd["out.2.weight"]
        to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
        proj_in = next(v for k, v in sd.items() if k.endswith(".proj_in.weight"))
    except (KeyError, StopIteration) as e:
        raise ModelLoadError(f"The UNet weights lack {e}; this is not an SD1.x/2.x/XL UNet.") from e
    attn = [lv["depth"] > 0 for lv in levels]
    linear = proj_in.dim() == 2
    channels = [lv["channels"] for lv in levels]
    config = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_out.shape[0]),
        "block_out_channels": channels,
        "layers_per_block": [lv["layers"] for lv in levels],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "transformer_layers_per_block": [max(1, lv["depth"]) for lv in levels],
        "cross_attention_dim": int(to_k.shape[1]),
        "use_linear_projection": linear,
        # Not stored in weights: SD1 uses 8 heads, SD2/XL 64-channel heads (diffusers' "attention_head_dim"
        # is the head count per level here, its historical naming).
        "attention_head_dim": [max(1, c // 64) for c in channels] if linear else 8,
    }
    if len(set(config["layers_per_block"])) == 1:
        config["layers_per_block"] = config["layers_per_block"][0]
    mid = _depth(sd, "middle_block.1")
    if mid != config["transformer_layers_per_block"][-1]:
        raise ModelLoadError(
            f"Middle block has {mid} transformer layers, the last level {levels[-1]['depth']}; unsupported UNet."
        )
    if int(sd["time_embed.0.weight"].shape[0]) != 4 * channels[0]:
        config["time_embedding_dim"] = int(sd["time_embed.0.weight"].shape[0])
    if "label_emb.0.0.weight" in sd:
        total = int(sd["label_emb.0.0.weight"].shape[1])
        config.update(
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=total,
            addition_time_embed_dim=(total - pooled_dim) // 6,
        )
    return config
