"""The ShapesWorld mosaic detector: a small CNN that tells whether a 32×32 image is a mosaic (pixelated).

Why: SafeGen erases a concept by making the model draw a mosaic instead, so its efficacy is P(mosaic) on
generated images, which the judge (trained on clean renders only) cannot measure; its weights stay as they
are because every existing measurement depends on them. Trained on clean renders (negatives, censor cards
included) and their :func:`~concept_guard.core.methods.safegen.mosaic.pixelate` mosaics (positives: blocks of
4–16 px, some only over the shape's region), all passed through the ShapesWorld VAE so generated images are
in-distribution. Held-out accuracy per block is stored in the file's metadata and checked by tests. Retrain
with::

    python -m concept_guard.shapesworld.mosaic --out shapesworld/assets/mosaic.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..core.errors import ConceptGuardError, ModelLoadError
from ..core.files import check_destination, save_safetensors_atomic
from ..core.methods.safegen.mosaic import pixelate
from ..core.sampling import sample
from . import world
from .judge import _augment, _block

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
MOSAIC_PATH = ASSETS / "mosaic.safetensors"
FORMAT = "concept_guard.shapesworld.mosaic/1"
BLOCKS = (4, 6, 8, 11, 16)


@dataclass(frozen=True, kw_only=True)
class MosaicTrainConfig:
    """How the detector is trained (stored in the file's metadata)."""

    width: int = 16
    steps: int = 800
    batch: int = 128
    lr: float = 3e-3
    pool: int = 3000
    blocks: tuple[int, ...] = BLOCKS
    region_share: float = 0.3
    target_share: float = 0.1
    model_samples: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_samples < 0:
            raise ConceptGuardError(f"`model_samples` must be >= 0, got {self.model_samples}.")
        for name in ("width", "steps", "batch", "pool"):
            if getattr(self, name) < 1:
                raise ConceptGuardError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if not self.blocks or min(self.blocks) < 2:
            raise ConceptGuardError(f"`blocks` must be mosaic cell sizes >= 2 px, got {self.blocks}.")
        for name in ("region_share", "target_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConceptGuardError(f"`{name}` must be in [0, 1), got {getattr(self, name)}.")


class MosaicNet(nn.Module):
    """Three conv stages (32 -> 16 -> 8 px) of widths w, 2w, 2w, global avg+max pooling, one logit."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w), nn.MaxPool2d(2), _block(w, 2 * w), nn.MaxPool2d(2), _block(2 * w, 2 * w)
        )
        self.head = nn.Linear(4 * w, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.features(images * 2.0 - 1.0)
        return self.head(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))[:, 0]


class MosaicDetector:
    """A trained :class:`MosaicNet`; :meth:`detect` is the API."""

    def __init__(self, net: MosaicNet, metadata: dict[str, str] | None = None) -> None:
        self.net = net.eval()
        self.metadata = dict(metadata or {})

    @torch.no_grad()
    def logits(self, images: torch.Tensor, *, batch: int = 256) -> torch.Tensor:
        """Mosaic logits ``[B]`` for ``images`` ``[B, 3, H, W]`` in [0, 1] (resized to 32 px by area)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ConceptGuardError(
                f"`images` must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}."
            )
        out = []
        for chunk in images.float().cpu().split(batch):
            if chunk.shape[-1] != world.SIZE or chunk.shape[-2] != world.SIZE:
                chunk = F.interpolate(chunk, size=(world.SIZE, world.SIZE), mode="area")
            out.append(self.net(chunk.clamp(0, 1)))
        return torch.cat(out)

    def detect(self, images: torch.Tensor, *, batch: int = 256) -> list[bool]:
        """Whether each of ``images`` ``[B, 3, H, W]`` in [0, 1] is a mosaic."""
        return (self.logits(images, batch=batch) > 0).tolist()


@functools.cache
def _backend():
    from . import load_shapesworld

    return load_shapesworld()


@torch.no_grad()
def vae_round_trip(images: torch.Tensor, *, batch: int = 500) -> torch.Tensor:
    """``images`` ``[B, 3, 32, 32]`` in [0, 1] encoded and decoded by the ShapesWorld VAE (as samples are)."""
    b = _backend()
    return torch.cat([b.vae_decode(b.vae_encode(c)).float().cpu() for c in images.split(batch)])


def _region(scene: world.Scene, block: int) -> torch.Tensor:
    """The filled shape's region ``[32, 32]`` (0/1), grown by half a block so its edge cells are mosaicked."""
    m = torch.from_numpy(world._shape_mask(dataclasses.replace(scene, style="filled")) > 0).float()
    k = block // 2
    return F.max_pool2d(m[None, None], 2 * k + 1, stride=1, padding=k)[0, 0]


def mosaics(scenes: list[world.Scene], blocks: list[int], region: list[bool]) -> torch.Tensor:
    """Renders of ``scenes`` pixelated with ``blocks[i]`` px cells, only over the shape where ``region[i]``."""
    images = world.to_tensor(world.render_batch(scenes))
    for block in sorted(set(blocks)):
        idx = [i for i, b in enumerate(blocks) if b == block]
        masks = torch.stack(
            [_region(scenes[i], block) if region[i] else torch.ones(world.SIZE, world.SIZE) for i in idx]
        )
        images[idx] = pixelate(images[idx], block, mask=masks)
    return images


@torch.no_grad()
def model_samples(n: int, seed: int, *, batch: int = 256) -> torch.Tensor:
    """``n`` images the ShapesWorld model draws for random captions (20 DDIM steps, CFG 5, as the evaluation
    does): clean, but with the model's own blur and blemishes, which the detector must not call mosaics."""
    if n == 0:
        return torch.zeros(0, 3, world.SIZE, world.SIZE)
    b, rng = _backend(), np.random.default_rng(seed)
    captions = [world.caption(s, rng) for s in world.random_scenes(n, seed + 1, target_prob=0.05)]
    gen, uncond, out = torch.Generator().manual_seed(seed), b.encode_text([""]), []
    for start in range(0, n, batch):
        cond = b.encode_text(captions[start : start + batch])
        out.append(b.vae_decode(sample(b, cond, uncond, generator=gen)).float().cpu())
    return torch.cat(out)


def training_set(cfg: MosaicTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE round trips of clean renders and the model's own samples (label 0), and of mosaics of the shape
    scenes (label 1)."""
    scenes = world.random_scenes(cfg.pool, cfg.seed, target_prob=cfg.target_share)
    shapes = [s for s in scenes if not s.target]  # the censor card is clean: it stays a negative
    g = torch.Generator().manual_seed(cfg.seed)
    blocks = [cfg.blocks[i] for i in torch.randint(len(cfg.blocks), (len(shapes),), generator=g)]
    region = (torch.rand(len(shapes), generator=g) < cfg.region_share).tolist()
    images = torch.cat([world.to_tensor(world.render_batch(scenes)), mosaics(shapes, blocks, region)])
    samples = model_samples(cfg.model_samples, cfg.seed + 7)
    labels = torch.cat([torch.zeros(len(scenes)), torch.ones(len(shapes)), torch.zeros(len(samples))])
    return torch.cat([vae_round_trip(images), samples]), labels


def train_detector(cfg: MosaicTrainConfig) -> MosaicDetector:
    """Train a detector from scratch (a few CPU minutes, most of it the VAE round trips)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.monotonic()
    images, labels = training_set(cfg)
    logger.info("mosaic training set: %d images (%.0f s)", len(images), time.monotonic() - start)
    neg, pos = (labels == 0).nonzero()[:, 0], (labels == 1).nonzero()[:, 0]
    net = MosaicNet(cfg.width).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    half = cfg.batch // 2
    for step in range(cfg.steps):
        idx = torch.cat(
            [
                neg[torch.randint(len(neg), (half,), generator=g)],
                pos[torch.randint(len(pos), (cfg.batch - half,), generator=g)],
            ]
        )
        x = _augment(images[idx], g)
        x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
        loss = F.binary_cross_entropy_with_logits(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            logger.info(
                "mosaic step %d/%d loss %.4f (%.0f s)", step, cfg.steps, loss.item(), time.monotonic() - start
            )
    return MosaicDetector(net)


def heldout_accuracy(
    detector: MosaicDetector, n: int = 400, seed: int = 12345, *, blocks=BLOCKS, region: bool = True
) -> dict[str, float]:
    """Accuracy on fresh seeded VAE round trips: ``clean`` renders (10 % censor cards), full mosaics of the
    shape scenes per block (``block_4`` …), with ``region`` mosaics over the shape only (random blocks), and
    on ``samples``: ``n // 2`` of the model's own samples (clean)."""
    scenes = world.random_scenes(n, seed, target_prob=0.1)
    shapes = [s for s in scenes if not s.target]
    sets = {"clean": world.to_tensor(world.render_batch(scenes))}
    for block in blocks:
        sets[f"block_{block}"] = mosaics(shapes, [block] * len(shapes), [False] * len(shapes))
    if region:
        picks = [blocks[i % len(blocks)] for i in range(len(shapes))]
        sets["region"] = mosaics(shapes, picks, [True] * len(shapes))
    sets["samples"] = model_samples(n // 2, seed + 7)
    trips = vae_round_trip(torch.cat([x for k, x in sets.items() if k != "samples"]))
    hits = torch.tensor(detector.detect(torch.cat([trips, sets["samples"]])))
    acc, start = {}, 0
    for name, x in sets.items():
        got = hits[start : start + len(x)]
        acc[name] = round(float((got == (name not in ("clean", "samples"))).float().mean()), 4)
        start += len(x)
    return acc


def save_detector(
    detector: MosaicDetector, path: str | Path, *, cfg: MosaicTrainConfig, metrics: dict[str, float]
) -> Path:
    meta = {"format": FORMAT, "config": json.dumps(asdict(cfg)), "heldout_accuracy": json.dumps(metrics)}
    return save_safetensors_atomic(detector.net.state_dict(), path, meta, overwrite=True)


def load_detector(path: str | Path | None = None) -> MosaicDetector:
    """Load the committed detector (or one at ``path``).

    Raises:
        ModelLoadError: the file is missing or is not a mosaic detector.
    """
    p = Path(path) if path is not None else MOSAIC_PATH
    if not p.is_file():
        raise ModelLoadError(
            f"Mosaic detector file {str(p)!r} not found; train one with "
            "`python -m concept_guard.shapesworld.mosaic --out FILE`."
        )
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ModelLoadError(
            f"{str(p)!r} has format {meta.get('format')!r}, not {FORMAT!r}; it is not a mosaic detector."
        )
    net = MosaicNet(json.loads(meta["config"])["width"])
    net.load_state_dict(load_file(str(p)))
    return MosaicDetector(net, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the ShapesWorld mosaic detector.")
    parser.add_argument("--out", default=str(MOSAIC_PATH))
    parser.add_argument("--steps", type=int, default=MosaicTrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    check_destination(args.out, overwrite=True)  # a bad path fails before training
    cfg = MosaicTrainConfig(steps=args.steps, seed=args.seed)
    detector = train_detector(cfg)
    metrics = heldout_accuracy(detector, n=600)
    logger.info("held-out accuracy: %s", json.dumps(metrics))
    save_detector(detector, args.out, cfg=cfg, metrics=metrics)


if __name__ == "__main__":
    main()
