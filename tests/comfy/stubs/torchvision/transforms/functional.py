"""Stub of ``torchvision.transforms.functional``: the real ``InterpolationMode``, every other name a placeholder."""

from enum import Enum

from .._stub import module_getattr


class InterpolationMode(Enum):
    """torchvision's interpolation modes, with its string values (transformers maps PIL filters to them)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    # For PIL compatibility
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


__getattr__ = module_getattr(__name__)
