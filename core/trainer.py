"""The one training loop every method shares.

A method supplies a ``loss_fn(step, generator) -> scalar tensor`` and the parameters to optimise
(deltas for ESD, embedding rows for textual inversion); this loop owns the optimiser, mixed
precision, the NaN guard, progress reporting and interrupts. Interrupts are simply exceptions
raised from ``on_step`` (ComfyUI's ``throw_exception_if_processing_interrupted``); nothing is
saved by this loop, so an interrupted or diverged run never leaves a file behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .errors import TrainingDivergedError
from .seeding import make_generator

logger = logging.getLogger(__name__)

#: ``on_step(step, total, loss)`` — called after every optimiser step; may raise to interrupt.
#: Methods may also call it with ``step == 0`` (and ``loss`` NaN) while preparing data.
StepCallback = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        losses (`list[float]`): loss per step.
        seconds (`float`): wall time of the optimisation loop (setup such as bank building excluded).
        setup_seconds (`float`): wall time spent preparing data before the loop.
        iterations (`int`): optimiser steps taken.
        tensors (`dict[str, torch.Tensor]`): the trained result (e.g. LDM-keyed deltas), CPU fp32.
        metadata (`dict[str, object]`): how it was made, for the file header.
    """

    losses: list[float]
    seconds: float
    iterations: int
    setup_seconds: float = 0.0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, object] = field(default_factory=dict)

    def provenance(self, backend) -> dict[str, str]:
        """The header entries every trained file carries: the base model it was trained on and the final loss."""
        return {
            "concept_guard.base_fingerprint": backend.fingerprint,
            "concept_guard.arch": backend.arch,
            "concept_guard.final_loss": f"{self.final_loss:.6g}",
        }

    @property
    def final_loss(self) -> float:
        """Mean of the last 10 % of losses (at least one): a stable summary of where training ended."""
        if not self.losses:
            return float("nan")
        k = max(1, len(self.losses) // 10)
        return float(sum(self.losses[-k:]) / k)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (deltas and optimiser state stay fp32); a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimise(
    params: Iterable[torch.nn.Parameter],
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    *,
    iterations: int,
    lr: float,
    seed: int,
    device: torch.device,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Run ``iterations`` Adam steps on ``params`` minimising ``loss_fn``.

    Args:
        params: fp32 parameters to train (nothing else receives updates).
        loss_fn: ``(step, generator) -> loss``; draw all randomness from ``generator`` (CPU, seeded).
        iterations: number of optimiser steps (> 0).
        lr: Adam learning rate.
        seed: seeds the generator handed to ``loss_fn``.
        device: compute device (selects autocast).
        on_step: progress/interrupt callback, see :data:`StepCallback`.

    Returns:
        TrainResult with losses and timing (no tensors; the caller exports its own).

    Raises:
        TrainingDivergedError: the loss became NaN or infinite (training stops at once).
    """
    params = [p for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    gen = make_generator(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(iterations):
        opt.zero_grad(set_to_none=True)
        with autocast_for(device):
            loss = loss_fn(step, gen)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"The loss became {value} at step {step + 1}/{iterations}; training stopped and nothing was written. "
                f"Lower the learning rate (got lr={lr}) or check the inputs."
            )
        loss.backward()
        opt.step()
        losses.append(value)
        logger.debug("step %d/%d loss %.6f", step + 1, iterations, value)
        if on_step is not None:
            on_step(step + 1, iterations, value)
    seconds = time.perf_counter() - start
    return TrainResult(losses=losses, seconds=seconds, iterations=iterations)
