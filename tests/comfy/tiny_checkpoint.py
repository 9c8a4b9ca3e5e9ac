"""Random-weight models for host tests: lively initialisation and a tiny single-file SD1.5 checkpoint.

The checkpoint is generated at test time (never committed) and has a real SD1.5 layout that ComfyUI's
``CheckpointLoaderSimple`` auto-detects from its key names and weight shapes, at the smallest size each
part allows:

- UNet: SD1.5's widths (``model_channels`` 320, ``context_dim`` 768: what detection keys on) with one
  level, ~22 M parameters;
- CLIP: ComfyUI builds the SD1 text encoder from its fixed config (12 layers, 768 wide) whatever the
  file holds, and leaves layers missing from the file uninitialised, so all 12 are written (~123 M);
- VAE: ComfyUI builds a checkpoint's LDM VAE with SD's fixed ddconfig, so it is full size (~84 M).

Keys come from ComfyUI's own modules and ``state_dict_for_saving`` (the CheckpointSave path); weights are
saved in fp16 (~0.45 GB).
"""

from __future__ import annotations

from pathlib import Path

import comfy.model_detection
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import torch
from comfy.ldm.models.autoencoder import AutoencoderKL

#: SD1.x VAE (``comfy.sd.VAE``'s default for checkpoints).
SD_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def lively_(module: torch.nn.Module, seed: int) -> None:
    """Default-init-like random weights (std 1/sqrt(fan_in), norms near 1), in place.

    ComfyUI's ops skip initialisation, and the harness's 0.02-scale weights make the text barely move
    eps (ESD loss ~1e-15, deltas that round to 0 in fp16); with these, prompts matter. Works on a
    loader's inference tensors too.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if p.dim() >= 2:
                    value = torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5
                elif name == "weight" and isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    value = 1 + 0.1 * torch.randn(p.shape, generator=gen)
                else:
                    value = 0.1 * torch.randn(p.shape, generator=gen)
                p.copy_(value.to(p.dtype))


def sd15_one_level_unet_config() -> dict:
    return dict(
        use_checkpoint=False,
        image_size=32,
        out_channels=4,
        use_spatial_transformer=True,
        legacy=False,
        adm_in_channels=None,
        dtype=torch.float32,
        in_channels=4,
        model_channels=320,
        num_res_blocks=[1],
        transformer_depth=[1],
        channel_mult=[1],
        transformer_depth_middle=1,
        use_linear_in_transformer=False,
        context_dim=768,
        num_heads=8,
        transformer_depth_output=[1, 1],
        use_temporal_attention=False,
        use_temporal_resblock=False,
    )


def tiny_sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (fp16), keyed as ComfyUI saves an SD1.5 checkpoint."""
    model_config = comfy.supported_models.SD15(sd15_one_level_unet_config())
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    lively_(base.diffusion_model, seed)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    lively_(clip.cond_stage_model, seed + 1)
    vae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    lively_(vae, seed + 2)
    sd = base.state_dict_for_saving(clip.get_sd(), vae.state_dict())
    return {k: v.to(torch.float16).contiguous() for k, v in sd.items() if v.is_floating_point()}


def write_tiny_sd15_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``path`` (ComfyUI's ``save_torch_file``); checks it detects as SD15."""
    sd = tiny_sd15_state_dict(seed)
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if not isinstance(detected, comfy.supported_models.SD15):
        raise RuntimeError(f"The tiny checkpoint detects as {type(detected).__name__}, not SD15.")
    comfy.utils.save_torch_file(sd, str(path))
    return Path(path)
