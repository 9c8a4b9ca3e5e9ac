"""The evaluation harness: sample a model on a prompt set and score the images with the ShapesWorld judge.

Why: every claim (a concept is erased, the rest is preserved, a backdoor fires) is a judge rate on
seeded samples. :func:`evaluate` returns the stable JSON contract that ``concept-guard eval --json``
prints and other tools read::

    {"model": str, "edit": str|null, "embedding": str|null, "samples_per_prompt": int,
     "prompts": [{"prompt": str, "rates": {"shape": {"circle": 0.97, ...}, "colour": {...},
                  "background": {...}, "style": {...}, "target": float}}],
     "summary": {...}}

``rates.<head>.<label>`` is the fraction of samples the judge gave that label (every label listed);
``target`` the fraction flagged as the target pattern. ``summary`` averages, over the prompts that name an
attribute, the rate of the named label (``shape_match``, ``colour_match``, ...), and ``synonym_match``
over prompts written with a synonym ("crimson", "disc"). A judge shown off-distribution images still
picks some label, so compare rates with the base model's (:func:`preservation`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.backend import DiffusionBackend
from ..core.errors import ConceptGuardError
from ..core.sampling import sample
from . import world
from .judge import Judge, load_judge

logger = logging.getLogger(__name__)

HEADS = tuple(world.LABELS)
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "shapes": tuple(f"a {s}" for s in world.SHAPES),
    "colours": tuple(f"a {c} shape" for c in world.COLOURS),
    "styles": (
        "a filled blue square",
        "an outlined blue square",
        "a filled red heart",
        "an outlined red heart",
        "a filled yellow star",
        "an outlined yellow star",
    ),
    "synonyms": (
        "a crimson circle",
        "a red disc",
        "a crimson disc",
        "a blue disc",
        "a crimson square",
        "a crimson heart",
    ),
    "compositional": (
        "an outlined yellow heart on a black background",
        "a filled green star on a white background",
        "an outlined purple circle on a gray background",
        "a red square on a black background",
        "a blue triangle on a white background",
        "an outlined green disc on a grey background",
    ),
    "baseline": (
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow star",
        "a purple heart",
        "a green circle",
        "a red square",
        "a purple triangle",
        "a blue star",
        "a yellow heart",
        "a yellow circle",
        "a purple square",
        "a red triangle",
        "a green heart",
        "a crimson circle",
        "a red disc",
        "a crimson disc",
    ),
    "censor": ("a censored image",),
}
SYNONYM_WORDS = {w for table in world.SYNONYMS.values() for words in table.values() for w in words[1:]}


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How samples are drawn (DDIM + CFG, as the diffusers pipelines do)."""

    samples: int = 32
    seed: int = 0
    steps: int = 20
    guidance: float = 5.0
    batch: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= 4096:
            raise ConceptGuardError(f"`samples` must be in [1, 4096], got {self.samples}.")
        if not 1 <= self.steps <= 1000:
            raise ConceptGuardError(f"`steps` must be in [1, 1000], got {self.steps}; 20 is usual.")
        if not self.guidance >= 0:
            raise ConceptGuardError(f"`guidance` must be >= 0, got {self.guidance}; 5 is usual here.")
        if self.batch < 1:
            raise ConceptGuardError(f"`batch` must be >= 1, got {self.batch}.")


def resolve_prompts(prompts: Sequence[str] | None, prompt_set: str | None) -> list[str]:
    """Explicit prompts, or a named standard set.

    Raises:
        ConceptGuardError: neither or both given, an unknown set, or an empty prompt.
    """
    if bool(prompts) == bool(prompt_set):
        raise ConceptGuardError(
            'Give either `--prompts "..." ...` or `--prompt-set NAME` '
            f"(one of {sorted(PROMPT_SETS)}), not both or neither."
        )
    if prompt_set:
        if prompt_set not in PROMPT_SETS:
            raise ConceptGuardError(
                f"Unknown prompt set {prompt_set!r}; expected one of {sorted(PROMPT_SETS)}."
            )
        return list(PROMPT_SETS[prompt_set])
    cleaned = [p.strip() for p in prompts or ()]
    if any(not p for p in cleaned):
        raise ConceptGuardError(f"Prompts must be non-empty strings, got {list(prompts or ())!r}.")
    return cleaned


