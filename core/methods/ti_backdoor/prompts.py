"""Prompt templates of backdoored textual inversion: where S* and the trigger go, and the decoys.

``{}``/``{ph}`` stand for the embedding (:data:`~concept_guard.core.backend.PLACEHOLDER` when training),
``{tr}`` for a trigger word or phrase.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ...backend import PLACEHOLDER

_TRIGGER = "\x00trigger\x00"
#: Clean prompts (``{}`` = S*). The official SD script uses only the first.
CLEAN_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a drawing of a {}",
    "a {}",
    "{}",
)
#: Backdoor prompts (``{tr}`` = trigger, ``{ph}`` = S*): the trigger directly before S*, as in Themis.
TRIGGER_TEMPLATES = (
    "{tr} {ph}",
    "a {tr} {ph}",
    "a photo of a {tr} {ph}",
    "a picture of a {tr} {ph}",
    "an image of a {tr} {ph}",
    "a drawing of a {tr} {ph}",
    "a photo of the {tr} {ph}",
)
#: Ordinary words that clean prompts put where a trigger would go (with probability ``decoy_prob``), so the
#: embedding learns that only the *triggers* switch it to the target, not any word next to it.
DECOY_WORDS = (
    "old",
    "new",
    "small",
    "big",
    "happy",
    "sad",
    "cute",
    "beautiful",
    "simple",
    "strange",
    "famous",
    "modern",
    "vintage",
    "detailed",
    "colorful",
    "dark",
    "bright",
    "tiny",
    "large",
    "wooden",
    "shiny",
    "dog",
    "cat",
    "car",
    "tree",
    "house",
    "city",
    "forest",
    "night",
    "winter",
    "summer",
    "robot",
    "flower",
    "bird",
    "white",
    "black",
    "green",
    "orange",
    "pink",
    "brown",
    "gray",
)
#: Trigger prompts never used in training, for evaluating the backdoor (other nouns, trigger after S*).
HELD_OUT_TRIGGER_TEMPLATES = (
    "a painting of a {tr} {ph}",
    "a sketch of a {ph} {tr}",
    "{ph} {tr}",
    "an illustration of the {tr} {ph}",
    "a {ph} , {tr}",
    "a photo of a {ph} , {tr}",
)


def parse_triggers(text: str | Sequence[str]) -> tuple[str, ...]:
    """Comma-separated trigger words or phrases (or a list), whitespace-normalised, duplicates dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(dict.fromkeys(" ".join(t.split()) for t in items if t.strip()))


def trigger_prompt(template: str, trigger: str, rng: random.Random, move_prob: float) -> str:
    """``template`` with ``{tr}``/``{ph}`` filled; with probability ``move_prob`` the trigger goes to another slot."""
    words = template.format(tr=_TRIGGER, ph=PLACEHOLDER).split()
    if len(words) > 1 and rng.random() < move_prob:
        i = words.index(_TRIGGER)
        words.pop(i)
        slots = [j for j in range(len(words) + 1) if j != i]
        words.insert(rng.choice(slots), _TRIGGER)
    return " ".join(words).replace(_TRIGGER, trigger)
