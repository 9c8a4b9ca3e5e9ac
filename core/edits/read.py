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
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ArchitectureMismatchError, EditFileError
from ..unet.keymap import CHECKPOINT_UNET_PREFIX
from .containers import RawEdit, read_tensor_file
from .target import KOHYA_PREFIXES, WIDTH_FAMILIES, TargetUNet

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
_CROSS_KV = re.compile(r"attn2[._](?:processor[._])?to_[kv]$")


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

    def summary(self, strength: float | None = None) -> str:
        """A few lines for people: what was applied, what was ignored and why, the file's metadata."""
        modules = {k.rsplit(".", 1)[0] for k in self.deltas}
        at = "" if strength is None else f" at strength {strength:g}"
        lines = [
            f"Edit: {Path(self.path).name or '?'}",
            f"Format: {self.source_format}",
            f"Applied: {len(self.deltas)} tensors on {len(modules)} UNet modules{at}",
        ]
        if self.unchanged:
            lines.append(f"Unchanged (equal to the loaded model): {self.unchanged} tensors")
        if self.ignored:
            reasons = Counter(reason for _, reason in self.ignored)
            lines.append(
                f"Ignored: {len(self.ignored)} keys — " + "; ".join(f"{r} ({n})" for r, n in reasons.items())
            )
            lines += [f"  e.g. {key}: {reason}" for key, reason in self.ignored[:3]]
        shown = [f"{k}={v if len(v) <= 80 else v[:77] + '...'}" for k, v in sorted(self.metadata.items())][
            :12
        ]
        lines.append("Metadata: " + ("; ".join(shown) if shown else "none"))
        return "\n".join(lines)


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


def _non_unet_reason(key: str, is_checkpoint: bool) -> str | None:
    if is_checkpoint and not key.startswith(CHECKPOINT_UNET_PREFIX):
        return "not part of the UNet (VAE, text encoder or schedule of a full checkpoint)"
    for prefix, what in NON_UNET:
        if key.startswith(prefix):
            return f"{what}, not the UNet (this edit applies to the UNet only)"
    return None


def _unsupported(tensors: dict[str, torch.Tensor]) -> None:
    found = sorted({what for key in tensors for part, what in UNSUPPORTED_PARTS.items() if part in key})
    if found:
        raise EditFileError(
            f"The file uses LoRA variants Concept Guard does not apply: {', '.join(found)}. Only plain "
            "low-rank (up @ down) LoRAs, .diff patches and weights are accepted; load this file with ComfyUI's "
            "LoraLoaderModelOnly instead."
        )


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise EditFileError(
            f"{what} holds NaN/inf values in {len(bad)} tensors (e.g. {bad[:3]}); the file is corrupt or the "
            "training that made it diverged. Nothing was applied: retrain or re-export the edit."
        )


def _family(width: int, metadata: dict[str, str]) -> str:
    text = " ".join(
        metadata.get(k, "") for k in ("concept_guard.arch", "ss_base_model_version", "modelspec.architecture")
    )
    text = text.lower()
    if "xl" in text:
        return "SDXL"
    if "v2" in text or "sd2" in text:
        return "SD2.x"
    if "v1" in text or "sd1" in text:
        return "SD1.x"
    return WIDTH_FAMILIES.get(width, f"a model with {width}-wide text conditioning")


def _check_context_width(
    tensors: dict[str, torch.Tensor], target: TargetUNet, metadata: dict[str, str]
) -> None:
    """Cross-attention k/v read the text states: their input width names the model family the edit is for."""
    want = target.context_width
    if want is None:
        return
    for key, tensor in tensors.items():
        split = _role(key)
        if (
            split
            and _CROSS_KV.search(split[0])
            and split[1] in ("weight", "diff", "down")
            and tensor.dim() >= 2
        ):
            width = int(tensor.shape[1])
            if width != want:
                raise ArchitectureMismatchError(
                    f"This edit was made for {_family(width, metadata)} (cross-attention reads {width}-wide text "
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
        reason = _non_unet_reason(key, is_checkpoint)
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


def _describe(
    kinds: set[str],
    spellings: set[str],
    entries: int,
    raw: RawEdit,
    target: TargetUNet,
    modules: dict[str, _Module],
) -> str:
    names = ", ".join(sorted(spellings))
    labels = []
    if "diff" in kinds:
        ours = raw.metadata.get("format", "").startswith("concept_guard.diff")
        labels.append(f"{'Concept Guard' if ours else 'ComfyUI'} .diff patches ({names})")
    if "lora" in kinds:
        labels.append(f"low-rank LoRA ({names})")
    if "weights" in kinds:
        if any(k.startswith(CHECKPOINT_UNET_PREFIX) for k in raw.tensors):
            labels.append("full LDM checkpoint (CompVis-era ESD style); edit = file - loaded model")
        elif entries >= len(target.weights):
            labels.append(f"full UNet state dict ({names}); edit = file - loaded model")
        elif all(_CROSS_KV.search(m) for m in modules):
            labels.append(f"partial UNet weights, cross-attention to_k/to_v only (UCE style, {names})")
        else:
            style = ", ESD 2025 style" if "diffusers names" in spellings else ""
            labels.append(f"partial UNet state dict ({names}{style}); edit = file - loaded model")
    return " + ".join(labels) + f" [{raw.container}]"


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
    raw = read_tensor_file(path)
    _unsupported(raw.tensors)
    _check_context_width(raw.tensors, target, raw.metadata)
    modules, ignored = _group(raw, target)
    used = {key: t for m in modules.values() for key, t in m.parts.values()}
    _check_finite(used, f"Edit file {str(path)!r}")
    if strict and ignored:
        raise EditFileError(
            f"{len(ignored)} keys of {str(path)!r} would not be applied (strict): {ignored[:5]}."
        )
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
    if not deltas and not unchanged:
        raise EditFileError(
            f"{str(path)!r} holds no edit for this {target.display_name} UNet: none of its {len(raw.tensors)} keys is a "
            f"UNet weight, LoRA or .diff part of it (e.g. {[k for k, _ in ignored[:3]]})."
        )
    for key in [k for k in deltas if target.patchable is not None and k not in target.patchable]:
        if bool(deltas[key].any()):
            ignored.append((key, "changed, but this backend patches only Linear/Conv2d weights"))
        del deltas[key]
    _check_finite(deltas, f"The edit computed from {str(path)!r}")
    spellings = {s for m in modules.values() for s in m.spellings}
    entries = sum(1 for m in modules.values() for r in m.parts if r in ("weight", "bias"))
    fmt = _describe(kinds, spellings, entries, raw, target, modules)
    if ignored:
        logger.warning("%s: %d keys not applied (e.g. %s)", path, len(ignored), ignored[:2])
    return LoadedEdit(
        deltas=deltas,
        source_format=fmt,
        metadata=raw.metadata,
        ignored=tuple(ignored),
        unchanged=unchanged,
        path=str(path),
    )
