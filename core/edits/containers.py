"""Reading the tensors of an edit file safely, whatever its container: safetensors or a PyTorch file.

The container is recognised from the first bytes, never from the file name. PyTorch files (``.pt``/
``.ckpt``/``.bin``) are pickles, so they are loaded only with ``torch.load(weights_only=True)``: a pickle
that asks for anything but tensors and plain containers (e.g. one whose ``__reduce__`` calls
``os.system``) is refused before any of it runs.
"""

from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import EditFileError

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_OPCODE = 0x80


@dataclass(frozen=True)
class RawEdit:
    """Tensors and header of a file, before interpretation.

    Attributes:
        tensors: key -> tensor (CPU, as stored).
        metadata: header metadata (safetensors) or the scalar entries of a PyTorch file, as strings.
        container: ``"safetensors"`` or ``"pytorch (weights_only)"``.
        skipped: keys of non-tensor entries that were not read (e.g. a checkpoint's optimizer state).
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    container: str
    skipped: tuple[str, ...] = field(default_factory=tuple)


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise EditFileError(f"Cannot read edit file {str(path)!r}: {e.strerror or e}.") from e
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < os.path.getsize(path):
            return "safetensors"
    if head.startswith(ZIP_MAGIC) or (head and head[0] == PICKLE_PROTOCOL_OPCODE):
        return "pytorch"
    raise EditFileError(
        f"{str(path)!r} is not an edit file: it is neither safetensors nor a PyTorch state dict "
        f"(starts with {head[:8]!r}). Expected a .safetensors edit/LoRA/UNet file or a .pt/.ckpt state dict."
    )


def _read_safetensors(path: Path) -> RawEdit:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise EditFileError(
            f"Could not read safetensors file {str(path)!r}: {e}. The file may be truncated."
        ) from e
    return RawEdit(tensors=tensors, metadata=metadata, container="safetensors")


def _scalar_text(value: object) -> str | None:
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    return None


def _read_pytorch(path: Path) -> RawEdit:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EditFileError(
            f"Refused to load {str(path)!r}: its pickle is not plain tensors ({str(e).splitlines()[0]}). "
            "Pickles can run code, so only weights-only files are read. Convert it to .safetensors where it was "
            "made, or re-save just its state dict."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise EditFileError(
            f"Could not read PyTorch file {str(path)!r}: {e}. The file may be truncated."
        ) from e
    if not isinstance(data, dict):
        raise EditFileError(
            f"{str(path)!r} holds a {type(data).__name__}, expected a state dict (name -> tensor)."
        )
    metadata = {
        k: text for k, v in data.items() if isinstance(k, str) and (text := _scalar_text(v)) is not None
    }
    nested = data.get("state_dict")
    state = nested if isinstance(nested, dict) else data
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    skipped = tuple(
        sorted(
            str(k)
            for k, v in data.items()
            if not isinstance(v, torch.Tensor) and k != "state_dict" and k not in metadata
        )
    )
    skipped += tuple(
        sorted(str(k) for k, v in state.items() if state is nested and not isinstance(v, torch.Tensor))
    )
    return RawEdit(tensors=tensors, metadata=metadata, container="pytorch (weights_only)", skipped=skipped)


def read_tensor_file(path: str | os.PathLike) -> RawEdit:
    """Every tensor (and the header metadata) of a safetensors or weights-only PyTorch file.

    A PyTorch file's ``{"state_dict": {...}}`` nesting (CompVis/Lightning checkpoints) is unwrapped.

    Raises:
        EditFileError: missing/unreadable file, an unknown container, or a pickle that is not plain tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise EditFileError(f"Edit file {str(path)!r} does not exist.")
    raw = _read_safetensors(path) if _sniff(path) == "safetensors" else _read_pytorch(path)
    if not raw.tensors:
        raise EditFileError(f"{str(path)!r} contains no tensors; it is not an edit file.")
    return raw
