"""A labelled image grid: one row per prompt with its text on the left (wrapped, never cut off) and, side by
side, a block of samples per model under a column header. Used by the Compare Models node, ``concept-guard
demo`` and ``concept-guard eval --grid``."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_PAD = 4
_GAP = 12
_LINE = 14
_LABEL_CHARS = 28


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _tile(image: torch.Tensor, side: int) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> a ``side`` px square tile (nearest: small images stay crisp)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    tile = Image.fromarray(np.ascontiguousarray(arr))
    return tile.resize((side, side), Image.NEAREST if tile.width < side else Image.LANCZOS)


def labelled_grid(
    prompts: Sequence[str],
    columns: Sequence[str],
    images: Sequence[Sequence[torch.Tensor]],
    *,
    tile: int = 96,
) -> Image.Image:
    """The grid as a PIL image.

    Args:
        prompts: one label per row.
        columns: one header per model (e.g. ``["base", "edited"]``).
        images: ``images[row][column]`` is ``[N, 3, H, W]`` in [0, 1] (the same N everywhere).
        tile: side of each sample in pixels.
    """
    if len(images) != len(prompts) or any(len(row) != len(columns) for row in images):
        raise ValueError(f"`images` must be {len(prompts)} rows of {len(columns)} image batches.")
    per = max(len(batch) for row in images for batch in row)
    labels = [textwrap.wrap(p, _LABEL_CHARS) or [""] for p in prompts]
    label_w = _LINE // 2 * _LABEL_CHARS + 2 * _PAD
    block_w = per * (tile + _PAD)
    heights = [max(tile, len(lines) * _LINE) + _PAD for lines in labels]
    header = _LINE + 2 * _PAD
    canvas = Image.new("RGB", (label_w + len(columns) * (block_w + _GAP), header + sum(heights)), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for c, name in enumerate(columns):
        draw.text((label_w + c * (block_w + _GAP), _PAD), name, fill=(0, 0, 0), font=font)
    y = header
    for lines, row, height in zip(labels, images, heights, strict=True):
        for i, line in enumerate(lines):
            draw.text((_PAD, y + i * _LINE), line, fill=(0, 0, 0), font=font)
        for c, batch in enumerate(row):
            for k, image in enumerate(batch):
                canvas.paste(_tile(image, tile), (label_w + c * (block_w + _GAP) + k * (tile + _PAD), y))
        y += height
    return canvas


def grid_tensor(grid: Image.Image) -> torch.Tensor:
    """A PIL grid as a ComfyUI IMAGE batch of one: ``[1, H, W, 3]`` float in [0, 1]."""
    return torch.from_numpy(np.asarray(grid.convert("RGB"), dtype=np.float32) / 255.0)[None]