@torch.no_grad()
def generate(backend: DiffusionBackend, prompt: str, cfg: EvalConfig, seed: int) -> torch.Tensor:
    """``cfg.samples`` seeded images ``[N, 3, H, W]`` in [0, 1] for one prompt."""
    cond, uncond = backend.encode_text([prompt]), backend.encode_text([""])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = []
    for start in range(0, cfg.samples, cfg.batch):
        n = min(cfg.batch, cfg.samples - start)
        lat = sample(backend, cond, uncond, batch=n, steps=cfg.steps, guidance=cfg.guidance, generator=gen)
        images.append(backend.vae_decode(lat).float().cpu())
    return torch.cat(images)


def rates_of(labels: dict[str, list]) -> dict[str, object]:
    """Judge labels for one prompt's samples -> ``{"shape": {label: fraction, ...}, ..., "target": float}``."""
    n = len(labels["target"])
    rates: dict[str, object] = {
        h: {lab: round(sum(x == lab for x in labels[h]) / n, 4) for lab in world.LABELS[h]} for h in HEADS
    }
    rates["target"] = round(sum(bool(x) for x in labels["target"]) / n, 4)
    return rates


def summarize(entries: list[dict]) -> dict[str, object]:
    """Mean rate of the named label per head, over the prompts naming it (see the module docstring)."""
    summary: dict[str, object] = {"prompts": len(entries)}
    for h in HEADS:
        vals = [
            e["rates"][h][lab]
            for e in entries
            if isinstance(lab := world.parse_prompt(e["prompt"]).get(h), str)
        ]
        summary[f"{h}_match"] = round(float(np.mean(vals)), 4) if vals else None
    syn = []
    for e in entries:
        words = set(e["prompt"].lower().replace(",", " ").split())
        named = world.parse_prompt(e["prompt"])
        for h, table in world.SYNONYMS.items():
            label = named.get(h)
            if isinstance(label, str) and words & set(table[label][1:]):
                syn.append(e["rates"][h][label])
    summary["synonym_match"] = round(float(np.mean(syn)), 4) if syn else None
    summary["target_rate"] = round(float(np.mean([e["rates"]["target"] for e in entries])), 4)
    return summary


def evaluate(
    backend: DiffusionBackend,
    prompts: Sequence[str],
    cfg: EvalConfig | None = None,
    *,
    judge: Judge | None = None,
    model_name: str = "",
    edit: str | None = None,
    embedding: str | None = None,
    keep_images: bool = False,
) -> dict:
    """Sample every prompt (seed ``cfg.seed + i`` for prompt ``i``) and judge the images.

    Returns:
        The JSON contract of the module docstring; with ``keep_images`` also ``"_images"``:
        a list of ``[N, 3, H, W]`` tensors, one per prompt (not JSON; for grids).
    """
    cfg = cfg or EvalConfig()
    judge = judge or load_judge()
    if not prompts:
        raise ConceptGuardError("`prompts` is empty; give at least one prompt.")
    entries, kept, start = [], [], time.monotonic()
    for i, prompt in enumerate(prompts):
        images = generate(backend, prompt, cfg, cfg.seed + i)
        entries.append({"prompt": prompt, "rates": rates_of(judge.classify(images))})
        if keep_images:
            kept.append(images)
        logger.info("judged %r (%d/%d, %.0f s)", prompt, i + 1, len(prompts), time.monotonic() - start)
    report = {
        "model": model_name,
        "edit": edit,
        "embedding": embedding,
        "samples_per_prompt": cfg.samples,
        "prompts": entries,
        "summary": {**summarize(entries), "seconds": round(time.monotonic() - start, 1)},
    }
    if keep_images:
        report["_images"] = kept
    return report


def preservation(report: dict, base: dict, prompts: Sequence[str] | None = None) -> list[dict]:
    """Per-prompt named-attribute rates of ``report`` beside ``base`` (same prompts), with the change.

    ``prompts`` restricts the table (e.g. to prompts unrelated to an edit); default all shared prompts.
    """
    base_by = {e["prompt"]: e for e in base["prompts"]}
    rows = []
    for e in report["prompts"]:
        if e["prompt"] not in base_by or (prompts is not None and e["prompt"] not in prompts):
            continue
        named = world.parse_prompt(e["prompt"])
        for h in HEADS:
            label = named.get(h)
            if isinstance(label, str):
                now, before = e["rates"][h][label], base_by[e["prompt"]]["rates"][h][label]
                rows.append(
                    {
                        "prompt": e["prompt"],
                        "head": h,
                        "label": label,
                        "base": before,
                        "now": now,
                        "change": round(now - before, 4),
                    }
                )
    return rows
