"""Test-only stand-in for torchvision (CPU-only test machines have no torchvision wheel).

ComfyUI's ``comfy.model_base`` imports ``torchvision.transforms`` at import time (Cosmos and
ACE code paths) but Stable Diffusion models never call it. This stub satisfies the import and
fails loudly if anything actually uses torchvision. It is put on ``sys.path`` / ``PYTHONPATH``
only by ``tests/comfy/conftest.py``; real ComfyUI installs have the real package.
"""

# A valid, very old version: libraries that probe torchvision (transformers) then treat it as unusable.
__version__ = "0.0.0+concept-guard-stub"


def __getattr__(name: str):
    raise AttributeError(
        f"torchvision.{name} is not available: this is Concept Guard's test stub of torchvision. "
        "Install the real torchvision to use code paths that need it."
    )
