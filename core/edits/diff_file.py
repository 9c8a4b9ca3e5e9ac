"""Edit files: UNet weight deltas in ComfyUI's generic key format.

``diffusion_model.<ldm module>.diff`` holds ΔW and ``….diff_b`` holds Δb, so stock ComfyUI
``LoraLoaderModelOnly`` applies the file as ``W + strength·ΔW``; the header records how it was made.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ArchitectureMismatchError, ConceptGuardError
from ..files import save_safetensors_atomic
from ..unet.keymap import UNET_PREFIX as PREFIX
from ..version import __version__

FORMAT = "concept_guard.diff/1"
#: dtype of saved deltas: ComfyUI/A1111 models are fp16, and so are our edit files.
EDIT_DTYPE = torch.float16


def ldm_deltas_to_file_keys(deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"<m>.weight": ΔW, "<m>.bias": Δb}`` -> ``{"diffusion_model.<m>.diff": ΔW, "….diff_b": Δb}``."""
    out = {}
    for key, value in deltas.items():
        module, _, kind = key.rpartition(".")
        if kind == "weight":
            out[f"{PREFIX}{module}.diff"] = value
        elif kind == "bias":
            out[f"{PREFIX}{module}.diff_b"] = value
        else:
            raise ConceptGuardError(f"Delta key {key!r} must end in '.weight' or '.bias'.")
    return out


def file_keys_to_ldm_deltas(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`ldm_deltas_to_file_keys` (keys without our prefix/suffix are rejected)."""
    out = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX) or not key.endswith((".diff", ".diff_b")):
            raise ConceptGuardError(f"{key!r} is not a 'diffusion_model.<module>.diff' key.")
        module = key[len(PREFIX) :].rsplit(".", 1)[0]
        out[f"{module}.{'bias' if key.endswith('.diff_b') else 'weight'}"] = value
    return out


def save_edit(
    deltas: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, object],
    *,
    dtype: torch.dtype = EDIT_DTYPE,
    overwrite: bool = False,
) -> Path:
    """Write LDM-keyed deltas as a ``.diff`` safetensors file (atomically, with metadata).

    fp16 by default: ComfyUI/A1111 models are fp16, and an fp16 delta of an fp32 training run
    changes eps by far less than the sampling noise.
    """
    tensors = {k: v.to(dtype) for k, v in ldm_deltas_to_file_keys(deltas).items()}
    meta = {"format": FORMAT, "concept_guard.version": __version__, **metadata}
    return save_safetensors_atomic(tensors, path, meta, overwrite=overwrite)


def read_edit(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read one of our ``.diff`` files: (LDM-keyed fp32 deltas, header metadata)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    return file_keys_to_ldm_deltas(tensors), meta


def attach_edit(backend, deltas: Mapping[str, torch.Tensor], strength: float = 1.0):
    """Apply LDM-keyed deltas to a backend's UNet as ``W + strength·ΔW`` without touching its weights.

    Uses the backend's own delta mechanism (hooks/wrappers), so ``detach()`` on the returned
    :class:`~concept_guard.core.delta.DeltaSet` (or a ``with`` block) restores the base exactly.

    Raises:
        ArchitectureMismatchError: a key is not a weight of this UNet, or a shape differs.
    """
    modules = sorted({k.rsplit(".", 1)[0] for k in deltas})
    available = set(backend.unet_module_names())
    unknown = [m for m in modules if m not in available]
    if unknown:
        raise ArchitectureMismatchError(
            f"The edit names {len(unknown)} module(s) this {backend.arch} UNet does not have (e.g. {unknown[:3]}); "
            "it was made for another model architecture."
        )
    ds = backend.attach_deltas(modules)
    try:
        with torch.no_grad():
            for key, value in deltas.items():
                module, _, kind = key.rpartition(".")
                target = ds[module].weight if kind == "weight" else ds[module].bias
                if target is None or tuple(target.shape) != tuple(value.shape):
                    have = None if target is None else tuple(target.shape)
                    raise ArchitectureMismatchError(
                        f"Edit tensor {key!r} has shape {tuple(value.shape)}, the model's is {have}; "
                        "the edit was made for another model."
                    )
                target.copy_(value.float() * strength)
        for p in ds.parameters():
            p.requires_grad_(False)
    except BaseException:
        ds.detach()
        raise
    return ds
