"""Deterministic seeding: one place that seeds Python, NumPy and torch and builds generators."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``: local randomness that
    does not disturb (or depend on) the global state."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
