"""Offline loading of a diffusers pipeline folder into the parts the backend needs.

Every file is checked before anything is loaded, so a half-copied folder fails with one message that
names the missing file and what is expected there, instead of a deep transformers/diffusers traceback
or an attempt to reach the Hub. Nothing is ever downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def schedule_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """``ᾱ_t`` (fp32 ``[1000]``) of the pipeline's training schedule, computed by diffusers' DDPMScheduler."""
    steps = int(scheduler_config.get("num_train_timesteps", 1000))
    if steps != 1000:
        raise ModelLoadError(
            f"The scheduler config has num_train_timesteps={steps}; expected 1000 (the Stable Diffusion schedule)."
        )
    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "rescale_betas_zero_snr",
    )
    scheduler = DDPMScheduler.from_config({k: scheduler_config[k] for k in keys if k in scheduler_config})
    return scheduler.alphas_cumprod.to(torch.float32)


def resolve_model(spec: str | Path) -> Path:
    """Turn a model argument into a path: a pipeline folder or a single-file ``.safetensors``/``.ckpt`` checkpoint.

    Raises:
        ModelLoadError: the path does not exist or is not a folder or checkpoint file.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return path
    if path.is_file():
        raise ModelLoadError(
            f"Model file {str(path)!r} has suffix {path.suffix!r}; expected one of {list(CHECKPOINT_SUFFIXES)} "
            "(a full Stable Diffusion checkpoint) or a diffusers pipeline folder."
        )
    raise ModelLoadError(
        f"Model {str(spec)!r} not found: no such folder or file. Pass a diffusers pipeline folder or a "
        ".safetensors/.ckpt checkpoint path (nothing is downloaded)."
    )


_MODEL_WEIGHTS = ("diffusion_pytorch_model", "model", "pytorch_model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


@dataclass
class PipelineParts:
    """The components of a Stable Diffusion pipeline that the backend uses.

    Attributes:
        unet, vae: diffusers models.
        text_encoders, tokenizers: one each for SD1.x/2.x, two for SDXL (CLIP-L, then OpenCLIP bigG).
        scheduler_config: the pipeline's scheduler config (betas, ``prediction_type``).
        source: where it came from, for messages.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: tuple[torch.nn.Module, ...]
    tokenizers: tuple[CLIPTokenizer, ...]
    scheduler_config: dict = field(default_factory=dict)
    source: str = "<in-memory pipeline>"


_FOLDER_HELP = (
    "A diffusers pipeline folder (as written by `pipeline.save_pretrained()`) needs unet/, vae/, text_encoder/, "
    "tokenizer/ and scheduler/ (SDXL also text_encoder_2/ and tokenizer_2/). Nothing is downloaded: copy the "
    "complete folder, or pass a single-file .safetensors/.ckpt checkpoint instead."
)


def _missing(folder: Path, what: str, expected: str) -> ModelLoadError:
    return ModelLoadError(
        f"Model folder {str(folder)!r}: missing {what} (expected {expected}). {_FOLDER_HELP}"
    )


def _weights_variant(folder: Path, sub: str) -> str | None:
    """Check ``sub`` has a config and weights; return the variant (``"fp16"``) if only a variant exists."""
    d = folder / sub
    if not (d / "config.json").is_file():
        raise _missing(folder, f"{sub}/config.json", f"the {sub} model's config")
    for stem in _MODEL_WEIGHTS:
        if any((d / f"{stem}{suffix}").is_file() for suffix in _WEIGHT_SUFFIXES):
            return None
    for variant in ("fp16", "bf16"):
        for stem in _MODEL_WEIGHTS:
            if any((d / f"{stem}.{variant}{suffix}").is_file() for suffix in _WEIGHT_SUFFIXES):
                return variant
    raise _missing(
        folder, f"the weights in {sub}/", f"{sub}/diffusion_pytorch_model.safetensors or model.safetensors"
    )


def _check_tokenizer(folder: Path, sub: str) -> None:
    d = folder / sub
    if (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
        return
    raise _missing(folder, f"{sub}/vocab.json and {sub}/merges.txt", "the CLIP tokenizer files")


def vae_dtype(dtype: torch.dtype, vae_config: dict) -> torch.dtype:
    """fp16 VAEs overflow (SDXL's notably); like the diffusers pipelines, keep a VAE whose config asks
    for it (``force_upcast``, diffusers' default) in fp32 when the rest is fp16."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype


def is_sdxl_folder(folder: Path) -> bool:
    index = folder / "model_index.json"
    if index.is_file():
        return "text_encoder_2" in json.loads(index.read_text())
    return (folder / "text_encoder_2").is_dir()


def _text_encoder_class(config_path: Path, default: type) -> type:
    names = json.loads(config_path.read_text()).get("architectures") or []
    return CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in names else default


def load_pipeline_folder(folder: str | Path, dtype: torch.dtype) -> PipelineParts:
    """Load unet, vae, text encoder(s), tokenizer(s) and the scheduler config from ``folder`` (CPU).

    Raises:
        ModelLoadError: a file is missing or cannot be read; the message names it.
    """
    folder = Path(folder)
    if not (folder / "unet").is_dir() and (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{str(folder)!r} looks like a single model's folder (config.json at the top), not a pipeline. "
            + _FOLDER_HELP
        )
    sdxl = is_sdxl_folder(folder)
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    tokenizers = ["tokenizer", "tokenizer_2"] if sdxl else ["tokenizer"]
    variants = {sub: _weights_variant(folder, sub) for sub in ["unet", "vae", *encoders]}
    for sub in tokenizers:
        _check_tokenizer(folder, sub)
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise _missing(
            folder, "scheduler/scheduler_config.json", "the noise schedule (betas, prediction_type)"
        )
    common = {"local_files_only": True, "torch_dtype": dtype}
    lazy = {"low_cpu_mem_usage": is_accelerate_available()}  # diffusers' fast path needs accelerate
    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", variant=variants["unet"], **common, **lazy
        )
        vae = AutoencoderKL.from_pretrained(
            folder,
            subfolder="vae",
            variant=variants["vae"],
            local_files_only=True,
            **lazy,
            torch_dtype=vae_dtype(dtype, json.loads((folder / "vae" / "config.json").read_text())),
        )
        text_encoders = []
        for i, sub in enumerate(encoders):
            cls = _text_encoder_class(
                folder / sub / "config.json", CLIPTextModelWithProjection if i else CLIPTextModel
            )
            text_encoders.append(cls.from_pretrained(folder, subfolder=sub, variant=variants[sub], **common))
        toks = [
            CLIPTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True) for sub in tokenizers
        ]
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(
            f"Could not load the pipeline in {str(folder)!r}: {e}. Check that the folder is complete and was "
            "written by diffusers' `save_pretrained()`."
        ) from e
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    logger.info("loaded %s pipeline folder %s", "SDXL" if sdxl else "SD", folder)
    return PipelineParts(
        unet=unet,
        vae=vae,
        text_encoders=tuple(text_encoders),
        tokenizers=tuple(toks),
        scheduler_config=scheduler_config,
        source=str(folder),
    )
