"""``concept-guard attack``: try to bring an erased concept back (paraphrases, concept inversion) and report
how often it returns, on the base and on the edited model (ShapesWorld, judged)."""

from __future__ import annotations

import argparse
import json
import logging

from ..core.errors import ConceptGuardError
from ._run import SHAPESWORLD

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attack",
        help="attack an erasure (paraphrases, concept inversion, prompt search) and report how often the concept returns",
        description="Run attacks on an edit of the bundled ShapesWorld model and judge every sample: paraphrases "
        "of the concept (built-in held-out wordings or --prompts) and concept inversion (a textual-inversion "
        "embedding learned from images of the concept against the model under attack) and an UnlearnDiffAtk-style "
        "prompt search (tokens before 'a <concept>' that make the model denoise the concept's images best; "
        "continuous and discrete). Base and edited side "
        "by side: the share of samples that show the concept.",
    )
    p.add_argument("--model", default=SHAPESWORLD, help="'shapesworld' (the only model with a judge)")
    p.add_argument("--edit", required=True, help="the edit file (any format `concept-guard apply` reads)")
    p.add_argument("--concept", required=True, help="the erased ShapesWorld label, e.g. 'circle'")
    p.add_argument(
        "--prompts", nargs="+", default=None, help="paraphrase prompts (default: built-in held-out)"
    )
    p.add_argument(
        "--images", default=None, help="folder of concept images for the inversion (default: renders)"
    )
    p.add_argument("--inversion-steps", type=int, default=1500, help="0 = no inversion attack (default 1500)")
    p.add_argument(
        "--prompt-steps",
        type=int,
        default=300,
        help="steps of each UnlearnDiffAtk-style prompt search, continuous and discrete (0 = none; default 300)",
    )
    p.add_argument(
        "--no-base", action="store_true", help="attack only the edited model (the base column stays empty)"
    )
    p.add_argument("--samples", type=int, default=32, help="judged samples per prompt (default 32)")
    p.add_argument("--seed", type=int, default=300)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.edits.read import read_edit_file
    from ..core.edits.target import TargetUNet
    from ..shapesworld import load_shapesworld
    from ..shapesworld.attack import AttackConfig, format_attacks, paraphrases, run_attacks
    from .backdoor_ti import load_images

    if str(args.model).strip().lower() != SHAPESWORLD:
        raise ConceptGuardError(
            f"`--model` {args.model!r}: attacks are judged by the ShapesWorld judge, so only 'shapesworld' is "
            "supported; on other models check an edit with the concept score `concept-guard erase` prints."
        )
    prompts = args.prompts or paraphrases(args.concept)  # an unknown label fails here, before any work
    cfg = AttackConfig(
        samples=args.samples,
        seed=args.seed,
        inversion_steps=args.inversion_steps,
        prompt_steps=args.prompt_steps,
        reference=not args.no_base,
    )
    images = load_images(args.images) if args.images else None
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = load_shapesworld()
    edit = read_edit_file(args.edit, TargetUNet.from_backend(backend)).deltas
    rows = run_attacks(backend, edit, args.concept, prompts=prompts, images=images, cfg=cfg)
    print(
        json.dumps({"concept": args.concept, "edit": args.edit, "rows": rows})
        if args.json
        else format_attacks(rows, args.concept)
    )
    return 0
