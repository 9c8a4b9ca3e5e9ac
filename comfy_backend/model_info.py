"""Facts about a ComfyUI MODEL that the adapter and the nodes need: its architecture family, its prediction
type, and its UNet's *unpatched* weights (with their fingerprint and the edit readers' view of them)."""

from __future__ import annotations

import comfy.model_patcher
import comfy.model_sampling
import comfy.supported_models as supported
import torch

from ..core.edits.target import TargetUNet
from ..core.errors import ModelLoadError
from ..core.fingerprint import weights_fingerprint
from ..core.unet.keymap import UNET_PREFIX

# Subclasses (SSD-1B, Vega, SD2.1 ...) match their family.
_ARCHS = (("sdxl", supported.SDXL), ("sd2", supported.SD20), ("sd1", supported.SD15))


def detect_arch(base_model: torch.nn.Module) -> str:
    config = base_model.model_config
    arch = next((a for a, cls in _ARCHS if isinstance(config, cls)), None)
    if arch is None:
        raise ModelLoadError(
            f"Unsupported model type {type(config).__name__} ({type(base_model).__name__}); "
            "Concept Guard supports SD1.x, SD2.x and SDXL UNets. Load one of those checkpoints."
        )
    extra_inputs = getattr(base_model, "concat_keys", ()) or (arch != "sdxl" and base_model.adm_channels)
    if extra_inputs:
        raise ModelLoadError(
            f"Unsupported {type(config).__name__} variant: it needs extra image inputs (inpainting, "
            "instruct-pix2pix or unCLIP). Use the plain text-to-image checkpoint of the same family."
        )
    return arch


def prediction_type(model_sampling: object) -> str:
    if not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ModelLoadError(
            f"Unsupported sampling {type(model_sampling).__name__}: the model must use the 1000-step discrete "
            "DDPM schedule (SD1.x/2.x/SDXL). Remove ModelSampling* nodes that switch to continuous/flow sampling."
        )
    if model_sampling.sigmas.shape[0] != 1000:
        raise ModelLoadError(
            f"The model's schedule has {model_sampling.sigmas.shape[0]} steps; training needs the 1000-step DDPM "
            "schedule. Remove a ModelSamplingDiscrete node set to 'lcm' (or similar) in front of this node."
        )
    if isinstance(model_sampling, (comfy.model_sampling.EDM, comfy.model_sampling.ModelSamplingDiscreteEDM)):
        raise ModelLoadError("EDM-parameterised models are not supported; use an eps or v-prediction model.")
    if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, comfy.model_sampling.EPS) and type(model_sampling).calculate_denoised is (
        comfy.model_sampling.EPS.calculate_denoised
    ):
        return "epsilon"
    raise ModelLoadError(
        f"Unsupported prediction type {type(model_sampling).__name__}; Concept Guard handles eps and v-prediction."
    )


def unpatched_unet_weights(model: comfy.model_patcher.ModelPatcher) -> dict[str, torch.Tensor]:
    """The UNet's weights without the patches a loaded MODEL carries: ComfyUI changes a patched module's
    tensors in place while loaded and keeps the originals in ``backup``."""
    backup = getattr(model, "backup", {})
    state = {}
    for name, tensor in model.model.diffusion_model.state_dict().items():
        saved = backup.get(UNET_PREFIX + name)
        state[name] = saved.weight if saved is not None else tensor
    return state


def unet_fingerprint(model: comfy.model_patcher.ModelPatcher) -> str:
    """Short hash of the *unpatched* UNet weights (a loaded LoRA patch does not change it)."""
    return weights_fingerprint(list(unpatched_unet_weights(model).items()))


def unet_target(model: comfy.model_patcher.ModelPatcher) -> TargetUNet:
    """The MODEL's UNet as edit readers see it, with its unpatched weights."""
    return TargetUNet.from_ldm_state_dict(unpatched_unet_weights(model))
