"""Test-only stand-in for torchvision (CPU-only test machines have no usable torchvision wheel).

ComfyUI's ``comfy.model_base`` imports ``torchvision.transforms`` at import time (Cosmos and ACE code
paths) and, inside the server, transformers (through diffusers) imports ``transforms.InterpolationMode``,
``transforms.functional``, ``transforms.v2.functional`` and ``io`` because it finds a torchvision
package; Stable Diffusion models never call any of it. So the stub is a package with those modules:
``InterpolationMode`` is a real Enum with torchvision's values, every other name is a placeholder that
raises :class:`~torchvision._stub.TorchvisionStubError` (an ``AttributeError`` naming this stub) when it
is called or its attributes are read. It is put on ``sys.path`` / ``PYTHONPATH`` only by
``tests/comfy/comfy_harness.py``; real ComfyUI installs have the real package.
"""

from ._stub import TorchvisionStubError, module_getattr

# A valid, very old version, marked as the stub's.
__version__ = "0.0.0+concept-guard-stub"

__all__ = ["TorchvisionStubError", "__version__"]

__getattr__ = module_getattr(__name__, submodules=("io", "transforms"))
