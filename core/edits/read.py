"""Any accepted weight-edit file -> LDM-keyed deltas for one UNet, recognised from content, not file names.

Accepted (see ``reference/esd.md`` §1 and ``reference/comfyui_host.md`` §2):

* ``.diff``/``.diff_b`` patches: our edits (``diffusion_model.<module>.diff``) and ComfyUI's generic ones;
* low-rank LoRAs: kohya ``lora_unet_…`` (LDM or diffusers names) with ``lora_up``/``lora_down``/``alpha``,
  diffusers/peft ``…lora_A``/``lora_B`` (``unet.`` prefix optional), ``lora.up``/``lora_linear_layer``, and
  attention-processor ``…processor.to_k_lora.up``; ΔW = alpha/rank · up @ down (Linear, 1×1 and 3×3 conv);
* full weights: partial UNet state dicts (ESD 2025 scripts, UCE ``to_k``/``to_v`` edits, diffusers names),
  full UNets, and full LDM checkpoints (CompVis-era ESD ``.pt``/``.ckpt``); the edit is ``file - loaded``.

Everything is checked before anything is returned: an edit made for another architecture, shape
mismatches and NaN/inf values raise; keys that are not part of the UNet are reported, never applied.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import ArchitectureMismatchError, EditFileError
from ..unet.keymap import CHECKPOINT_UNET_PREFIX
from .containers import RawEdit, read_tensor_file
from .report import CROSS_KV, describe_format, edit_summary, model_family
from .target import KOHYA_PREFIXES, TargetUNet

logger = logging.getLogger(__name__)

#: key suffix -> role, most specific first (``….lora_A.weight`` before ``….weight``).
ROLE_SUFFIXES = (
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    ("_lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".weight", "weight"),
    (".bias", "bias"),
)
#: Parts of LoRA variants whose math is not ``up @ down``: refused rather than half-applied.
UNSUPPORTED_PARTS = {
    ".lora_mid.weight": "LoCon/Tucker mid weights",
    ".dora_scale": "DoRA",
    ".hada_w1_a": "LoHa",
    ".lokr_w1": "LoKr",
    ".oft_blocks": "OFT",
    ".set_weight": "set-weight patches",
    ".w_norm": "norm patches",
    ".reshape_weight": "reshape patches",
}
NON_UNET = (
    ("lora_te", "text encoder"),
    ("text_encoder", "text encoder"),
    ("te_", "text encoder"),
    ("te1.", "text encoder"),
    ("te2.", "text encoder"),
    ("text_encoders.", "text encoder"),
    ("cond_stage_model.", "text encoder"),
    ("conditioner.", "text encoder"),
    ("first_stage_model.", "VAE"),
    ("vae.", "VAE"),
    ("model_ema.", "EMA copy"),
)
#: LoHa factors whose input width is the module's (``[rank, in]``): read by the context-width check.
INPUT_SIDE_PARTS = (".hada_w1_b", ".hada_w2_b")


@dataclass(frozen=True)
class LoadedEdit:
    """An edit file read for one UNet.

    Attributes:
        deltas: LDM parameter key (``<module>.weight``/``.bias``) -> fp32 delta, shaped like the weight.
        source_format: what the file was recognised as, e.g. ``"LoRA (kohya, diffusers names) [safetensors]"``.
        metadata: the file's header metadata.
        ignored: ``(file key, reason)`` of every key that is not applied.
        unchanged: full-weight entries equal to the loaded model's (nothing to apply).
        path: the file read.
    """

    deltas: dict[str, torch.Tensor]
    source_format: str
    metadata: dict[str, str] = field(default_factory=dict)
    ignored: tuple[tuple[str, str], ...] = ()
    unchanged: int = 0
    path: str = ""

    @property
    def applied(self) -> tuple[str, ...]:
        return tuple(sorted(self.deltas))

    def summary(self, strength: float | None = None, loader: str | None = None) -> str:
        """A few lines for people: what was applied, what was ignored and why, the file's metadata."""
        return edit_summary(
            self.path,
            self.source_format,
            self.deltas,
            unchanged=self.unchanged,
            ignored=self.ignored,
            metadata=self.metadata,
            strength=strength,
            loader=loader,
        )


