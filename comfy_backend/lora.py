"""Edit files on a MODEL: LoRA-family files through ComfyUI's own loader, everything else through ours.

ComfyUI reads more LoRA variants than Concept Guard's reader: LoCon (3×3 conv, Tucker ``lora_mid``), LoHa
(``hada_*``), LoKr (``lokr_*``), DoRA (``dora_scale``) and OFT. A file whose UNet parts ComfyUI maps
(``comfy.lora.model_lora_keys_unet``) to weight adapters is therefore applied exactly as the stock
``LoraLoaderModelOnly`` applies it: ``comfy.lora.load_lora`` + ``clone()`` + ``add_patches``. Unlike the stock
node nothing passes silently: the file is checked first (text width of the model family it was made for,
NaN/inf, shapes) and every key ComfyUI did not load is reported, where ComfyUI only logs it.

Everything else goes through Concept Guard's reader (``core.edits.read``) and ``make_patched_model``: our
``.diff`` edits, full-weight edits (ESD/UCE weight files, full UNets and checkpoints, applied as file − base),
and plain LoRAs in spellings ComfyUI does not map for this model (e.g. diffusers/peft
``unet.….attn2.to_k.lora_A.weight``), which our reader applies whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import comfy.lora
import comfy.model_patcher
import torch
from comfy.weight_adapter import WeightAdapterBase

from ..core.edits.containers import RawEdit, read_tensor_file
from ..core.edits.read import (
    ROLE_SUFFIXES,
    check_context_width,
    check_finite,
    non_unet_reason,
    read_edit_tensors,
    unet_module_of,
    unsupported_variants,
)
from ..core.edits.report import ignored_examples, ignored_reasons, metadata_line
from ..core.edits.target import TargetUNet
from ..core.errors import ArchitectureMismatchError
from .model_info import unet_target
from .patches import clone_with_patches, make_patched_model

logger = logging.getLogger(__name__)

#: ``WeightAdapterBase.name`` -> the name people know the variant by.
ADAPTER_NAMES = {
    "lora": "LoRA",
    "loha": "LoHa",
    "lokr": "LoKr",
    "oft": "OFT",
    "boft": "BOFT",
    "glora": "GLoRA",
}
_DOWN_SUFFIXES = tuple(suffix for suffix, role in ROLE_SUFFIXES if role == "down")
COMFY_LOADER = "ComfyUI's loader"
OUR_LOADER = "Concept Guard's edit reader"


@dataclass(frozen=True)
class ComfyLora:
    """What ComfyUI's LoRA loader makes of a file for one MODEL.

    Attributes:
        patches: model key (``diffusion_model.<module>.weight``) -> ComfyUI patch (weight adapter or tuple).
        not_loaded: the file's keys ``load_lora`` did not consume, sorted.
        variants: what the adapters are, for people: ``("LoHa",)``, ``("DoRA", "LoCon")``, ``("low-rank",)``.
    """

    patches: dict[str, object]
    not_loaded: tuple[str, ...]
    variants: tuple[str, ...]

    @property
    def is_lora_family(self) -> bool:
        """True when ComfyUI built at least one weight adapter (not only ``.diff``/``set`` patches)."""
        return any(isinstance(p, WeightAdapterBase) for p in self.patches.values())

    @property
    def label(self) -> str:
        return f"LoRA ({', '.join(self.variants)})"


def _variants(
    adapters: list[WeightAdapterBase], loaded: set[str], tensors: Mapping[str, torch.Tensor]
) -> tuple[str, ...]:
    """The variants for the report: the adapters' kinds, plus LoCon (conv kernels, Tucker) and DoRA parts."""
    found = {ADAPTER_NAMES.get(a.name, a.name) for a in adapters} - {"LoRA"}
    for key in loaded:
        if key.endswith(".dora_scale"):
            found.add("DoRA")
        elif key.endswith(".lora_mid.weight") or (
            key.endswith(_DOWN_SUFFIXES)
            and tensors[key].dim() == 4
            and tuple(tensors[key].shape[2:]) != (1, 1)
        ):
            found.add("LoCon")
    return tuple(sorted(found)) or ("low-rank",)


def comfy_lora_patches(
    model: comfy.model_patcher.ModelPatcher, tensors: Mapping[str, torch.Tensor]
) -> ComfyLora:
    """The patches ``comfy.lora.load_lora`` builds from ``tensors`` for ``model``'s UNet, and the keys it left.

    ``load_lora`` hands one ``loaded_keys`` set to every weight adapter it builds, and each adapter keeps it
    as ``adapter.loaded_keys``; after the call that set names every file key ``load_lora`` consumed (adapter
    parts, ``alpha``, ``dora_scale``, ``.diff`` parts): the set its own "lora key not loaded" warning is
    computed from. The union over the adapters is taken, so a ComfyUI that gave each adapter its own set
    would still count every adapter's keys (its ``alpha`` keys would then be reported, never hidden).
    """
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(dict(tensors), key_map, log_missing=False)
    adapters = [p for p in patches.values() if isinstance(p, WeightAdapterBase)]
    loaded: set[str] = set().union(*(a.loaded_keys for a in adapters))
    not_loaded = tuple(sorted(k for k in tensors if k not in loaded))
    return ComfyLora(patches, not_loaded, _variants(adapters, loaded, tensors))


