"""Stub of ``torchvision.transforms.v2`` (imported by transformers' image processors)."""

from ..._stub import module_getattr
from ..functional import InterpolationMode

__all__ = ["InterpolationMode"]

__getattr__ = module_getattr(__name__, submodules=("functional",))
