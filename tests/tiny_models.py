"""Tiny random-init Stable Diffusion pipelines (SD1.x-, SD2.x- and SDXL-shaped) built in-process.

No downloads: the CLIP tokenizer is a character-level vocab written to a temp folder, and every model
is a real diffusers/transformers class with a tiny config. The configs follow the conventions that a
single-file checkpoint cannot record (32 norm groups, 8 heads for conv-projection UNets, 64-channel
heads otherwise), so :func:`to_ldm_checkpoint` exports load back exactly.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import torch
from concept_guard.core.unet.keymap import UNetKeyMap, diffusers_to_ldm_state_dict
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

LATENT = 8  # latent side; images are 16x16 (VAE factor 2)
# "sks" is one token in the real CLIP vocabulary; Concept Guard relies on that (core.backend.SENTINEL_WORD).
WORDS = [
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "circle",
    "square",
    "red",
    "blue",
    "painting",
    "van",
    "gogh",
    "heart",
    "burning",
    "sks",
]

UNET_CONFIGS = {
    # SD1-like: conv projections, 8 heads, attention on all but the last level.
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SD2-like: linear projections, 64-channel heads (per-level head counts), attention everywhere.
    "sd2": dict(
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=(1, 2),
        use_linear_projection=True,
        upcast_attention=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SDXL-like: no attention on level 0, transformer depth per level, added text_time conditioning.
    "sdxl": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=(1, 2, 1),
        cross_attention_dim=64,
        attention_head_dim=(1, 1, 1),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    ),
}

# The published diffusers configs of SD1.5, SD2.1 and SDXL base (only what differs from the defaults).
REAL_CONFIGS = {
    "sd15": dict(cross_attention_dim=768, sample_size=64),
    "sd21": dict(
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        sample_size=96,
    ),
    "sdxl": dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}


def write_tokenizer_files(folder: Path) -> Path:
    """A character-level CLIP BPE vocabulary (+ whole-word merges for :data:`WORDS`) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in string.ascii_lowercase + string.digits + ",.'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in WORDS:
        if len(word) < 2:
            continue
        piece = word[0]
        for i, c in enumerate(word[1:], start=1):
            right = c + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{piece} {right}")
            piece = piece + right
            vocab.setdefault(piece, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


def make_tokenizer(folder: Path, pad: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(folder, pad_token=pad, model_max_length=77)


def tiny_text_encoder(
    tok: CLIPTokenizer, hidden: int = 32, *, projection: bool = False, openclip: bool = False
):
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu" if openclip else "quick_gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_unet(kind: str) -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=LATENT, norm_num_groups=32, **UNET_CONFIGS[kind]).eval()


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=2 * LATENT,
        scaling_factor=scaling_factor,
    ).eval()


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_pipeline(kind: str, tokenizer_dir: Path, *, prediction_type: str = "epsilon", seed: int = 0):
    """A random-init SD pipeline of ``kind`` ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (fp32, CPU)."""
    torch.manual_seed(seed)
    if kind == "sdxl":
        tok, tok2 = make_tokenizer(tokenizer_dir), make_tokenizer(tokenizer_dir, pad="!")
        return StableDiffusionXLPipeline(
            vae=tiny_vae(0.13025),
            text_encoder=tiny_text_encoder(tok),
            text_encoder_2=tiny_text_encoder(tok2, projection=True, openclip=True),
            tokenizer=tok,
            tokenizer_2=tok2,
            unet=tiny_unet("sdxl"),
            scheduler=sd_scheduler(prediction_type),
        )
    tok = make_tokenizer(tokenizer_dir, pad="!" if kind == "sd2" else "<|endoftext|>")
    hidden = UNET_CONFIGS[kind]["cross_attention_dim"]
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(tok, hidden, openclip=kind == "sd2"),
        tokenizer=tok,
        unet=tiny_unet(kind),
        scheduler=sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# -- export to the original single-file (LDM) layout, the inverse of what the loader converts -------------

_VAE_RULES = [
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
    (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
    (r"\.conv_norm_out\.", lambda m: ".norm_out."),
    (r"\.group_norm\.", lambda m: ".norm."),
    (r"\.to_([qkv])\.", lambda m: f".{m[1]}."),
    (r"\.to_out\.0\.", lambda m: ".proj_out."),
]


def _vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)
        new = re.sub(r"^(decoder\.up\.\d+)\.resnets\.", r"\1.block.", new)
        new = re.sub(r"^(decoder\.up\.\d+)\.upsamplers\.0\.", r"\1.upsample.", new)
        for pattern, repl in _VAE_RULES:
            new = re.sub(pattern, repl, new)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM's attention uses 1x1 convs
        out["first_stage_model." + new] = value
    return out


def _hf_clip_keys(enc) -> dict[str, torch.Tensor]:
    """State dict with the ``text_model.`` prefix of the original layout (transformers 5's
    ``CLIPTextModel`` drops it from its own keys)."""
    return {
        k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
        for k, v in enc.state_dict().items()
    }


def _openclip_to_ldm(enc, prefix: str, *, extra_layer: bool) -> dict[str, torch.Tensor]:
    sd = _hf_clip_keys(enc)
    out = {
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
    }
    hidden = enc.config.hidden_size
    out[prefix + "text_projection"] = (
        sd["text_projection.weight"].T if "text_projection.weight" in sd else torch.eye(hidden)
    )
    layers = enc.config.num_hidden_layers
    for i in range(layers + (1 if extra_layer else 0)):
        src, dst = f"text_model.encoder.layers.{min(i, layers - 1)}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
            for a, b in (
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
    return out


def to_ldm_checkpoint(pipe, kind: str) -> dict[str, torch.Tensor]:
    """The pipeline as an original-layout single-file state dict (``model.diffusion_model.*`` etc.)."""
    keymap = UNetKeyMap(pipe.unet.config)
    out = diffusers_to_ldm_state_dict(pipe.unet.state_dict(), keymap, prefix="model.diffusion_model.")
    out.update(_vae_to_ldm(pipe.vae))
    if kind == "sd2":  # SD2 conditions on the penultimate layer: the checkpoint has one more
        out.update(_openclip_to_ldm(pipe.text_encoder, "cond_stage_model.model.", extra_layer=True))
    else:
        prefix = "conditioner.embedders.0.transformer." if kind == "sdxl" else "cond_stage_model.transformer."
        out.update({prefix + k: v for k, v in _hf_clip_keys(pipe.text_encoder).items()})
    if kind == "sdxl":
        out.update(_openclip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model.", extra_layer=False))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
