"""``concept-guard shapesworld ...``: ground-truth renders (and, later, training) from the CLI."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image

from ..core.errors import ConceptGuardError, OutputPathError

logger = logging.getLogger(__name__)


def _render(args: argparse.Namespace) -> int:
    from ..shapesworld import world

    if args.count < 1 or args.count > 10000:
        raise ConceptGuardError(f"`--count` must be in [1, 10000], got {args.count}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"`--out` {str(out)!r} exists and is not a folder; choose a folder path.")
    out.mkdir(parents=True, exist_ok=True)
    images, scenes = world.render_prompt(args.prompt, args.count, args.seed)
    written = []
    for i, (img, scene) in enumerate(zip(images, scenes, strict=True)):
        name = (
            "censored" if scene.target else f"{scene.style}_{scene.colour}_{scene.shape}_{scene.background}"
        )
        path = out / f"{i:04d}_{name}.png"
        if path.exists() and not args.overwrite:
            raise OutputPathError(
                f"{str(path)!r} already exists; choose another `--out` or pass `--overwrite`."
            )
        pil = Image.fromarray(img)
        if args.scale > 1:
            pil = pil.resize((pil.width * args.scale, pil.height * args.scale), Image.NEAREST)
        pil.save(path)
        written.append(path)
    print(f"wrote {len(written)} renders of {args.prompt!r} to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``shapesworld`` command group."""
    group = subparsers.add_parser("shapesworld", help="the ShapesWorld toy world: ground-truth renders")
    sub = group.add_subparsers(dest="shapesworld_command", metavar="SUBCOMMAND", required=True)
    render = sub.add_parser(
        "render",
        help="write ground-truth PNG renders for a prompt (from the world generator, not the model)",
        description="Attributes the prompt names (shape, colour, background, style, synonyms included) are fixed; "
        "the others are random. 'censored' gives the censor card.",
    )
    render.add_argument("--prompt", required=True, help='e.g. "an outlined red heart on a black background"')
    render.add_argument("--count", type=int, default=8, help="number of images (default 8)")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--out", required=True, help="output folder (created if missing)")
    render.add_argument(
        "--scale", type=int, default=1, help="upscale factor (nearest) for viewing; 1 = 32×32"
    )
    render.add_argument("--overwrite", action="store_true", help="replace existing files of the same name")
    render.set_defaults(func=_render)
