"""ComfyUI host quirks that training has to work around, each a context manager that undoes itself.

ComfyUI runs every node under ``torch.inference_mode()``, so the weights its loaders create are
*inference tensors* that autograd refuses to save for backward, and its CLIP text encoder adds its
residuals in place (``x += attn(x)``), which breaks backward through it.
The managers here switch autograd back on, swap inference tensors for ordinary copies with the same
values, and patch the CLIP layer — and restore everything in ``finally``, so the host's model is left
as it was found.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Leave ComfyUI's ``inference_mode`` and enable autograd for the block (both restored on exit)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@dataclass
class _Swap:
    owner: torch.nn.Module
    leaf: str
    is_param: bool
    requires_grad: bool
    was_inference: bool
    replacement: torch.Tensor | None


def _slots(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, bool]]:
    """Every (owner module, attribute, is_parameter) that holds a tensor; no tensor references kept."""
    out = []
    for owner in module.modules():
        out += [(owner, leaf, True) for leaf, p in owner._parameters.items() if p is not None]
        out += [(owner, leaf, False) for leaf, b in owner._buffers.items() if b is not None]
    return out


def _get(owner: torch.nn.Module, leaf: str, is_param: bool) -> torch.Tensor | None:
    return owner._parameters.get(leaf) if is_param else owner._buffers.get(leaf)


def _wrap(tensor: torch.Tensor, is_param: bool, requires_grad: bool) -> torch.Tensor:
    return torch.nn.Parameter(tensor, requires_grad=requires_grad) if is_param else tensor


def _shared_ids(tensors) -> set[int]:
    """ids of tensors that occur more than once (tied weights); computed while all are alive."""
    seen: set[int] = set()
    shared: set[int] = set()
    for t in tensors:
        (shared if id(t) in seen else seen).add(id(t))
    return shared


@contextlib.contextmanager
def frozen_trainable_copies(module: torch.nn.Module) -> Iterator[None]:
    """Make ``module`` usable in a backward pass without changing any value, and freeze it.

    Inside the block every parameter has ``requires_grad=False`` (gradients reach only what the
    caller trains) and every inference-tensor parameter or buffer is replaced by an ordinary clone
    with identical values (trap 1). Originals are not kept alongside their clones, because that
    would double the model's memory: tensors are swapped one at a time. On exit each clone still in
    place is swapped back for an inference tensor with the same values and ``requires_grad`` flags
    are restored; a tensor the host replaced meanwhile (e.g. by unloading the model) is left alone.
    Tied tensors stay tied.

    Must be entered with inference mode off (inside :func:`grad_enabled`).
    """
    swaps: list[_Swap] = []
    try:
        slots = _slots(module)
        shared = _shared_ids(_get(*s) for s in slots)
        tied: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(original) -> (original, clone)
        with torch.no_grad():
            for owner, leaf, is_param in slots:
                tensor = _get(owner, leaf, is_param)
                requires_grad = bool(is_param and tensor.requires_grad)
                if tensor.is_inference():
                    if id(tensor) in tied:
                        placed = tied[id(tensor)][1]
                    else:
                        placed = _wrap(tensor.detach().clone(), is_param, False)
                        if id(tensor) in shared:
                            tied[id(tensor)] = (tensor, placed)
                    setattr(owner, leaf, placed)
                    swaps.append(_Swap(owner, leaf, is_param, requires_grad, True, placed))
                elif requires_grad:
                    tensor.requires_grad_(False)
                    swaps.append(_Swap(owner, leaf, is_param, True, False, tensor))
                del tensor
        tied.clear()
        logger.debug("training copies: %d tensors swapped or frozen", len(swaps))
        yield
    finally:
        _restore(swaps)


def _restore(swaps: list[_Swap]) -> None:
    """Undo :func:`frozen_trainable_copies`, dropping each clone as soon as it is replaced."""
    shared = _shared_ids(s.replacement for s in swaps)
    tied: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    while swaps:
        s = swaps.pop()
        current, s.replacement = s.replacement, None
        if _get(s.owner, s.leaf, s.is_param) is not current:
            continue  # the host replaced it meanwhile; its tensor is the one to keep
        if not s.was_inference:
            current.requires_grad_(s.requires_grad)
            continue
        if id(current) in tied:
            placed = tied[id(current)][1]
        else:
            with torch.inference_mode():
                placed = _wrap(current.detach().clone(), s.is_param, s.requires_grad)
            if id(current) in shared:
                tied[id(current)] = (current, placed)
        setattr(s.owner, s.leaf, placed)
        del current


def _clip_layer_forward_out_of_place(self, x, mask=None, optimized_attention=None):
    """Pre-norm transformer layer with out-of-place residual adds (autograd-safe)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


@contextlib.contextmanager
def autograd_safe_clip() -> Iterator[None]:
    """Patch ``comfy.clip_model.CLIPLayer.forward`` with an out-of-place version (trap 2).

    ComfyUI's layer does ``x += ...``, which makes backward through the text encoder fail with
    "modified by an inplace operation". The patch is global to the process and restored on exit.
    """
    import comfy.clip_model

    layer = comfy.clip_model.CLIPLayer
    previous = layer.forward
    layer.forward = _clip_layer_forward_out_of_place
    try:
        yield
    finally:
        layer.forward = previous
