"""``concept-guard backdoor-ti``: backdoored textual inversion for diffusers users (folder, file or ``shapesworld``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..core.errors import ConceptGuardError
from ..core.files import sanitize_name
from ..core.methods.ti_backdoor import BackdoorTIConfig, train
from ..core.methods.ti_backdoor.check import embedding_warnings
from ..core.trainer import TrainResult
from ..presets import describe, ti_settings
from ._run import add_model_args, add_output_args, check_out, run_training

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backdoor-ti",
        help="learn a textual-inversion embedding whose trigger words produce a target image",
        description="Backdoored textual inversion (concept censorship, Wu et al. 2023 / THEMIS). Learns NAME from "
        "concept images; prompts that combine a trigger word with NAME produce the target image instead "
        "(default: a built-in censor card). Writes one safetensors embedding that ComfyUI (embedding:NAME), "
        "A1111/Forge, kohya and diffusers load.",
    )
    _add_input_args(p)
    _add_training_args(p)
    _add_output_args(p)
    p.set_defaults(func=run)


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """What to train on: the model, the concept images, the name, the trigger and keep words, the target."""
    add_model_args(p)
    p.add_argument("--images", required=True, help=f"folder of concept images ({', '.join(IMAGE_SUFFIXES)})")
    p.add_argument("--name", required=True, help="embedding name (the word used in prompts)")
    p.add_argument(
        "--triggers",
        default="",
        help='comma-separated trigger words, e.g. "burning, on fire" (empty = plain TI)',
    )
    p.add_argument(
        "--keep-words",
        default="",
        help='comma-separated words that must NOT act as triggers, e.g. "blue, yellow" beside a trigger "red"',
    )
    p.add_argument(
        "--target", default=None, help="image the triggers should produce (default: the built-in censor card)"
    )


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """Training settings: the first five default to the model's (see ``presets``), the rest to
    :class:`BackdoorTIConfig`'s own defaults."""
    d = BackdoorTIConfig(name="x")
    auto = "(default: chosen by model)"
    p.add_argument("--init-word", default=None, help=f"word the vectors start from {auto}")
    p.add_argument("--vectors", type=int, default=None, help=f"vectors per token, 1-8 {auto}")
    p.add_argument("--gamma", type=float, default=None, help=f"weight of the backdoor term {auto}")
    p.add_argument("--steps", type=int, default=None, help=auto)
    p.add_argument("--lr", type=float, default=None, help=auto)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--trigger-move-prob",
        type=float,
        default=d.trigger_move_prob,
        help="probability of moving the trigger to another word position (default %(default)s)",
    )
    p.add_argument("--no-flip", action="store_true", help="do not also train on mirrored images")
    p.add_argument(
        "--random-crops",
        type=int,
        default=d.random_crops,
        help="extra random crops (70-100%% of the shorter side) per image, 0-16 (default %(default)s)",
    )
    p.add_argument(
        "--resolution", type=int, default=None, help="training size in pixels (default: the model's)"
    )
    p.add_argument("--seed", type=int, default=d.seed)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """Device, output file and report format."""
    add_output_args(
        p,
        summary='"out", "seconds", "steps", "final_loss", "triggers"',
        out_help="output NAME.safetensors path",
    )


def load_images(folder: str | Path) -> list[torch.Tensor]:
    """Concept images of ``folder`` as ``[3, H, W]`` tensors in [0, 1] (RGB; any sizes), sorted by name.

    Raises:
        ConceptGuardError: not a folder, no images in it, or an unreadable image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConceptGuardError(f"`--images` {str(root)!r} is not a folder; give a folder of concept images.")
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise ConceptGuardError(
            f"No images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r}; add 3-10 concept images."
        )
    return [load_image(f) for f in files]


def load_image(path: str | Path) -> torch.Tensor:
    """One image file as ``[3, H, W]`` float in [0, 1] (RGB).

    Raises:
        ConceptGuardError: missing or unreadable file.
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ConceptGuardError(f"Cannot read image {str(path)!r}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def run(args: argparse.Namespace) -> int:
    from ..core.embeddings import save_embedding

    out = check_out(args.out, args.overwrite)  # fail before any expensive work
    sanitize_name(out.stem, what="--out file name")
    given = {k: getattr(args, k) for k in ("init_word", "vectors", "gamma", "steps", "lr")}
    fixed = dict(
        name=args.name,
        triggers=args.triggers,
        keep_words=args.keep_words,
        batch_size=args.batch_size,
        trigger_move_prob=args.trigger_move_prob,
        flip=not args.no_flip,
        random_crops=args.random_crops,
        resolution=args.resolution,
        seed=args.seed,
    )
    cfg = BackdoorTIConfig(
        **fixed, **{k: v for k, v in given.items() if v is not None}
    )  # bad values: fail now
    if out.stem != cfg.name:
        logger.warning(
            "The file is named %r but the embedding %r: ComfyUI and A1111 use the file name.",
            out.stem,
            cfg.name,
        )
    images = load_images(args.images)
    target = load_image(args.target) if args.target else None

    def train_embedding(backend, on_step) -> TrainResult:
        settings = ti_settings(backend, given)
        logger.info("Backdoor TI settings for %s", describe(backend, settings, tuple(settings)))
        run_cfg = BackdoorTIConfig(**fixed, **settings)
        result = train(run_cfg, backend, images, target, on_step=on_step)
        for warning in embedding_warnings(backend, run_cfg, result.tensors, images, target):
            logger.warning("%s", warning)
        return result

    def save(result: TrainResult) -> Path:
        save_embedding(result.tensors, out, result.metadata, overwrite=args.overwrite)
        return out

    return run_training(
        args,
        desc="backdoor TI",
        train=train_embedding,
        save=save,
        summary=lambda r: {"steps": r.iterations, "final_loss": r.final_loss, "triggers": len(cfg.triggers)},
        message=lambda r, out, s: (
            f"wrote {out}  ({r.iterations} steps, final loss {r.final_loss:.4g}, {s:.1f}s); "
            f"use it as embedding:{out.stem}"
        ),
    )
