"""Conversions between edit formats: ``.diff`` deltas <-> low-rank LoRA (kohya names) <-> merged models.

* deltas -> LoRA: truncated SVD per weight (``ΔW ≈ up @ down``, alpha = rank so the scale is 1); biases and
  1-D weights stay exact ``.diff_b``/``.diff`` entries. ComfyUI, A1111 and kohya load the
  ``lora_unet_<name>.lora_up/lora_down/alpha`` keys; LDM names suit all three, diffusers names suit kohya's
  SD1/SD2 scripts.
* an edit -> a ``.diff`` or LoRA file (:func:`write_edit_as`, used by ``concept-guard convert`` and the
  "Convert Edit" node), with the source's metadata carried over (:func:`converted_metadata`).
* deltas -> merged model: ``W + strength·Δ`` written as a diffusers pipeline folder (the source folder with a
  new ``unet/``) or as a single-file LDM checkpoint (the source checkpoint with new UNet tensors), which
  ComfyUI's CheckpointLoaderSimple and A1111 load.

Every write is atomic: a temp file/folder beside the destination, renamed when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConceptGuardError, OutputPathError
from ..files import atomic_folder, save_safetensors_atomic
from ..unet.keymap import CHECKPOINT_UNET_PREFIX as UNET_PREFIX
from ..version import __version__
from .diff_file import EDIT_DTYPE, save_edit
from .read import LoadedEdit
from .target import TargetUNet

logger = logging.getLogger(__name__)

LORA_FORMAT = "concept_guard.lora/1"
MERGE_INFO_FILE = "concept_guard_edit.json"
#: Edit file kinds :func:`write_edit_as` writes: our ``.diff`` format, or a low-rank kohya LoRA.
EDIT_KINDS = ("diff", "lora")
#: LoRA rank when none is given (CLI ``--rank``, the node's ``rank``).
DEFAULT_RANK = 32


@dataclass(frozen=True)
class LoraExport:
    """A low-rank approximation of LDM-keyed deltas, as kohya-style file tensors.

    Attributes:
        tensors: ``lora_unet_<name>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` (and ``.diff``/``.diff_b``).
        rank: the requested rank (a weight with fewer singular values keeps all of them).
        relative_error: ``‖Δ − Δ_r‖ / ‖Δ‖`` (Frobenius) over all deltas together.
        errors: the same per LDM weight key.
    """

    tensors: dict[str, torch.Tensor]
    rank: int
    relative_error: float
    errors: dict[str, float] = field(default_factory=dict)


def kohya_name(module: str) -> str:
    """``input_blocks.1.1.proj_in`` -> ``lora_unet_input_blocks_1_1_proj_in``."""
    return "lora_unet_" + module.replace(".", "_")


def _low_rank(delta: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``up [out, r(,1,1)]``, ``down [r, in(,kh,kw)]`` with ``up @ down ≈ delta`` (SVD in float64)."""
    matrix = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = max(1, min(rank, int(s.shape[0])))
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    if delta.dim() == 4:
        up, down = up[:, :, None, None], down.reshape(r, *delta.shape[1:])
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


def lora_from_deltas(
    deltas: Mapping[str, torch.Tensor],
    *,
    rank: int,
    name: Callable[[str], str] = kohya_name,
    dtype: torch.dtype = torch.float16,
) -> LoraExport:
    """Approximate LDM-keyed deltas by a rank-``rank`` LoRA (see the module docstring).

    Args:
        deltas: ``<module>.weight``/``.bias`` -> delta (as ``LoadedEdit.deltas``).
        rank: LoRA rank (≥ 1); rank ≥ min(out, in·kh·kw) reproduces the weight up to float rounding.
        name: LDM module -> key stem (default kohya with LDM names).
        dtype: dtype of the written tensors.

    Raises:
        ConceptGuardError: ``rank`` < 1.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ConceptGuardError(
            f"`rank` must be a positive integer, got {rank!r}; typical LoRA ranks are 4-128."
        )
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    residual, total = 0.0, 0.0
    for key in sorted(deltas):
        module, _, kind = key.rpartition(".")
        delta = deltas[key].float()
        norm = float(delta.norm()) ** 2
        total += norm
        stem = name(module)
        if kind == "bias" or delta.dim() not in (2, 4):
            tensors[f"{stem}.{'diff_b' if kind == 'bias' else 'diff'}"] = delta.to(dtype)
            approx = delta.to(dtype).float()
        elif norm == 0.0:
            continue
        else:
            up, down = _low_rank(delta, rank, dtype)
            tensors |= {
                f"{stem}.lora_up.weight": up,
                f"{stem}.lora_down.weight": down,
                f"{stem}.alpha": torch.tensor(float(down.shape[0]), dtype=dtype),
            }
            approx = (up.reshape(up.shape[0], -1).float() @ down.reshape(down.shape[0], -1).float()).reshape(
                delta.shape
            )
        err = float((delta - approx).norm()) ** 2
        residual += err
        errors[key] = math.sqrt(err / norm) if norm else 0.0
    relative = math.sqrt(residual / total) if total else 0.0
    return LoraExport(tensors=tensors, rank=rank, relative_error=relative, errors=errors)


def converted_metadata(edit: LoadedEdit, **extra: object) -> dict[str, object]:
    """Header metadata for a file converted from ``edit``: the source's (but its ``format``), where it came
    from, and ``extra``."""
    carried = {k: v for k, v in edit.metadata.items() if k != "format"}
    return {
        **carried,
        "concept_guard.converted_from": Path(edit.path).name,
        "concept_guard.source_format": edit.source_format,
        **extra,
    }


@dataclass(frozen=True)
class EditExport:
    """A written edit file: where, which kind, and for a LoRA its rank and relative approximation error."""

    path: Path
    kind: str
    rank: int | None = None
    relative_error: float | None = None

    @property
    def error_line(self) -> str:
        """``rank r: relative approximation error …`` for a LoRA, else empty."""
        if self.kind != "lora":
            return ""
        return (
            f"rank {self.rank}: relative approximation error ||D - D_r|| / ||D|| = {self.relative_error:.3e}"
        )


def write_edit_as(
    edit: LoadedEdit,
    kind: str,
    out: str | os.PathLike,
    *,
    rank: int = DEFAULT_RANK,
    name: Callable[[str], str] = kohya_name,
    dtype: torch.dtype = EDIT_DTYPE,
    overwrite: bool = False,
) -> EditExport:
    """Write ``edit`` as a ``.diff`` edit or a rank-``rank`` LoRA (atomically, with metadata).

    Args:
        edit: the edit read for its UNet (``read_edit_file``).
        kind: ``"diff"`` or ``"lora"`` (:data:`EDIT_KINDS`).
        out: destination ``.safetensors`` file.
        rank: LoRA rank (``kind="lora"`` only).
        name: LDM module -> LoRA key stem (default kohya with LDM names).
        dtype: dtype of the written tensors.
        overwrite: replace an existing ``out``.

    Raises:
        ConceptGuardError: unknown ``kind`` or ``rank`` < 1.
        OutputPathError: ``out`` exists (without ``overwrite``) or its folder is missing/read-only.
    """
    if kind == "diff":
        path = save_edit(edit.deltas, out, converted_metadata(edit), dtype=dtype, overwrite=overwrite)
        return EditExport(path=path, kind=kind)
    if kind != "lora":
        raise ConceptGuardError(f"Unknown edit kind {kind!r}; choose one of {', '.join(EDIT_KINDS)}.")
    export = lora_from_deltas(edit.deltas, rank=rank, name=name, dtype=dtype)
    meta = converted_metadata(
        edit,
        format=LORA_FORMAT,
        **{
            "concept_guard.version": __version__,
            "concept_guard.rank": rank,
            "concept_guard.relative_error": f"{export.relative_error:.6g}",
            "ss_network_dim": rank,
            "ss_network_alpha": rank,
            "ss_network_module": "networks.lora",
        },
    )
    path = save_safetensors_atomic(export.tensors, out, meta, overwrite=overwrite)
    return EditExport(path=path, kind=kind, rank=rank, relative_error=export.relative_error)


def merge_weights(
    weights: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor], strength: float
) -> dict[str, torch.Tensor]:
    """``{key: W + strength·Δ}`` for every delta key, computed in fp32 and stored in W's dtype."""
    missing = sorted(set(deltas) - set(weights))
    if missing:
        raise ConceptGuardError(f"Cannot merge: the model has no weights {missing[:5]}.")
    return {
        k: (weights[k].float() + strength * d.float().reshape(weights[k].shape)).to(weights[k].dtype)
        for k, d in deltas.items()
    }


# ----- base models for merging -------------------------------------------------------------------


@dataclass
class BaseModel:
    """A model to merge an edit into: a diffusers pipeline folder (``unet``) or a single file (``checkpoint``)."""

    path: Path
    target: TargetUNet
    unet: torch.nn.Module | None = None
    variant: str | None = None
    checkpoint: dict[str, torch.Tensor] | None = None


def _weights_dtype(folder: Path, variant: str | None) -> torch.dtype:
    from safetensors import safe_open

    name = f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"
    if (folder / name).is_file():
        with safe_open(str(folder / name), framework="pt") as f:
            first = next(iter(f.keys()), None)
            if first is not None:
                return f.get_tensor(first).dtype
    return torch.float32


def load_base_model(spec: str | os.PathLike) -> BaseModel:
    """Load only what merging needs: the UNet of a pipeline folder, or every tensor of a checkpoint file.

    Raises:
        ModelLoadError: not a pipeline folder or SD checkpoint (messages from the loaders).
    """
    from ..backends.diffusers_backend import resolve_model
    from ..backends.diffusers_loading import _weights_variant
    from ..backends.single_file import read_checkpoint
    from ..errors import ModelLoadError

    path = resolve_model(spec)
    if path.is_file():
        checkpoint = read_checkpoint(path)
        unet = {k[len(UNET_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
        if not unet:
            raise ModelLoadError(
                f"{str(path)!r} has no UNet weights ({UNET_PREFIX}*); it is not a full SD checkpoint."
            )
        return BaseModel(path=path, target=TargetUNet.from_ldm_state_dict(unet), checkpoint=checkpoint)
    from diffusers import UNet2DConditionModel

    variant = _weights_variant(path, "unet")
    dtype = _weights_dtype(path / "unet", variant)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", variant=variant, torch_dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"Could not load the UNet of {str(path)!r}: {e}") from e
    return BaseModel(path=path, target=TargetUNet.from_diffusers_unet(unet), unet=unet, variant=variant)


def write_merged(
    base: BaseModel,
    deltas: Mapping[str, torch.Tensor],
    strength: float,
    out: str | os.PathLike,
    metadata: Mapping[str, object],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``base`` with ``W + strength·Δ``: a ``.safetensors`` single file or a pipeline folder.

    A single file needs a single-file base (its VAE and text encoders are copied as they are); a folder needs
    a pipeline-folder base (every component but ``unet/`` is copied).

    Raises:
        OutputPathError: the destination exists (without ``overwrite``) or does not fit the base's kind.
    """
    out = Path(out)
    info = {
        "concept_guard.version": __version__,
        "concept_guard.base_model": str(base.path),
        "concept_guard.strength": strength,
        **metadata,
    }
    if out.suffix == ".safetensors":
        if base.checkpoint is None:
            raise OutputPathError(
                f"`--out` {str(out)!r} asks for a single-file checkpoint, but the base model {str(base.path)!r} is a "
                "diffusers folder. Write a folder instead (an --out without .safetensors), or start from a "
                "single-file checkpoint."
            )
        merged = merge_weights(base.target.weights, deltas, strength)
        tensors = {**base.checkpoint, **{UNET_PREFIX + k: v for k, v in merged.items()}}
        return save_safetensors_atomic(tensors, out, info, overwrite=overwrite)
    if base.unet is None:
        raise OutputPathError(
            f"`--out` {str(out)!r} is a folder, but the base model {str(base.path)!r} is a single file: write a "
            ".safetensors checkpoint instead."
        )
    changed = {
        base.target.keymap.to_diffusers(k): v
        for k, v in merge_weights(base.target.weights, deltas, strength).items()
    }
    with atomic_folder(out, overwrite=overwrite) as tmp:
        shutil.copytree(
            base.path,
            tmp,
            dirs_exist_ok=True,
            ignore=lambda d, names: ["unet"] if Path(d) == base.path else [],
        )
        state = base.unet.state_dict()
        backup = {k: state[k].clone() for k in changed}
        try:  # the merged weights go in only for saving; the loaded UNet is restored afterwards
            base.unet.load_state_dict(changed, strict=False)
            base.unet.save_pretrained(tmp / "unet", variant=base.variant)
        finally:
            base.unet.load_state_dict(backup, strict=False)
        (tmp / MERGE_INFO_FILE).write_text(json.dumps({k: str(v) for k, v in info.items()}, indent=2))
    return out
