"""What every module of the torchvision stub shares: placeholders that fail loudly when used.

A name the stub does not really provide resolves to an :class:`Unavailable` placeholder, so that
``from torchvision.transforms.functional import pil_to_tensor`` (done at import time by transformers)
succeeds, and calling it, or reading any attribute of it, raises :class:`TorchvisionStubError`, an
``AttributeError`` that names the stub. Dunder names stay missing (``__all__``, ``__path__`` ...), so
import machinery, ``hasattr`` probes and ``from … import *`` behave as for an ordinary module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable


class TorchvisionStubError(AttributeError):
    """Raised when code actually uses something from the torchvision test stub."""


def _error(qualname: str) -> TorchvisionStubError:
    return TorchvisionStubError(
        f"{qualname} is not available: this is Concept Guard's test stub of torchvision "
        "(tests/comfy/stubs/torchvision). Install the real torchvision to use code paths that need it."
    )


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


class Unavailable:
    """Stands for ``qualname``; calling it or reading any of its attributes raises."""

    __slots__ = ("_qualname",)

    def __init__(self, qualname: str) -> None:
        object.__setattr__(self, "_qualname", qualname)

    def __call__(self, *args, **kwargs):
        raise _error(self._qualname)

    def __getattr__(self, name: str):
        if _is_dunder(name):
            raise AttributeError(name)
        raise _error(f"{self._qualname}.{name}")

    def __setattr__(self, name: str, value) -> None:
        raise _error(f"{self._qualname}.{name}")

    def __bool__(self) -> bool:
        raise _error(self._qualname)

    def __iter__(self):
        raise _error(self._qualname)

    def __repr__(self) -> str:
        return f"<unavailable {self._qualname} (Concept Guard's torchvision test stub)>"


def module_getattr(module_name: str, submodules: Iterable[str] = ()) -> Callable[[str], object]:
    """A module-level ``__getattr__``: real stub submodules are imported, any other name is a placeholder.

    Submodules must be imported here (not returned as placeholders): ``from torchvision import io``
    checks ``hasattr(torchvision, "io")`` before importing ``torchvision.io``.
    """
    known = frozenset(submodules)

    def __getattr__(name: str):
        if name in known:
            return importlib.import_module(f"{module_name}.{name}")
        if _is_dunder(name):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return Unavailable(f"{module_name}.{name}")

    return __getattr__
