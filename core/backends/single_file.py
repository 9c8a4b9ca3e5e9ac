"""Single-file LDM checkpoints (SD1.x, SD2.x incl. v-prediction, SDXL base) loaded fully offline.

The rule, for the UNet and the VAE each: **when ``accelerate`` is installed, a checkpoint whose shapes match a
shipped config loads through diffusers' ``from_single_file`` with that config; anything else goes through
shape inference.**
The shipped configs (``configs/{sd15,sd2,sdxl}/{unet,vae}/config.json``, no weights) are the published
SD1.5, SD2.1 and SDXL-base architectures. "Match" means diffusers' own converter maps the checkpoint onto
exactly the keys and shapes of the model the config builds, so diffusers' non-strict load leaves nothing
unset. The local ``config=`` folder with ``local_files_only=True`` keeps diffusers off the Hub. Without
``accelerate`` diffusers builds the whole model in fp32 before loading (SD1.5 fp16 measured: 15 s and 7 GB peak,
against 0.6 s and 0.5 GB by shape inference), so without it shape inference is used (same modules and weights).

Shape inference stays for every UNet no standard config fits (pruned or distilled UNets, the tiny test
models, ShapesWorld; diffusers' converter cannot express e.g. per-level ``layers_per_block``): the config
comes from tensor shapes (:mod:`~concept_guard.core.unet.layout`), the weights are renamed by our
:mod:`~concept_guard.core.unet.keymap`; a VAE's config from its shapes, renamed by diffusers'
``convert_ldm_vae_checkpoint``. For a standard checkpoint both routes give the same modules and weights
(``tests/core/test_single_file.py``). The CLIP text encoders are always built from their shapes and filled
strictly by diffusers' LDM converters (diffusers' own CLIP loader fills non-strictly).

Two things a checkpoint does not contain: the attention head count (convention: 8 heads for SD1's
conv-projection UNets, 64-channel heads for SD2/XL, as in the shipped configs) and the CLIP tokenizer,
which must be found locally (``tokenizer=`` or the Hugging Face cache). SD2 v-prediction is read from a
``v_pred`` marker key, else guessed from the weights; pass ``prediction_type`` to be sure.
"""

from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.utils import is_accelerate_available
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import ModelLoadError
from ..unet.keymap import CHECKPOINT_UNET_PREFIX as UNET_PREFIX
from ..unet.keymap import UNetKeyMap, ldm_to_diffusers_state_dict
from ..unet.layout import infer_unet_config, key_indices
from .diffusers_loading import PipelineParts, vae_dtype

try:
    from diffusers.models.modeling_utils import no_init_weights
except ImportError:  # older diffusers: the model is random-initialised, then overwritten (same result)
    no_init_weights = nullcontext

logger = logging.getLogger(__name__)

VAE_PREFIX = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer.text_model."
SD2_OPENCLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP = "conditioner.embedders.1.model."
DEFAULT_TOKENIZER_REPO = "openai/clip-vit-large-patch14"
CONFIG_ROOT = Path(__file__).parent / "configs"
#: arch -> the shipped diffusers config folder a standard checkpoint of that family matches
SHIPPED_CONFIGS = {"sd1": CONFIG_ROOT / "sd15", "sd2": CONFIG_ROOT / "sd2", "sdxl": CONFIG_ROOT / "sdxl"}
_COMPONENTS = {
    "unet": (UNet2DConditionModel, convert_ldm_unet_checkpoint),
    "vae": (AutoencoderKL, convert_ldm_vae_checkpoint),
}
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "timestep_spacing": "leading",
}


