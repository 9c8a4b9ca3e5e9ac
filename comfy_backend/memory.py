"""Memory policy for training on the host's UNet: bounded teacher batches, optional gradient checkpointing.

The issue's bar for in-graph training is one UNet in memory with peak use <= its weights + 20 % (plus
the fp32 deltas and their optimizer state). Two things exceed it when left alone (measured with
``benchmarks/esd_comfy_memory.py``): the frozen model's batched no-grad calls (ESD samples its
trajectory bank 8 trajectories x CFG = 16 rows at a time), whose activations grow with the batch, and
the student's backward, which keeps every block's activations. :func:`rows_per_call` sizes teacher
chunks with ComfyUI's own activation estimate (``BaseModel.memory_required``, what its samplers use to
batch conds), and :func:`gradient_checkpointing` recomputes the UNet's layers in the backward pass instead of
storing their activations, as ComfyUI's ``TrainLoraNode`` does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.utils.checkpoint

#: Share of the UNet's weight bytes that one no-grad (teacher or sampling) call may use for activations.
TEACHER_ACTIVATION_SHARE = 0.15
#: ... but at least this much: below it, splitting a batch saves nothing that matters (small models).
MIN_TEACHER_BUDGET = 256 * 2**20


#: UNets with fewer weight bytes than this train without gradient checkpointing even when ``low_memory`` is on:
#: their activations are small anyway, and checkpointing nearly doubled a ShapesWorld ESD run (400 steps: 34 s with
#: it, 18 s without, on two CPU threads).
MIN_CHECKPOINT_BYTES = 256 * 2**20


def worth_checkpointing(unet: torch.nn.Module) -> bool:
    """Whether gradient checkpointing saves memory that matters for ``unet`` (see ``MIN_CHECKPOINT_BYTES``)."""
    return weight_bytes(unet) >= MIN_CHECKPOINT_BYTES


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as held (dtype and storage as loaded)."""
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def teacher_budget(unet: torch.nn.Module) -> float:
    """Activation bytes one no-grad call may use: ``TEACHER_ACTIVATION_SHARE`` of ``unet``'s weight bytes,
    at least ``MIN_TEACHER_BUDGET``."""
    return max(TEACHER_ACTIVATION_SHARE * weight_bytes(unet), MIN_TEACHER_BUDGET)


def rows_per_call(base_model: torch.nn.Module, shape: Sequence[int], budget_bytes: float) -> int:
    """How many rows of a ``[B, C, h, w]`` input one call may take so that ComfyUI's activation estimate
    (``BaseModel.memory_required``) stays within ``budget_bytes``: between 1 and ``B``."""
    per_row = float(base_model.memory_required([1, *shape[1:]]))
    if per_row <= 0:
        return int(shape[0])
    return max(1, min(int(shape[0]), int(budget_bytes // per_row)))


def _checkpoint_targets(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost modules below ``module`` that are not containers (ResBlocks, SpatialTransformers, convs).

    ComfyUI's UNet runs its ``TimestepEmbedSequential`` blocks layer by layer (``forward_timestep_embed``)
    rather than through their ``forward``, so containers are looked into, as ``TrainLoraNode`` does."""
    found: list[torch.nn.Module] = []
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            found += _checkpoint_targets(child)
        else:
            found.append(child)
    return found


@contextlib.contextmanager
def gradient_checkpointing(unet: torch.nn.Module) -> Iterator[int]:
    """Checkpoint the UNet's outermost layers for the block; yields how many were wrapped.

    Each layer's forward runs through ``torch.utils.checkpoint`` (non-reentrant) when autograd records,
    so the backward recomputes it instead of keeping its activations (including the summed weights of
    delta-wrapped layers): about one extra forward pass per training step. No-grad calls (teacher,
    sampling) run the plain forward. The instance attributes are removed in ``finally``; the shared
    module is left as it was.
    """
    wrapped: list[torch.nn.Module] = []
    try:
        for block in _checkpoint_targets(unet):
            if "forward" in block.__dict__:
                continue  # already wrapped (nested sessions) or patched by someone else: leave it
            block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block))
            wrapped.append(block)
        yield len(wrapped)
    finally:
        for block in wrapped:
            block.__dict__.pop("forward", None)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def in_row_chunks(eps, x_t: torch.Tensor, t: torch.Tensor, cond, rows: int) -> torch.Tensor:
    """``eps(x_t, t, cond)`` computed ``rows`` rows at a time and concatenated (``cond``: 1 or B rows)."""
    batch = x_t.shape[0]
    if rows >= batch:
        return eps(x_t, t, cond)
    t, cond = t.reshape(-1).expand(batch), cond.expand_to(batch)
    return torch.cat(
        [eps(x_t[i : i + rows], t[i : i + rows], cond[i : i + rows]) for i in range(0, batch, rows)]
    )