@dataclass
class _Module:
    """The entries of one target module: role -> (file key, tensor)."""

    parts: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)
    spellings: set[str] = field(default_factory=set)


def _role(key: str) -> tuple[str, str] | None:
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def non_unet_reason(key: str, is_checkpoint: bool = False) -> str | None:
    """Why ``key`` is not part of the UNet (text encoder, VAE, ...), or ``None`` if it may be."""
    if is_checkpoint and not key.startswith(CHECKPOINT_UNET_PREFIX):
        return "not part of the UNet (VAE, text encoder or schedule of a full checkpoint)"
    for prefix, what in NON_UNET:
        if key.startswith(prefix):
            return f"{what}, not the UNet (this edit applies to the UNet only)"
    return None


def unet_module_of(key: str, target: TargetUNet) -> str | None:
    """The LDM module of ``target`` that a LoRA/.diff/weight key edits, in any spelling this reader accepts;
    ``None`` for keys of other model parts and unknown names."""
    split = None if non_unet_reason(key) else _role(key)
    return target.resolve_module(split[0]) if split else None


def unsupported_variants(keys: Iterable[str]) -> list[str]:
    """Names of the LoRA variants among ``keys`` whose math is not ``up @ down`` (LoHa, LoKr, DoRA, ...)."""
    return sorted({what for key in keys for part, what in UNSUPPORTED_PARTS.items() if part in key})


def _refuse_unsupported(tensors: Mapping[str, torch.Tensor]) -> None:
    found = unsupported_variants(tensors)
    if found:
        raise EditFileError(
            f"The file uses LoRA variants Concept Guard does not apply: {', '.join(found)}. Only plain "
            "low-rank (up @ down) LoRAs, .diff patches and weights are accepted; load this file with ComfyUI's "
            "LoraLoaderModelOnly instead."
        )


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`EditFileError` naming the tensors that hold NaN/inf (``what`` names their source)."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise EditFileError(
            f"{what} holds NaN/inf values in {len(bad)} tensors (e.g. {bad[:3]}); the file is corrupt or the "
            "training that made it diverged. Nothing was applied: retrain or re-export the edit."
        )


def _input_side_stem(key: str) -> str | None:
    """The module name of a tensor whose dim 1 is the module's input width (weight, .diff, LoRA/LoHa down)."""
    for part in INPUT_SIDE_PARTS:
        if key.endswith(part):
            return key[: -len(part)]
    split = _role(key)
    return split[0] if split and split[1] in ("weight", "diff", "down") else None


def check_context_width(
    tensors: Mapping[str, torch.Tensor], target: TargetUNet, metadata: Mapping[str, str]
) -> None:
    """Cross-attention k/v read the text states: their input width names the model family the edit is for.

    Raises:
        ArchitectureMismatchError: the file's first cross-attention k/v entry reads another width than
            ``target`` (e.g. an SDXL LoRA, 2048-wide, on an SD1.x model, 768-wide).
    """
    want = target.context_width
    if want is None:
        return
    for key, tensor in tensors.items():
        stem = _input_side_stem(key)
        if stem and CROSS_KV.search(stem) and tensor.dim() >= 2:
            width = int(tensor.shape[1])
            if width != want:
                raise ArchitectureMismatchError(
                    f"This edit was made for {model_family(width, metadata)} (cross-attention reads {width}-wide text "
                    f"states, key {key!r}), but the loaded model is {target.display_name} ({want}-wide). Load the "
                    "base model the edit was made for, or use an edit trained on this model."
                )
            return


def _spelling(stem: str, module: str) -> str:
    if stem.startswith(KOHYA_PREFIXES):
        bare = stem.split("_", 2)[2] if stem.startswith("lora_unet_") else stem[len("lycoris_") :]
        return "kohya, LDM names" if bare == module.replace(".", "_") else "kohya, diffusers names"
    if stem.endswith(module):
        return "LDM names"
    return "diffusers names"


