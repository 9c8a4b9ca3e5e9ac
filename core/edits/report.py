"""Text about a read edit file for people: the label of its format and the few-line summary.

Shared by Concept Guard's edit reader (``read.py``: ``LoadedEdit.summary``, used by the CLI and the nodes) and
the ComfyUI adapter's LoRA path (``comfy_backend/lora.py``), so that both loaders report alike.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

from ..unet.keymap import CHECKPOINT_UNET_PREFIX
from .containers import RawEdit
from .target import WIDTH_FAMILIES, TargetUNet

#: A cross-attention key/value projection in any spelling (its input width is the text-states width).
CROSS_KV = re.compile(r"attn2[._](?:processor[._])?to_[kv]$")


def describe_format(
    kinds: set[str],
    spellings: set[str],
    entries: int,
    raw: RawEdit,
    target: TargetUNet,
    modules: Collection[str],
) -> str:
    """What the file was recognised as, e.g. ``"low-rank LoRA (kohya, LDM names) [safetensors]"``.

    Args:
        kinds: the families found: ``"diff"``, ``"lora"``, ``"weights"``.
        spellings: how module names were spelled (``"kohya, LDM names"``, ``"diffusers names"``, ...).
        entries: number of full-weight entries (``weight``/``bias``) in the file.
        raw: the file's tensors and container.
        target: the UNet it was read for.
        modules: LDM names of the modules the file edits.
    """
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
        elif all(CROSS_KV.search(m) for m in modules):
            labels.append(f"partial UNet weights, cross-attention to_k/to_v only (UCE style, {names})")
        else:
            style = ", ESD 2025 style" if "diffusers names" in spellings else ""
            labels.append(f"partial UNet state dict ({names}{style}); edit = file - loaded model")
    return " + ".join(labels) + f" [{raw.container}]"


def model_family(width: int, metadata: Mapping[str, str]) -> str:
    """The model family an edit was made for, from its metadata or else its text-states width (messages)."""
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


def ignored_reasons(ignored: Sequence[tuple[str, str]]) -> str:
    """``"reason (count); reason (count)"`` over ``(key, reason)`` pairs, in first-seen order."""
    return "; ".join(f"{reason} ({n})" for reason, n in Counter(reason for _, reason in ignored).items())


def ignored_examples(ignored: Sequence[tuple[str, str]], shown: int = 3) -> list[str]:
    """The first few ``(key, reason)`` pairs as indented ``e.g.`` lines."""
    return [f"  e.g. {key}: {reason}" for key, reason in ignored[:shown]]


def metadata_line(metadata: Mapping[str, str]) -> str:
    """The file's header metadata on one line (12 entries at most, long values shortened)."""
    shown = [f"{k}={v if len(v) <= 80 else v[:77] + '...'}" for k, v in sorted(metadata.items())][:12]
    return "Metadata: " + ("; ".join(shown) if shown else "none")


def edit_summary(
    path: str,
    source_format: str,
    applied: Iterable[str],
    *,
    unchanged: int = 0,
    ignored: Sequence[tuple[str, str]] = (),
    metadata: Mapping[str, str] | None = None,
    strength: float | None = None,
    loader: str | None = None,
) -> str:
    """A few lines for people: what was applied, what was ignored and why, the file's metadata.

    Args:
        path: the file read; source_format: what it was recognised as.
        applied: LDM parameter keys that take a delta.
        unchanged: full-weight entries equal to the loaded model's.
        ignored: ``(file key, reason)`` of every key that is not applied.
        strength: shown when given; loader: which loader applied the edit, shown when given.
    """
    applied = list(applied)
    modules = {k.rsplit(".", 1)[0] for k in applied}
    at = "" if strength is None else f" at strength {strength:g}"
    lines = [f"Edit: {Path(path).name or '?'}", f"Format: {source_format}"]
    if loader:
        lines.append(f"Loader: {loader}")
    lines.append(f"Applied: {len(applied)} tensors on {len(modules)} UNet modules{at}")
    if unchanged:
        lines.append(f"Unchanged (equal to the loaded model): {unchanged} tensors")
    if ignored:
        lines.append(f"Ignored: {len(ignored)} keys — {ignored_reasons(ignored)}")
        lines += ignored_examples(ignored)
    lines.append(metadata_line(metadata or {}))
    return "\n".join(lines)
