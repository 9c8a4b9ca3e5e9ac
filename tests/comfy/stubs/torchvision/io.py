"""Stub of ``torchvision.io``: importable, every name a placeholder that raises when used."""

from ._stub import module_getattr

__getattr__ = module_getattr(__name__)
