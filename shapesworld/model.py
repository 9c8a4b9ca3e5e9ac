"""The ShapesWorld model's architecture and its SD1.x-format pipeline folder.

Why a separate module: training, tests and the backends build the same tiny SD-architecture parts
(AutoencoderKL f = 4, UNet2DConditionModel, 128-wide CLIPTextModel over the standard CLIP vocabulary,
SD1.x's DDIM schedule) and must agree on them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..core.errors import ModelLoadError
from ..core.files import atomic_folder

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def make_vae() -> AutoencoderKL:
    """32×32×3 images <-> 4×8×8 latents (f = 4), ~1 M parameters."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def make_unet() -> UNet2DConditionModel:
    """SD1-pattern conditional UNet on 8×8 latents, ~3.2 M parameters.

    As in SD1.x, cross-attention sits at every level but the deepest (plus the mid block), which keeps
    the folder under 25 MB with the full CLIP token table, and there are 8 heads: a checkpoint does
    not record the head count, and single-file loaders (ours, ComfyUI's) assume 8 for SD1-style UNets.
    """
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=32,
    )


def make_text_encoder() -> CLIPTextModel:
    """CLIP text transformer, 128 wide, 3 layers, over the 49 408-token CLIP vocabulary."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=128,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def make_scheduler() -> DDIMScheduler:
    """SD1.x's schedule exactly: scaled-linear betas 0.00085–0.012, 1000 steps, epsilon."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir))


def save_pipeline(
    out: str | Path,
    *,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer_dir: str | Path,
    info: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an SD1.x pipeline folder (fp16 safetensors) atomically: temp folder, then rename.

    The modules are copied, so the caller's fp32 training copies are untouched.
    """
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(dest, overwrite=overwrite) as tmp:
        pipe = StableDiffusionPipeline(
            vae=_fp16_copy(vae),
            text_encoder=_fp16_copy(text_encoder),
            tokenizer=load_tokenizer(tokenizer_dir),
            unet=_fp16_copy(unet),
            scheduler=make_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        # Our own tokenizer files, readable by transformers 4.x and 5.x alike.
        shutil.rmtree(tmp / "tokenizer")
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            shutil.copy2(Path(tokenizer_dir) / name, tmp / "tokenizer" / name)
        if info:
            (tmp / "shapesworld.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("saved pipeline folder %s (%.1f MB)", dest, folder_bytes(dest) / 1e6)
    return dest


def _fp16_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).to(torch.float16).eval()


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def load_pipeline(
    folder: str | Path | None = None, *, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """Load the committed model (or ``folder``) offline as a StableDiffusionPipeline.

    Raises:
        ModelLoadError: the folder is missing or incomplete.
    """
    path = Path(folder) if folder is not None else MODEL_DIR
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"No pipeline folder at {str(path)!r} (model_index.json missing); "
            "train one with `python -m concept_guard.shapesworld.train --out DIR`."
        )
    return StableDiffusionPipeline.from_pretrained(
        str(path), torch_dtype=dtype, safety_checker=None, feature_extractor=None, local_files_only=True
    )