#: Take diffusers' ``from_single_file`` route for standard checkpoints (only with accelerate: see above).
FROM_SINGLE_FILE = is_accelerate_available()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or (weights-only) ``.ckpt`` file, on CPU."""
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or pickled code: one clear message
        raise ModelLoadError(f"Could not read checkpoint {str(path)!r}: {e}") from e
    data = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"Checkpoint {str(path)!r} holds a {type(data).__name__}, expected a state dict."
        )
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def infer_vae_config(sd: dict[str, torch.Tensor], *, scaling_factor: float) -> dict:
    """A diffusers ``AutoencoderKL`` config from LDM VAE weights (``first_stage_model.`` stripped)."""
    try:
        levels = key_indices(sd, r"encoder\.down\.(\d+)\.")
        return {
            "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
            "block_out_channels": [
                int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels
            ],
            "down_block_types": ["DownEncoderBlock2D"] * len(levels),
            "up_block_types": ["UpDecoderBlock2D"] * len(levels),
            "layers_per_block": len(key_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
            "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
            "scaling_factor": scaling_factor,
        }
    except KeyError as e:
        raise ModelLoadError(f"The checkpoint has no complete VAE ({VAE_PREFIX}*): {e} is missing.") from e


def _clip_config(
    sd: dict[str, torch.Tensor], *, openclip: bool, drop_last: bool, tok: CLIPTokenizer
) -> CLIPTextConfig:
    if openclip:
        vocab, hidden = sd["token_embedding.weight"].shape
        positions = sd["positional_embedding"].shape[0]
        layers = len(key_indices(sd, r"transformer\.resblocks\.(\d+)\."))
        inner = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection = sd["text_projection"].shape[1] if "text_projection" in sd else hidden
    else:
        vocab, hidden = sd["embeddings.token_embedding.weight"].shape
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        layers = len(key_indices(sd, r"encoder\.layers\.(\d+)\."))
        inner = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = hidden
    return CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(inner),
        num_hidden_layers=layers - 1 if drop_last else layers,
        num_attention_heads=max(1, int(hidden) // 64),
        max_position_embeddings=int(positions),
        hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=int(projection),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _fill(model: torch.nn.Module, converted: dict[str, torch.Tensor], what: str, dtype: torch.dtype):
    """Load converted weights into a freshly built text encoder. Keys it does not have are dropped
    (SD2's unused last layer, old ``position_ids``); transformers 5's ``CLIPTextModel`` names its keys
    without the ``text_model.`` prefix that checkpoints carry, so both spellings are accepted."""
    wanted = model.state_dict()
    state = {k: converted[k] if k in converted else converted.get("text_model." + k) for k in wanted}
    missing = sorted(k for k, v in state.items() if v is None)
    if missing:
        raise ModelLoadError(f"The checkpoint's {what} lacks {len(missing)} weights (e.g. {missing[:3]}).")
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def _text_encoders(full: dict, arch: str, toks: tuple, dtype: torch.dtype) -> list[torch.nn.Module]:
    if arch == "sd2":  # SD2 conditions on the penultimate layer: like diffusers, drop the last one
        enc = CLIPTextModel(
            _clip_config(_sub(full, SD2_OPENCLIP), openclip=True, drop_last=True, tok=toks[0])
        )
        return [
            _fill(enc, convert_open_clip_checkpoint(enc, full, SD2_OPENCLIP), "OpenCLIP text encoder", dtype)
        ]
    prefix = SDXL_CLIP if arch == "sdxl" else SD1_CLIP
    enc = CLIPTextModel(_clip_config(_sub(full, prefix), openclip=False, drop_last=False, tok=toks[0]))
    encoders = [_fill(enc, convert_ldm_clip_checkpoint(full), "CLIP text encoder", dtype)]
    if arch == "sdxl":
        cfg = _clip_config(_sub(full, SDXL_OPENCLIP), openclip=True, drop_last=False, tok=toks[1])
        enc2 = CLIPTextModelWithProjection(cfg)
        converted = convert_open_clip_checkpoint(enc2, full, SDXL_OPENCLIP)
        encoders.append(_fill(enc2, converted, "OpenCLIP bigG text encoder", dtype))
    return encoders


def _has_vocab(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def _tokenizer_dirs(tokenizer: str | Path | None, count: int) -> list[Path]:
    """Folders holding the tokenizer files. Checked here because transformers 5 silently builds an empty
    tokenizer when given a folder or repo without them."""
    if tokenizer is None:
        files = [
            try_to_load_from_cache(DEFAULT_TOKENIZER_REPO, name) for name in ("vocab.json", "merges.txt")
        ]
        if all(isinstance(f, str) for f in files):
            return [Path(files[0]).parent] * count
        raise ModelLoadError(
            f"No CLIP tokenizer found: single-file checkpoints contain none, {DEFAULT_TOKENIZER_REPO!r} is not in the "
            "Hugging Face cache, and nothing is downloaded. Pass `tokenizer=` (CLI: --tokenizer) a folder with "
            "vocab.json and merges.txt, e.g. the tokenizer/ folder of any Stable Diffusion pipeline."
        )
    base = Path(tokenizer).expanduser()
    subs = [base / "tokenizer", base / "tokenizer_2"][:count]
    if all(_has_vocab(s) for s in subs):
        return subs
    if _has_vocab(base):
        return [base] * count
    raise ModelLoadError(
        f"No CLIP tokenizer found in {str(base)!r}: expected vocab.json and merges.txt (or tokenizer.json) there or "
        "in tokenizer/ subfolders, e.g. the tokenizer/ folder of any Stable Diffusion pipeline."
    )


def load_tokenizers(
    tokenizer: str | Path | None, pad_tokens: list[str], max_length: int
) -> tuple[CLIPTokenizer, ...]:
    """CLIP tokenizers for a single-file checkpoint (it carries none), from ``tokenizer`` or the HF cache."""
    out = []
    for source, pad in zip(_tokenizer_dirs(tokenizer, len(pad_tokens)), pad_tokens, strict=True):
        try:
            out.append(
                CLIPTokenizer.from_pretrained(
                    source, local_files_only=True, pad_token=pad, model_max_length=max_length
                )
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"Could not load the CLIP tokenizer in {str(source)!r}: {e}") from e
    return tuple(out)


def detect_prediction_type(unet_sd: dict[str, torch.Tensor], full: dict[str, torch.Tensor], arch: str) -> str:
    """``v_pred`` marker key, else for SD2 the spread of the last attention block's norm bias: v-models
    train it much wider than 512-base eps models (an observation ComfyUI also relies on)."""
    if "v_pred" in full:
        return "v_prediction"
    if arch != "sd2":
        return "epsilon"
    last = key_indices(unet_sd, r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias")
    bias = unet_sd.get(f"output_blocks.{last[-1]}.1.transformer_blocks.0.norm1.bias") if last else None
    guess = "v_prediction" if bias is not None and float(bias.float().std()) > 0.09 else "epsilon"
    logger.info("SD2 checkpoint: guessed prediction_type=%s (pass prediction_type to override)", guess)
    return guess


def _meta_model(cls: type, config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str):
    """Build on the meta device (no random init of hundreds of MB), then adopt the checkpoint tensors."""
    with torch.device("meta"):
        model = cls(**config)
    wanted = model.state_dict()
    if set(wanted) != set(state):
        missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
        raise ModelLoadError(
            f"{what} weights do not fit the inferred layout: missing {missing[:3]}, unexpected {extra[:3]}."
        )
    try:  # cast first: ModelMixin.to(dtype) warns about (and may skip) modules kept in fp32
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{what} weights do not fit the inferred layout: {e}") from e
    return model


@functools.cache
def _shipped_model(folder: Path, component: str) -> tuple[dict, dict[str, torch.Size]]:
    """A shipped config and the parameter shapes of the model it builds (on the meta device, no memory)."""
    cls = _COMPONENTS[component][0]
    config = cls.load_config(str(folder), subfolder=component, local_files_only=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in cls.from_config(config).state_dict().items()}
    return config, shapes


def shipped_config(full: dict[str, torch.Tensor], arch: str, component: str) -> Path | None:
    """The shipped config folder whose ``component`` (``"unet"``/``"vae"``) ``full`` fits exactly, or ``None``
    (then shape inference): diffusers' converter must map the checkpoint onto the same keys and shapes."""
    folder = SHIPPED_CONFIGS.get(arch)
    if folder is None or not (folder / component / "config.json").is_file():
        return None
    config, expected = _shipped_model(folder, component)
    try:
        converted = _COMPONENTS[component][1](checkpoint=full, config=config)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError):  # another layout: not this config
        return None
    return folder if {k: v.shape for k, v in converted.items()} == expected else None


