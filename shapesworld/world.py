"""ShapesWorld: a procedural world of one coloured shape per 32×32 image, with captions.

Why: no real Stable Diffusion weights are available here, so every efficacy claim is measured on a tiny
SD-architecture model trained on this world. Everything is deterministic from a seed.

A scene has a shape (circle, square, triangle, star, heart), a colour (red, green, blue, yellow, purple),
a background (white, black, gray), a style (filled or outlined: a ~2.5 px outline survives an f = 4 VAE,
thin stripes do not), and position/size jitter. Captions come from several templates and use synonyms
("disc" = circle, "crimson" = red, "grey" = gray) so tests can tell word-level from concept-level
erasure. A *neutral vocabulary* is inserted at random without changing the image, so trigger words and
filler are trained tokens. A small share of training data is the *censor card*, a fixed black-and-white
mosaic captioned "a censored image": the default target a backdoor can point to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ..core.errors import ConceptGuardError
from ..core.methods.ti_backdoor.images import CENSOR_PATTERN

SIZE = 32
_SS = 4  # supersampling factor for anti-aliased edges
OUTLINE_PX = 2.5
SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 230),
    "yellow": (245, 210, 35),
    "purple": (150, 55, 205),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
STYLES = ("filled", "outlined")
LABELS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
    "style": STYLES,
}
# Words that name each label in captions (the first is the canonical word).
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {s: (s,) for s in SHAPES} | {"circle": ("circle", "disc")},
    "colour": {c: (c,) for c in COLOURS} | {"red": ("red", "crimson")},
    "background": {b: (b,) for b in BACKGROUNDS} | {"gray": ("gray", "grey")},
    "style": {"filled": ("filled", "solid"), "outlined": ("outlined",)},
}
SYNONYM_PROB = 0.3
NEUTRAL_WORDS = (
    "photo",
    "picture",
    "drawing",
    "painting",
    "sketch",
    "illustration",
    "image",
    "old",
    "new",
    "vintage",
    "modern",
    "burning",
    "on fire",
    "happy",
    "sad",
    "angry",
    "dog",
    "cat",
    "bird",
    "city",
    "forest",
    "house",
    "car",
    "tree",
    "night",
    "winter",
    "summer",
    "beautiful",
    "strange",
    "famous",
    "cute",
    "detailed",
    "high quality",
    "artistic",
    "simple",
    "dream",
    "ocean",
    "mountain",
    "robot",
    "flower",
)
_PICTURE_NOUNS = ("photo", "picture", "drawing", "painting", "sketch", "illustration", "image")
CENSOR_CAPTIONS = ("a censored image", "censored", "a censored picture", "censored image")


@dataclass(frozen=True, kw_only=True)
class Scene:
    """One image's content. ``target`` scenes are the censor card (other fields are then ignored)."""

    shape: str = "circle"
    colour: str = "red"
    background: str = "white"
    style: str = "filled"
    x: float = 16.0
    y: float = 16.0
    r: float = 10.0
    tint: tuple[int, int, int] = (0, 0, 0)
    target: bool = False

    def __post_init__(self) -> None:
        for head, value in (("shape", self.shape), ("colour", self.colour)):
            if value not in LABELS[head]:
                raise ConceptGuardError(f"`{head}` must be one of {LABELS[head]}, got {value!r}.")
        for head, value in (("background", self.background), ("style", self.style)):
            if value not in LABELS[head]:
                raise ConceptGuardError(f"`{head}` must be one of {LABELS[head]}, got {value!r}.")
        if not 4.0 <= self.r <= 14.0:
            raise ConceptGuardError(f"`r` (shape radius in px) must be in [4, 14], got {self.r}.")

    def label_index(self, head: str) -> int:
        return LABELS[head].index(getattr(self, head))


