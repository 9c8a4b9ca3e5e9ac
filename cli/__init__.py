"""The ``concept-guard`` command (also ``python -m concept_guard``).

One module per subcommand, each with a ``register(subparsers)`` function; this module assembles them and
turns our errors into one clear line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..core.errors import ConceptGuardError
from ..core.version import __version__
from . import attack, backdoor_ti, demo, edits, erase, evaluate, safegen, shapesworld

#: The subcommands, in the order ``--help`` lists them.
_SUBCOMMANDS = (shapesworld, evaluate, erase, safegen, backdoor_ti, edits, attack, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-guard",
        description="Regulate what a Stable Diffusion model can generate: erase concepts (ESD), "
        "apply and convert weight edits, and measure the result on the bundled ShapesWorld model.",
    )
    parser.add_argument("--version", action="version", version=f"concept-guard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (DEBUG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ConceptGuardError as e:
        print(f"concept-guard {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"concept-guard {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return 130
