"""ComfyUI in-process for benchmarks: put it on ``sys.path`` and build random-weight SD1.5 MODEL/CLIP.

Mirrors what the test harness (``tests/comfy/comfy_harness.py``) does, without pytest: ComfyUI is found
through ``COMFYUI_PATH``, the CPU flag is set before ``comfy.model_management`` is imported (it would
otherwise probe CUDA), and where no torchvision is installed the harness's two-file stub is importable
only while ComfyUI's modules are imported. Models are built from ComfyUI's own classes, with the dtype
and devices its checkpoint loader would choose (``comfy.sd.load_state_dict_guess_config``), and filled
with default-init-like random values: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHVISION_STUB = REPO_ROOT / "tests" / "comfy" / "stubs"

#: SD1.5's UNet (LDM ``UNetModel`` arguments); ``setup`` checks that ComfyUI detects it as SD15.
SD15_UNET = dict(
    use_checkpoint=False,
    image_size=32,
    out_channels=4,
    use_spatial_transformer=True,
    legacy=False,
    adm_in_channels=None,
    in_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    channel_mult=[1, 2, 4, 4],
    transformer_depth_middle=1,
    use_linear_in_transformer=False,
    context_dim=768,
    num_heads=8,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_temporal_attention=False,
    use_temporal_resblock=False,
)
SD15_UNET_PARAMETERS = 859_520_964

#: For developing the benchmark: SD1.5's widths (320 channels, context 768) at one level (~22 M).
TINY_UNET = dict(
    SD15_UNET, num_res_blocks=[1], transformer_depth=[1], channel_mult=[1], transformer_depth_output=[1, 1]
)


def setup(device: str) -> Path:
    """Import ComfyUI from ``COMFYUI_PATH`` (CPU mode when ``device`` is ``"cpu"``); returns its root.

    Raises:
        SystemExit: ``COMFYUI_PATH`` is unset or is not a ComfyUI source tree.
    """
    path = os.environ.get("COMFYUI_PATH", "").strip()
    if not path:
        raise SystemExit(
            "COMFYUI_PATH is not set: point it at a ComfyUI source tree, e.g. "
            "COMFYUI_PATH=../shared/vendor/ComfyUI python benchmarks/esd_comfy_memory.py"
        )
    root = Path(path).expanduser().resolve()
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise SystemExit(
            f"COMFYUI_PATH={path!r} is not a ComfyUI source tree (no main.py / comfy/); fix the path."
        )
    sys.pycache_prefix = str(
        Path(tempfile.gettempdir()) / "concept_guard_comfy_pycache"
    )  # ComfyUI's tree stays clean
    sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = device == "cpu"  # before comfy.model_management is imported
    stub = importlib.util.find_spec("torchvision") is None
    if stub:
        # diffusers and transformers note at import whether torchvision exists: let them see the truth
        import diffusers  # noqa: F401
        import transformers  # noqa: F401

        sys.path.insert(0, str(TORCHVISION_STUB))
    try:
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401  (imports comfy.model_base, which imports torchvision)
        import comfy_api.latest  # noqa: F401

        import nodes  # noqa: F401  (ComfyUI's nodes.py; its controlnet imports torchvision)
    finally:
        if stub:  # transformers would take the stub for a real torchvision later on
            sys.path.remove(str(TORCHVISION_STUB))
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
    return root


def lively_(module: torch.nn.Module, seed: int) -> None:
    """Default-init-like random values in place: the ComfyUI test harness's helper (one copy, after setup)."""
    sys.path.insert(0, str(REPO_ROOT / "tests" / "comfy"))
    try:
        from tiny_checkpoint import lively_ as harness_lively_
    finally:
        sys.path.remove(str(REPO_ROOT / "tests" / "comfy"))
    harness_lively_(module, seed)


def build_sd15_model(tiny: bool = False, seed: int = 0):
    """A random-weight SD1.5 MODEL (``ModelPatcher``), built as ``CheckpointLoaderSimple`` builds one from an
    fp16 checkpoint: ComfyUI picks the UNet dtype and devices, and the weights are inference tensors."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(TINY_UNET if tiny else SD15_UNET)
    config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if not isinstance(config, comfy.supported_models.SD15):
        raise RuntimeError(f"ComfyUI detects the UNet config as {type(config).__name__}, not SD15.")
    parameters = SD15_UNET_PARAMETERS
    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(
        model_params=parameters,
        supported_dtypes=list(config.supported_inference_dtypes),
        weight_dtype=torch.float16,
    )
    config.set_inference_dtype(
        dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    )
    with torch.inference_mode():
        base = config.get_model({}, "", device=mm.unet_inital_load_device(parameters, dtype))
        lively_(base.diffusion_model, seed)
    count = sum(p.numel() for p in base.diffusion_model.parameters())
    if not tiny and count != SD15_UNET_PARAMETERS:
        raise RuntimeError(f"The UNet has {count} parameters, SD1.5's has {SD15_UNET_PARAMETERS}.")
    return comfy.model_patcher.ModelPatcher(
        base, load_device=load_device, offload_device=mm.unet_offload_device()
    )


def build_sd15_clip(tiny: bool = False, seed: int = 1):
    """ComfyUI's SD1 CLIP-L text encoder (12 layers, 768 wide; ``tiny``: 1 layer) with random weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {"clip_l_model_config": {"num_hidden_layers": 1}} if tiny else {}
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target, model_options=options)
        lively_(clip.cond_stage_model, seed)
    return clip
