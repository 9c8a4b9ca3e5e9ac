"""The judge's labels as a small text table (for the ShapesWorld Judge node and logs)."""

from __future__ import annotations

from . import world
from .judge import HEADS

#: The label the node counts with the mosaic detector rather than the judge.
MOSAIC = "mosaic"


def label_head(label: str) -> str | None:
    """The judge head a label belongs to (``"circle"`` -> ``"shape"``), or ``None`` for an unknown label."""
    word = label.strip().lower()
    return next((h for h in HEADS if word in world.LABELS[h]), None)


def judge_table(labels: dict[str, list], label: str, mosaic: list[bool] | None = None) -> tuple[str, float]:
    """A text table of the share of images per label of every head, and the share showing ``label``.

    Args:
        labels: :meth:`Judge.classify` output for N images.
        label: a shape, colour, background or style, or ``"mosaic"`` (counted from ``mosaic``).
        mosaic: the mosaic detector's verdict per image, if run.
    """
    n = len(labels["target"])
    lines = [f"{n} images"]
    for head in HEADS:
        counts = {lab: sum(x == lab for x in labels[head]) for lab in world.LABELS[head]}
        shown = ", ".join(f"{lab} {c / n:.2f}" for lab, c in counts.items() if c)
        lines.append(f"{head:<10} {shown}")
    if mosaic is not None:
        lines.append(f"{MOSAIC:<10} {sum(mosaic) / n if n else 0.0:.2f}")
    head = label_head(label)
    word = label.strip().lower()
    rate = sum(x == word for x in labels[head]) / n if head and n else 0.0
    if word == MOSAIC and mosaic is not None:
        rate = sum(mosaic) / n if n else 0.0
    lines.append(f"'{word}': {rate:.2f}")
    return "\n".join(lines), rate