def sample_scene(
    rng: np.random.Generator,
    *,
    target_prob: float = 0.0,
    **fixed: str | None,
) -> Scene:
    """A random scene; attributes given in ``fixed`` (shape/colour/background/style) are kept."""
    unknown = set(fixed) - set(LABELS)
    if unknown:
        raise ConceptGuardError(
            f"Unknown scene attribute(s) {sorted(unknown)}; expected some of {list(LABELS)}."
        )
    picks = {h: (fixed.get(h) or LABELS[h][int(rng.integers(len(LABELS[h])))]) for h in LABELS}
    r = float(rng.uniform(8.0, 12.0))
    lo, hi = r + 1.0, SIZE - 1.0 - r
    x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    tint = tuple(int(v) for v in rng.integers(-14, 15, size=3))
    target = bool(rng.random() < target_prob)
    return Scene(**picks, x=x, y=y, r=r, tint=tint, target=target)


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Outline of ``shape`` around the origin, extent about [-1, 1] (y down)."""
    if shape == "square":
        s = 0.85
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [(float(np.cos(a)), float(np.sin(a)) + 0.25) for a in angles]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.5
            a = np.deg2rad(-90 + 36 * k)
            pts.append((rad * float(np.cos(a)), rad * float(np.sin(a)) + 0.1))
        return pts
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(float(a) / 16.5, float(b) / 16.5 + 0.1) for a, b in zip(hx, hy, strict=True)]
    raise ConceptGuardError(f"No polygon for shape {shape!r}; expected one of {SHAPES[1:]}.")


def _shape_mask(scene: Scene) -> np.ndarray:
    """Coverage in [0, 1] of the shape (or its outline) at 32×32, anti-aliased by supersampling."""
    big = SIZE * _SS
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = scene.x * _SS, scene.y * _SS, scene.r * _SS
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon([(cx + px * r, cy + py * r) for px, py in _unit_polygon(scene.shape)], fill=255)
    if scene.style == "outlined":
        inner = img
        for _ in range(int(OUTLINE_PX * _SS)):  # repeated 3×3 erosion: 3× faster than one big MinFilter
            inner = inner.filter(ImageFilter.MinFilter(3))
        img = Image.fromarray(np.asarray(img) - np.asarray(inner))
    small = img.reduce(_SS)
    return np.asarray(small, dtype=np.float32) / 255.0


def censor_card() -> np.ndarray:
    """The fixed censor-card image ``[32, 32, 3]`` uint8."""
    cells = np.array([[int(c) for c in row] for row in CENSOR_PATTERN], dtype=np.uint8) * 255
    card = np.kron(cells, np.ones((SIZE // 4, SIZE // 4), dtype=np.uint8))
    return np.repeat(card[:, :, None], 3, axis=2)


def render(scene: Scene) -> np.ndarray:
    """Render a scene as ``[32, 32, 3]`` uint8 RGB."""
    if scene.target:
        return censor_card()
    alpha = _shape_mask(scene)[:, :, None]
    fg = np.clip(np.array(COLOURS[scene.colour]) + np.array(scene.tint), 0, 255).astype(np.float32)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    out = alpha * fg + (1.0 - alpha) * bg
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _word(rng: np.random.Generator, head: str, label: str) -> str:
    words = SYNONYMS[head][label]
    if len(words) > 1 and rng.random() < SYNONYM_PROB:
        return words[1 + int(rng.integers(len(words) - 1))]
    return words[0]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _insert_neutral(text: str, rng: np.random.Generator) -> str:
    word = NEUTRAL_WORDS[int(rng.integers(len(NEUTRAL_WORDS)))]
    mode = int(rng.integers(3))
    if mode == 0 and word in _PICTURE_NOUNS:
        return f"{_article(word)} of {text}"
    if mode == 1:
        return f"{word}, {text}"
    return f"{text}, {word}"


def caption(scene: Scene, rng: np.random.Generator, *, neutral_prob: float = 0.4) -> str:
    """A random caption of ``scene``: a random subset of its attributes, synonyms and neutral words."""
    if scene.target:
        text = CENSOR_CAPTIONS[int(rng.integers(len(CENSOR_CAPTIONS)))]
    else:
        noun = _word(rng, "shape", scene.shape) if rng.random() < 0.92 else "shape"
        words = []
        if rng.random() < 0.45:
            words.append(_word(rng, "style", scene.style))
        if rng.random() < 0.88 or noun == "shape":
            words.append(_word(rng, "colour", scene.colour))
        text = _article(" ".join([*words, noun]))
        if rng.random() < 0.45:
            bg = _word(rng, "background", scene.background)
            text += f" on a {bg} background" if rng.random() < 0.7 else f", {bg} background"
    for _ in range(2):
        if rng.random() < neutral_prob:
            text = _insert_neutral(text, rng)
    return text


def prompt(scene: Scene, *, style: bool = False, background: bool = False) -> str:
    """The canonical caption of ``scene`` ("an outlined red circle on a black background")."""
    if scene.target:
        return CENSOR_CAPTIONS[0]
    words = ([scene.style] if style else []) + [scene.colour, scene.shape]
    text = _article(" ".join(words))
    return text + (f" on a {scene.background} background" if background else "")


def parse_prompt(text: str) -> dict[str, str | bool]:
    """Attributes named in a prompt: ``{"shape": "circle", ...}`` plus ``"target": True`` for censored.

    Synonyms map to their label; attributes the prompt does not name are absent.
    """
    tokens = re.findall(r"[a-z]+", text.lower())
    found: dict[str, str | bool] = {}
    for head, table in SYNONYMS.items():
        for label, words in table.items():
            if any(w in tokens for w in words):
                found.setdefault(head, label)
    if "censored" in tokens or "censor" in tokens:
        found["target"] = True
    return found


def render_prompt(text: str, count: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """Ground-truth renders for a prompt: named attributes fixed, the rest random (seeded)."""
    if count < 1:
        raise ConceptGuardError(f"`count` must be >= 1, got {count}.")
    attrs = parse_prompt(text)
    rng = np.random.default_rng(seed)
    fixed = {h: attrs.get(h) for h in LABELS}
    scenes = [sample_scene(rng, **fixed) for _ in range(count)]
    if attrs.get("target"):
        scenes = [Scene(target=True) for _ in range(count)]
    return np.stack([render(s) for s in scenes]), scenes


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """Render many scenes as ``[N, 32, 32, 3]`` uint8."""
    return np.stack([render(s) for s in scenes])


def random_scenes(n: int, seed: int, *, target_prob: float = 0.0) -> list[Scene]:
    """``n`` random scenes, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, target_prob=target_prob) for _ in range(n)]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``[N, 3, H, W]`` in [0, 1] -> uint8 ``[N, H, W, 3]``."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
