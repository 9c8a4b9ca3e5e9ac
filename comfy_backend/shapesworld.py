"""The bundled ShapesWorld demo model as ComfyUI MODEL / CLIP / VAE, built from ComfyUI's own classes.

Each part of the diffusers folder is converted with an existing converter and loaded strictly (a missing or
left-over key is an error), so the ComfyUI objects predict what the diffusers model predicts:

- UNet: diffusers keys -> LDM keys with our ``UNetKeyMap``; ComfyUI's ``model_detection.detect_unet_config``
  reads the UNet config back from those keys, and ``supported_models.SD15`` builds the model (its latent
  format scaled by ShapesWorld's VAE factor).
- VAE: ComfyUI's ``diffusers_convert.convert_vae_state_dict``. It is written for SD's 4-level VAE and numbers
  decoder levels ``3 - i``; ShapesWorld's VAE has 3 levels (f = 4), so decoder level indices are shifted down
  by one afterwards, and the VAE's down/upscale ratio is set to 4. A 64×64 EmptyLatentImage therefore gives
  8×8 latents, which decode to the model's 32-px images.
- CLIP: ComfyUI's SD1 text encoder (``sd1_clip.SD1ClipModel``) at ShapesWorld's size (128 wide, 3 layers) with
  ComfyUI's bundled SD1 tokenizer, which has ShapesWorld's vocabulary. ``text_projection`` (absent from a
  CLIPTextModel) is the identity, so the pooled output is transformers' ``pooler_output``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import comfy.latent_formats
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import numpy as np
import torch
from comfy.diffusers_convert import convert_vae_state_dict

from ..core.errors import ModelLoadError
from ..core.unet.keymap import UNetKeyMap, diffusers_to_ldm_state_dict
from ..shapesworld import shapesworld_model_path, world

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
#: ComfyUI's SD1.x schedule (``ModelSamplingDiscrete`` defaults); the folder must use the same one.
SD1_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}
#: CLIPTextConfig fields that ComfyUI's ``clip_model.CLIPTextModel`` reads.
CLIP_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "max_position_embeddings",
    "eos_token_id",
    "vocab_size",
)


class ConversionError(ModelLoadError):
    """The folder does not convert cleanly (keys left over or missing, unexpected config)."""


@dataclass
class ComfyShapesWorld:
    """The converted model: what CheckpointLoaderSimple would hand to a graph."""

    model: comfy.model_patcher.ModelPatcher
    clip: comfy.sd.CLIP
    vae: comfy.sd.VAE
    folder: Path


def _config(folder: Path, part: str) -> dict:
    return json.loads(
        (folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")).read_text()
    )


def _load_strict(
    module: torch.nn.Module, state_dict: dict, what: str, allow_missing: tuple[str, ...] = ()
) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in allow_missing]
    if missing or unexpected:
        raise ConversionError(
            f"{what}: missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}) after conversion."
        )


def convert_unet(folder: Path, latent_scale: float) -> comfy.model_patcher.ModelPatcher:
    """ComfyUI SD15 MODEL from ``unet/`` (fp32 weights, inference tensors like a loader node's)."""
    schedule = _config(folder, "scheduler")
    if {k: schedule.get(k) for k in SD1_SCHEDULE} != SD1_SCHEDULE:
        raise ConversionError(f"Scheduler config {schedule} is not SD1.x's {SD1_SCHEDULE}.")
    keymap = UNetKeyMap(_config(folder, "unet"))
    ldm = diffusers_to_ldm_state_dict(comfy.utils.load_torch_file(str(folder / WEIGHT_FILES[0])), keymap)
    unet_config = comfy.model_detection.detect_unet_config(ldm, "")
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.latent_format = comfy.latent_formats.SD15(scale_factor=latent_scale)
    model_config.set_inference_dtype(torch.float32, None)
    # The size the model was trained at (stock model configs do not carry it; ComfyBackend reads it).
    model_config.native_latent_size = int(_config(folder, "unet")["sample_size"])
    mm = comfy.model_management
    with torch.inference_mode():
        base = model_config.get_model({})
        _load_strict(base.diffusion_model, ldm, "UNet")
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def _vae_ddconfig(config: dict) -> dict:
    channels = list(config["block_out_channels"])
    return {
        "double_z": True,
        "z_channels": config["latent_channels"],
        "resolution": config["sample_size"],
        "in_channels": config["in_channels"],
        "out_ch": config["out_channels"],
        "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": config["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def convert_vae(folder: Path) -> comfy.sd.VAE:
    """ComfyUI VAE (LDM AutoencoderKL) from ``vae/``."""
    config = _config(folder, "vae")
    levels = len(config["block_out_channels"])
    ldm = convert_vae_state_dict(comfy.utils.load_torch_file(str(folder / WEIGHT_FILES[1])))
    shift = 4 - levels  # ComfyUI's map assumes 4 levels: decoder level i of diffusers -> LDM "up.{3 - i}"
    ldm = {
        re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{int(m[1]) - shift}.", k): v
        for k, v in ldm.items()
    }
    with torch.inference_mode():
        vae = comfy.sd.VAE(
            sd={},
            config={"params": {"embed_dim": config["latent_channels"], "ddconfig": _vae_ddconfig(config)}},
            dtype=torch.float32,
        )
        _load_strict(vae.first_stage_model, ldm, "VAE")
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (levels - 1)
    return vae


def convert_clip(folder: Path) -> comfy.sd.CLIP:
    """ComfyUI SD1 CLIP (text encoder + ComfyUI's bundled tokenizer) from ``text_encoder/``."""
    config = _config(folder, "text_encoder")
    hf = comfy.utils.load_torch_file(str(folder / WEIGHT_FILES[2]))
    sd = comfy.supported_models.SD15({}).process_clip_state_dict(
        {f"cond_stage_model.transformer.{k}": v for k, v in hf.items()}
    )
    sd["clip_l.transformer.text_projection.weight"] = torch.eye(config["hidden_size"])
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {"clip_l_model_config": {k: config[k] for k in CLIP_FIELDS}, "dtype": torch.float32}
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target, model_options=options)
        # logit_scale: a parameter of ComfyUI's wrapper that SD1 checkpoints do not carry either
        _load_strict(clip.cond_stage_model, sd, "CLIP", allow_missing=("clip_l.logit_scale",))
    return clip


def load_shapesworld_comfy(folder: str | Path | None = None) -> ComfyShapesWorld:
    """Convert a ShapesWorld (SD1.x-format) diffusers folder (default: the bundled model) into ComfyUI
    MODEL, CLIP and VAE.

    Raises:
        ConversionError: a part does not convert cleanly.
    """
    folder = Path(folder) if folder is not None else shapesworld_model_path()
    previous = logging.root.manager.disable
    logging.disable(
        logging.WARNING
    )  # "Missing VAE keys" while the empty VAE is built; checked strictly after
    try:
        vae = convert_vae(folder)
    finally:
        logging.disable(previous)
    scale = float(_config(folder, "vae")["scaling_factor"])
    model = convert_unet(folder, latent_scale=scale)
    fmt = model.model.latent_format
    fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias = latent_rgb_factors(vae, scale)
    fmt.taesd_decoder_name = None  # SD1.5's tiny decoder does not read this VAE's latents
    return ComfyShapesWorld(model=model, clip=convert_clip(folder), vae=vae, folder=folder)


def latent_rgb_factors(vae: comfy.sd.VAE, scale: float, count: int = 64) -> tuple[list, list]:
    """ComfyUI's latent-preview map for this VAE: the least-squares linear map (and bias) from model-space
    latents to RGB in [-1, 1] at latent resolution, fitted on ``count`` seeded renders, so the previews of
    KSampler (and of our training nodes) show the model's colours and shapes."""
    rng = np.random.default_rng(0)
    pixels = world.to_tensor(np.stack([world.render(world.sample_scene(rng)) for _ in range(count)]))
    with torch.inference_mode():
        latents = vae.encode(pixels.movedim(1, -1)).float() * scale
    ratio = pixels.shape[-1] // latents.shape[-1]
    target = torch.nn.functional.avg_pool2d(pixels, ratio) * 2 - 1
    x = latents.movedim(1, -1).reshape(-1, latents.shape[1]).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(x, target.movedim(1, -1).reshape(-1, 3).double()).solution
    return solution[:-1].tolist(), solution[-1].tolist()
