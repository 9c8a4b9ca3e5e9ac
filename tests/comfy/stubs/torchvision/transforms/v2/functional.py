"""Stub of ``torchvision.transforms.v2.functional``: ``InterpolationMode`` is real, the rest placeholders."""

from ..._stub import module_getattr
from ..functional import InterpolationMode

__all__ = ["InterpolationMode"]

__getattr__ = module_getattr(__name__)