def _drop_fp32_cast_warning(record: logging.LogRecord) -> bool:
    """diffusers' ``ModelMixin.to(dtype)`` warns about fp32-kept modules even when there are none (``[]``),
    on every ``from_single_file(torch_dtype=...)``; that one message is dropped during the call."""
    return "should be kept in float32: []." not in record.getMessage()


def _from_single_file(component: str, full: dict, folder: Path, dtype: torch.dtype, **overrides):
    """diffusers' ``from_single_file`` with a shipped config, offline. Without accelerate diffusers builds
    the model in full before loading every weight into it: its random init is skipped (it would be
    overwritten; :func:`shipped_config` has checked that every weight is there)."""
    cls = _COMPONENTS[component][0]
    lazy = is_accelerate_available()
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    try:
        quiet.addFilter(_drop_fp32_cast_warning)
        with nullcontext() if lazy else no_init_weights():
            return cls.from_single_file(
                full,
                config=str(folder),
                subfolder=component,
                local_files_only=True,
                torch_dtype=dtype,
                low_cpu_mem_usage=lazy,
                **overrides,
            )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(
            f"diffusers could not load the {component} with the shipped config {str(folder)!r}: {e}"
        ) from e
    finally:
        quiet.removeFilter(_drop_fp32_cast_warning)