def _group(raw: RawEdit, target: TargetUNet) -> tuple[dict[str, _Module], list[tuple[str, str]]]:
    """File keys -> target modules; everything else becomes ``(key, reason)``."""
    is_checkpoint = any(k.startswith(CHECKPOINT_UNET_PREFIX) for k in raw.tensors)
    modules: dict[str, _Module] = {}
    ignored: list[tuple[str, str]] = [(k, "not a tensor") for k in raw.skipped]
    for key, tensor in raw.tensors.items():
        reason = non_unet_reason(key, is_checkpoint)
        split = None if reason else _role(key)
        if split is None:
            ignored.append((key, reason or "unknown key (no UNet weight, LoRA or .diff part)"))
            continue
        stem, role = split
        module = target.resolve_module(stem)
        if module is None:
            ignored.append((key, f"unknown key: this {target.display_name} UNet has no module {stem!r}"))
            continue
        entry = modules.setdefault(module, _Module())
        if role in entry.parts:
            raise EditFileError(
                f"Keys {entry.parts[role][0]!r} and {key!r} both set the {role} of UNet module {module!r}; the file "
                "names one module twice (e.g. in LDM and diffusers spelling). Keep one of them."
            )
        entry.parts[role] = (key, tensor)
        entry.spellings.add(_spelling(stem, module))
    return modules, ignored


