"""Stub of ``torchvision.transforms``: ``InterpolationMode`` is real, every other name a placeholder."""

from .._stub import module_getattr
from .functional import InterpolationMode

__all__ = ["InterpolationMode"]

__getattr__ = module_getattr(__name__, submodules=("functional", "v2"))
