"""The labelled comparison grid: rows per prompt, a block per model, labels wrapped, never cut off."""

from __future__ import annotations

import pytest
import torch
from concept_guard.core.grid import _GAP, _LINE, _PAD, grid_tensor, labelled_grid


def test_grid_size_follows_prompts_models_and_label_length():
    images = [[torch.rand(3, 3, 8, 8), torch.zeros(3, 3, 8, 8)] for _ in range(2)]
    short = labelled_grid(["a", "b"], ["base", "edited"], images, tile=16)
    long_text = "a very long prompt " * 8
    tall = labelled_grid([long_text, "b"], ["base", "edited"], images, tile=16)
    assert tall.width == short.width and tall.height > short.height  # wrapped onto more lines, not cut
    tensor = grid_tensor(short)
    assert tensor.shape == (1, short.height, short.width, 3) and 0 <= tensor.min() <= tensor.max() <= 1
    # inside the first row: the edited block holds the black (zero) images, the base block random ones
    y, block = _LINE + 2 * _PAD + 2, 3 * (16 + _PAD)
    assert tensor[0, y, short.width - _GAP - block + 2].sum() == 0
    assert tensor[0, y, short.width - 2 * (_GAP + block) + 2].sum() > 0


def test_grid_refuses_mismatched_rows():
    with pytest.raises(ValueError, match="rows"):
        labelled_grid(["a"], ["base", "edited"], [[torch.rand(1, 3, 8, 8)]])
