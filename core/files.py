"""Writing files safely: atomic safetensors with string metadata, sanitized names, no silent overwrite."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import OutputPathError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]{0,127}$")


def sanitize_name(name: str, *, what: str = "file name") -> str:
    """Check a user-given bare file name (no folders, no traversal, ASCII letters/digits/._-).

    Raises:
        OutputPathError: with the value received and what is allowed.
    """
    stripped = name.strip()
    if not stripped or not _SAFE_NAME.match(stripped) or stripped in {".", ".."} or ".." in stripped:
        raise OutputPathError(
            f"`{what}` must be a bare name of ASCII letters, digits, '.', '_' or '-' (no folders), got {name!r}. "
            "Pick a plain name such as 'no_circles'."
        )
    return stripped


def metadata_to_strings(metadata: Mapping[str, object]) -> dict[str, str]:
    """safetensors metadata must be ``str -> str``; non-strings are JSON-encoded."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def check_destination(path: str | os.PathLike, *, overwrite: bool, how: str = "allow overwriting") -> Path:
    """Refuse a destination whose folder is missing or read-only, or that exists while ``overwrite`` is off.

    Callers run it before expensive work, so a bad output path costs no training time. ``how`` names the
    caller's own way to allow overwriting (the CLI's flag, the node's input).

    Raises:
        OutputPathError: with the path and how to proceed.
    """
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(
            f"Output folder {str(folder)!r} does not exist; create it first or choose another location."
        )
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"Output folder {str(folder)!r} is not writable; choose another location.")
    if dest.exists() and not overwrite:
        raise OutputPathError(f"{str(dest)!r} already exists; choose another name or {how}.")
    return dest


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it becomes ``path`` (replacing it with ``overwrite``),
    on any error it is removed, so a folder output is either complete or absent."""
    dest = check_destination(path, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save ``tensors`` to ``path`` atomically: write a temp file in the same folder, then rename.

    A crash or interrupt leaves either no file or the complete file, never a half-written one.

    Args:
        tensors: name -> tensor (made contiguous and moved to CPU here).
        path: destination; its folder must exist and be writable.
        metadata: header metadata; values that are not strings are JSON-encoded.
        overwrite: replace an existing file (default: refuse).

    Returns:
        The destination path.

    Raises:
        OutputPathError: the folder is missing or not writable, or the file exists and ``overwrite`` is False.
    """
    dest = check_destination(path, overwrite=overwrite)
    folder = dest.parent if str(dest.parent) else Path(".")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=metadata_to_strings(metadata or {}))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dest