def _dry_run_fits(key: str, patch: object, shape: torch.Size, device: str) -> bool:
    """ComfyUI's ``calculate_weight`` for ``patch`` on a zero weight of ``shape``: did the difference fit?"""
    calls: list[torch.Tensor] = []

    def record(diff: torch.Tensor) -> torch.Tensor:
        calls.append(diff)
        return diff

    try:
        comfy.lora.calculate_weight([(1.0, patch, 1.0, None, record)], torch.zeros(shape, device=device), key)
    except (RuntimeError, ValueError, IndexError, TypeError):  # raised outside ComfyUI's own try/except
        return False
    return bool(calls) or (isinstance(patch, tuple) and patch[0] == "set")


class _HideErrorsAbout(logging.Filter):
    """Drops the log records that name ``key`` (ComfyUI logs an adapter's failure on the root logger)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        return self.key not in record.getMessage()


def _fits(key: str, patch: object, shape: torch.Size) -> bool:
    """Whether ComfyUI's own math applies ``patch`` to a weight of ``shape``.

    ComfyUI catches a shape error inside an adapter, logs it and leaves the weight as it was, at sampling
    time; here the same code runs once beforehand on a ``meta`` tensor (no memory, no arithmetic), and the
    ``function`` hook it calls only after the difference took the weight's shape tells whether it fitted. A
    miss is confirmed on a real CPU tensor (where ComfyUI's own error is logged), since some operations
    have no ``meta`` implementation (OFT's norm test calls ``.item()``).
    """
    root, hide = logging.getLogger(), _HideErrorsAbout(key)
    root.addFilter(hide)
    try:
        on_meta = _dry_run_fits(key, patch, shape, "meta")
    finally:
        root.removeFilter(hide)
    return on_meta or _dry_run_fits(key, patch, shape, "cpu")


def check_comfy_lora(
    found: ComfyLora,
    raw: RawEdit,
    target: TargetUNet,
    model: comfy.model_patcher.ModelPatcher,
    path: str,
) -> None:
    """Our checks before ComfyUI's loader applies ``found``: the model family, NaN/inf, every patch's shape.

    Raises:
        ArchitectureMismatchError: the file was made for another model (text width, a weight's shape).
        EditFileError: NaN/inf values in the tensors ComfyUI would load.
    """
    check_context_width(raw.tensors, target, raw.metadata)
    skipped = set(found.not_loaded)
    check_finite({k: t for k, t in raw.tensors.items() if k not in skipped}, f"Edit file {path!r}")
    shapes = {k: v.shape for k, v in model.model.state_dict().items()}
    bad = [k for k, patch in found.patches.items() if k not in shapes or not _fits(k, patch, shapes[k])]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ArchitectureMismatchError(
            f"The {found.label} in {Path(path).name!r} does not fit this {target.display_name} UNet: its patches "
            f"for {bad[:5]}{more} do not take the weights' shapes {[tuple(shapes.get(k, ())) for k in bad[:5]]}. "
            "It was made for a model with another configuration; nothing was applied."
        )


def _not_loaded_reason(key: str, target: TargetUNet) -> str:
    if reason := non_unet_reason(key):
        return reason
    if unet_module_of(key, target):
        return "a UNet key in a spelling ComfyUI's loader does not map"
    return f"unknown key: no part ComfyUI's loader reads for this {target.display_name} UNet"


def comfy_lora_report(found: ComfyLora, raw: RawEdit, target: TargetUNet, path: str, strength: float) -> str:
    """The node's report for a file ComfyUI's loader applied: what, how many weights, which keys not."""
    ignored = [(key, _not_loaded_reason(key, target)) for key in found.not_loaded]
    head = f"{found.label} applied by {COMFY_LOADER}: {len(found.patches)} weights patched at strength {strength:g}"
    head += (
        f"; {len(ignored)} keys not applied: {ignored_reasons(ignored)}" if ignored else "; every key used"
    )
    if ignored:
        logger.warning("%s: %d keys not applied (e.g. %s)", path, len(ignored), ignored[:2])
    lines = [f"Edit: {Path(path).name or '?'}", head, *ignored_examples(ignored), metadata_line(raw.metadata)]
    return "\n".join(lines)


def _use_comfy_loader(found: ComfyLora, raw: RawEdit, target: TargetUNet) -> bool:
    """ComfyUI's loader for LoRA-family files, unless ours reads a plain LoRA whole where ComfyUI would not."""
    if not found.is_lora_family:
        return False  # .diff edits, full weights, files with no UNet key: our reader (and its errors)
    if unsupported_variants(raw.tensors):
        return True  # LoHa, LoKr, DoRA, ...: only ComfyUI applies them
    return not any(unet_module_of(key, target) for key in found.not_loaded)


def apply_edit_file(
    model: comfy.model_patcher.ModelPatcher, path: str | os.PathLike, strength: float
) -> tuple[comfy.model_patcher.ModelPatcher, str]:
    """A new MODEL = ``model`` + ``strength`` · the edit in ``path``, and a report saying which loader applied it.

    The input MODEL is never modified (its clone carries the patches).

    Raises:
        EditFileError: unreadable/unsafe file, no UNet edit in it, NaN/inf values.
        ArchitectureMismatchError: the edit was made for another model.
    """
    path = str(path)
    raw = read_tensor_file(path)
    target = unet_target(model)
    found = comfy_lora_patches(model, raw.tensors)
    if not _use_comfy_loader(found, raw, target):
        loaded = read_edit_tensors(raw, target, path=path)
        patched = make_patched_model(model, loaded.deltas, strength)
        return patched, loaded.summary(strength, loader=OUR_LOADER)
    check_comfy_lora(found, raw, target, model, path)
    patched = clone_with_patches(model, found.patches, strength)
    return patched, comfy_lora_report(found, raw, target, path, strength)
