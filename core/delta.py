"""Trainable weight deltas with a teacher switch (modelled on peft's ``disable_adapters``).

A :class:`WeightDelta` holds fp32 ``ΔW`` (and ``Δb``) for one UNet module, zero at init, so
attaching it changes nothing. A :class:`DeltaSet` groups the deltas of one training run and owns
the single on/off switch: inside ``with deltas.teacher():`` every delta is off, so the same UNet
computes the frozen model's prediction — no second copy of the UNet is needed.

How a delta reaches the forward pass is the backend's business (forward hooks for diffusers,
weight wrappers for ComfyUI); :meth:`WeightDelta.delta_weight` is the single source of the delta
for forward, export and merge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


class WeightDelta(nn.Module):
    """fp32 additive delta for one module's weight (and bias).

    Args:
        weight_shape (`torch.Size`): shape of the base weight.
        bias_shape (`torch.Size`, *optional*): shape of the base bias; ``None`` if the module has none.
        device (`torch.device`): where the delta lives (the UNet's device).
    """

    def __init__(self, weight_shape: torch.Size, bias_shape: torch.Size | None, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(weight_shape, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(bias_shape, dtype=torch.float32, device=device))
            if bias_shape is not None
            else None
        )
        self._switch: DeltaSet | None = None

    @property
    def enabled(self) -> bool:
        """Whether the delta takes part in forward passes (read-only; see :meth:`DeltaSet.teacher`)."""
        return self._switch is None or self._switch.enabled

    def delta_weight(self) -> torch.Tensor:
        """The weight delta (fp32), the one source for forward, export and merge."""
        return self.weight

    def delta_bias(self) -> torch.Tensor | None:
        return self.bias

    def apply_to_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w + ΔW`` in ``w``'s dtype when enabled, else ``w`` itself (bit-identical)."""
        if not self.enabled:
            return w
        return (w.float() + self.delta_weight()).to(w.dtype)

    def apply_to_bias(self, b: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.bias is None:
            return b
        return (b.float() + self.bias).to(b.dtype)


class DeltaSet(nn.Module):
    """The deltas of one run, keyed by LDM module name, with one teacher switch.

    Args:
        deltas (`dict[str, WeightDelta]`): LDM module name -> delta.
        on_detach (`Callable[[], None]`, *optional*): the backend's undo (removes hooks/wrappers).
    """

    def __init__(self, deltas: dict[str, WeightDelta], on_detach: Callable[[], None] | None = None):
        super().__init__()
        # ModuleDict keys may not contain dots.
        self._names = list(deltas)
        self.items_ = nn.ModuleDict({n.replace(".", "__"): d for n, d in deltas.items()})
        self._enabled = True
        self._on_detach = on_detach
        for d in deltas.values():
            # A plain attribute, not a registered submodule: registering it would make a cycle
            # (set -> delta -> set) and `.to()` / `state_dict()` would recurse forever.
            object.__setattr__(d, "_switch", self)

    @property
    def enabled(self) -> bool:
        """Whether deltas are active. Change it only through :meth:`teacher`."""
        return self._enabled

    def names(self) -> list[str]:
        return list(self._names)

    def __getitem__(self, name: str) -> WeightDelta:
        return self.items_[name.replace(".", "__")]

    def named_deltas(self) -> Iterator[tuple[str, WeightDelta]]:
        for n in self._names:
            yield n, self[n]

    @contextlib.contextmanager
    def teacher(self) -> Iterator[None]:
        """Turn every delta off (the frozen model) and compute without grad; restores in ``finally``."""
        previous = self._enabled
        self._enabled = False
        try:
            with torch.no_grad():
                yield
        finally:
            self._enabled = previous

    def state_dict_ldm(self) -> dict[str, torch.Tensor]:
        """``{"<ldm module>.weight": ΔW, "<ldm module>.bias": Δb}`` as detached fp32 CPU tensors."""
        out: dict[str, torch.Tensor] = {}
        for name, d in self.named_deltas():
            out[f"{name}.weight"] = d.delta_weight().detach().float().cpu().contiguous()
            if d.bias is not None:
                out[f"{name}.bias"] = d.delta_bias().detach().float().cpu().contiguous()
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def detach(self) -> None:
        """Remove the deltas from the model (idempotent)."""
        if self._on_detach is not None:
            self._on_detach()
            self._on_detach = None

    def __enter__(self) -> DeltaSet:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