def fit_shape(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``tensor`` in ``shape``, reshaping only between a Linear weight and a 1×1 conv's; ``None`` if it does not fit."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    four = tensor.shape if tensor.dim() == 4 else shape
    if tensor.numel() == shape.numel() and {tensor.dim(), len(shape)} == {2, 4} and tuple(four[2:]) == (1, 1):
        return tensor.reshape(shape)
    return None


def lora_delta(up: torch.Tensor, down: torch.Tensor, alpha: torch.Tensor | float | None) -> torch.Tensor:
    """ΔW = (alpha / rank) · up @ down as ``[out, in·kh·kw]`` fp32 (alpha absent: scale 1, as ComfyUI/kohya).

    Args:
        up: ``[out, r]`` or ``[out, r, 1, 1]``; down: ``[r, in]`` or ``[r, in, kh, kw]``.
    """
    rank = int(down.shape[0])
    if up.dim() < 2 or int(up.shape[1]) != rank:
        raise ArchitectureMismatchError(
            f"LoRA up {tuple(up.shape)} and down {tuple(down.shape)} have different ranks."
        )
    scale = 1.0 if alpha is None else float(alpha) / rank
    return (up.reshape(up.shape[0], -1).float() @ down.reshape(rank, -1).float()) * scale


def _module_deltas(
    module: str, entry: _Module, target: TargetUNet, problems: list[str]
) -> tuple[dict[str, torch.Tensor], int, set[str]]:
    """Deltas of one module from its parts; shape problems are collected, not raised here."""
    out: dict[str, torch.Tensor] = {}
    unchanged, kinds = 0, set()
    parts = entry.parts
    lora = {r: parts[r][1] for r in ("up", "down", "alpha") if r in parts}
    if ("up" in lora) != ("down" in lora):
        raise EditFileError(
            f"LoRA for {module!r} has only its {'up' if 'up' in lora else 'down'} matrix; the file is incomplete."
        )
    sources = [
        ("weight", "diff", "diff"),
        ("bias", "diff_b", "diff"),
        ("weight", "weight", "weights"),
        ("bias", "bias", "weights"),
    ]
    if "up" in lora:
        sources.insert(0, ("weight", "lora", "lora"))
    for kind, role, family in sources:
        key = f"{module}.{kind}"
        if role == "lora":
            value = lora_delta(lora["up"], lora["down"], lora.get("alpha"))
            name = parts["up"][0]
        elif role in parts:
            name, value = parts[role]
        else:
            continue
        base = target.weights.get(key)
        if key in out or base is None:
            problems.append(f"{name!r}: {'two entries for' if key in out else 'no parameter'} {key!r}")
            continue
        if role == "lora":  # up @ down is [out, in·kh·kw]
            same = value.shape[0] == base.shape[0] and value.numel() == base.numel()
            fitted = value.reshape(base.shape) if same else None
        else:
            fitted = fit_shape(value, base.shape)
        if fitted is None:
            problems.append(
                f"{name!r} has shape {tuple(value.shape)}, the model's {key} is {tuple(base.shape)}"
            )
            continue
        kinds.add(family)
        if family != "weights":
            out[key] = fitted.float()
            continue
        base = base.detach().to("cpu")  # a loaded ComfyUI model may sit on the GPU
        coarse = max((fitted.dtype, base.dtype), key=lambda d: torch.finfo(d).eps)
        if torch.equal(fitted.to(coarse), base.to(coarse)):
            unchanged += 1
            continue
        out[key] = fitted.float() - base.float()
    return out, unchanged, kinds


def _all_deltas(
    modules: dict[str, _Module], target: TargetUNet
) -> tuple[dict[str, torch.Tensor], int, set[str]]:
    """Deltas of every module, or one error listing every shape problem (nothing half-applied)."""
    deltas, problems, unchanged, kinds = {}, [], 0, set()
    for module in sorted(modules):
        got, same, family = _module_deltas(module, modules[module], target, problems)
        deltas.update(got)
        unchanged += same
        kinds |= family
    if problems:
        raise ArchitectureMismatchError(
            f"The edit does not fit this {target.display_name} UNet: {'; '.join(problems[:5])}"
            f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. It was made for a model with another "
            "configuration; nothing was applied."
        )
    return deltas, unchanged, kinds


def read_edit_file(path: str | os.PathLike, target: TargetUNet, *, strict: bool = False) -> LoadedEdit:
    """Read any accepted edit file as deltas for ``target`` (see the module docstring for the formats).

    Args:
        path: the file; its container (safetensors / PyTorch) and format are recognised from its content.
        target: the UNet the edit will be applied to (names, shapes, and base weights for full-weight files).
        strict: raise when a key is not applied (unknown names, text-encoder parts); default: report them.

    Returns:
        A :class:`LoadedEdit`; apply its ``deltas`` with ``edits.attach_edit`` (diffusers) or
        ``make_patched_model`` (ComfyUI).

    Raises:
        EditFileError: unreadable or unsafe file, no UNet edit in it, NaN/inf values, unsupported LoRA variants.
        ArchitectureMismatchError: the edit was made for another model (text width, shapes).
    """
    return read_edit_tensors(read_tensor_file(path), target, path=str(path), strict=strict)


def read_edit_tensors(
    raw: RawEdit, target: TargetUNet, *, path: str = "", strict: bool = False
) -> LoadedEdit:
    """:func:`read_edit_file` on a file already read (``path`` only names it in messages and the summary)."""
    _refuse_unsupported(raw.tensors)
    check_context_width(raw.tensors, target, raw.metadata)
    modules, ignored = _group(raw, target)
    used = {key: t for m in modules.values() for key, t in m.parts.values()}
    check_finite(used, f"Edit file {path!r}")
    if strict and ignored:
        raise EditFileError(f"{len(ignored)} keys of {path!r} would not be applied (strict): {ignored[:5]}.")
    deltas, unchanged, kinds = _all_deltas(modules, target)
    if not deltas and not unchanged:
        raise EditFileError(
            f"{path!r} holds no edit for this {target.display_name} UNet: none of its {len(raw.tensors)} keys is a "
            f"UNet weight, LoRA or .diff part of it (e.g. {[k for k, _ in ignored[:3]]})."
        )
    for key in [k for k in deltas if target.patchable is not None and k not in target.patchable]:
        if bool(deltas[key].any()):
            ignored.append((key, "changed, but this backend patches only Linear/Conv2d weights"))
        del deltas[key]
    check_finite(deltas, f"The edit computed from {path!r}")
    spellings = {s for m in modules.values() for s in m.spellings}
    entries = sum(1 for m in modules.values() for r in m.parts if r in ("weight", "bias"))
    fmt = describe_format(kinds, spellings, entries, raw, target, modules)
    if ignored:
        logger.warning("%s: %d keys not applied (e.g. %s)", path, len(ignored), ignored[:2])
    return LoadedEdit(
        deltas=deltas,
        source_format=fmt,
        metadata=raw.metadata,
        ignored=tuple(ignored),
        unchanged=unchanged,
        path=path,
    )