def _load_unet(full: dict, arch: str, prediction: str, dtype: torch.dtype) -> UNet2DConditionModel:
    """The UNet via a shipped config when the shapes match one, else via shape inference."""
    unet_sd = _sub(full, UNET_PREFIX)
    sample_size = {"sdxl": 128, "sd2": 96 if prediction == "v_prediction" else 64}.get(arch, 64)
    overrides = {"sample_size": sample_size, "upcast_attention": arch == "sd2"}
    folder = shipped_config(full, arch, "unet") if FROM_SINGLE_FILE else None
    if folder is not None:
        logger.info(
            "UNet matches the shipped %s config: loading with diffusers' from_single_file", folder.name
        )
        return _from_single_file("unet", full, folder, dtype, **overrides)
    pooled = int(full[SDXL_OPENCLIP + "text_projection"].shape[1]) if arch == "sdxl" else 1280
    config = {**infer_unet_config(unet_sd, pooled_dim=pooled), **overrides}
    logger.info("UNet fits no shipped config: loading with the config inferred from its shapes")
    keymap = UNetKeyMap(config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet2DConditionModel(**config).state_dict().items()}
    state = ldm_to_diffusers_state_dict(unet_sd, keymap, shapes)
    return _meta_model(UNet2DConditionModel, config, state, dtype, "UNet")


def _load_vae(full: dict, arch: str, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE via a shipped config when the shapes match one, else via shape inference."""
    folder = shipped_config(full, arch, "vae") if FROM_SINGLE_FILE else None
    if folder is not None:
        logger.info(
            "VAE matches the shipped %s config: loading with diffusers' from_single_file", folder.name
        )
        config = _shipped_model(folder, "vae")[0]
        return _from_single_file("vae", full, folder, vae_dtype(dtype, config))
    config = infer_vae_config(_sub(full, VAE_PREFIX), scaling_factor=0.13025 if arch == "sdxl" else 0.18215)
    state = convert_ldm_vae_checkpoint(full, config)
    return _meta_model(AutoencoderKL, config, state, vae_dtype(dtype, config), "VAE")


def load_single_file(
    path: Path, dtype: torch.dtype, *, tokenizer: str | Path | None = None
) -> tuple[PipelineParts, str]:
    """Load an SD1.x/2.x/XL single-file checkpoint; returns the parts and the detected prediction type."""
    full = read_checkpoint(path)
    unet_sd = _sub(full, UNET_PREFIX)
    if not unet_sd:
        raise ModelLoadError(
            f"{str(path)!r} has no UNet weights ({UNET_PREFIX}*): it is not a full Stable Diffusion checkpoint "
            "(LoRA, embedding or VAE-only files cannot be loaded as a model)."
        )
    sdxl = any(k.startswith(SDXL_OPENCLIP) for k in full)
    sd2 = any(k.startswith(SD2_OPENCLIP) for k in full)
    arch = "sdxl" if sdxl else "sd2" if sd2 else "sd1"
    if not sdxl and not sd2 and not any(k.startswith(SD1_CLIP) for k in full):
        raise ModelLoadError(
            f"{str(path)!r} has no text encoder weights (cond_stage_model.* / conditioner.*)."
        )
    prediction = detect_prediction_type(unet_sd, full, arch)
    unet = _load_unet(full, arch, prediction, dtype)
    vae = _load_vae(full, arch, dtype)

    pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[arch]
    toks = load_tokenizers(tokenizer, pads, max_length=77)
    encoders = _text_encoders(full, arch, toks, dtype)
    for tok, enc in zip(toks, encoders, strict=True):
        if len(tok) != enc.config.vocab_size:
            raise ModelLoadError(
                f"The tokenizer has {len(tok)} tokens but the checkpoint's text encoder has {enc.config.vocab_size}; "
                "pass the CLIP tokenizer that belongs to this model (`tokenizer=`)."
            )
    logger.info("loaded %s single-file checkpoint %s (%s)", arch, path, prediction)
    parts = PipelineParts(
        unet=unet,
        vae=vae,
        text_encoders=tuple(encoders),
        tokenizers=toks,
        scheduler_config={**SD_SCHEDULER, "prediction_type": prediction},
        source=str(path),
    )
    return parts, prediction
