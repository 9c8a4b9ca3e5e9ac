"""Concept Guard: regulate what a Stable Diffusion model can generate.

This folder is both the ComfyUI custom-node pack (ComfyUI imports this file from
``custom_nodes/``) and the Python package ``concept_guard``. Nothing here imports
ComfyUI at import time, so ``import concept_guard`` works without it; ComfyUI calls
:func:`comfy_entrypoint`, which imports the nodes lazily.
"""

from .core.version import __version__

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: returns the extension that lists our nodes."""
    from .nodes import ConceptGuardExtension

    return ConceptGuardExtension()


__all__ = ["__version__", "WEB_DIRECTORY", "comfy_entrypoint"]
