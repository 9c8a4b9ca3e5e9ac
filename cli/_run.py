"""The run skeleton every training subcommand shares: check the output, pick the device, load the model,
show progress (a status line while preparing, then a bar over the steps), train, save, print a summary."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..core.errors import OutputPathError
from ..core.files import check_destination
from ..core.trainer import StepCallback, TrainResult

#: The model name that stands for the bundled ShapesWorld demo model on every subcommand.
SHAPESWORLD = "shapesworld"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--tokenizer``, as every training subcommand takes them."""
    p.add_argument(
        "--model",
        required=True,
        help="diffusers pipeline folder, .safetensors/.ckpt checkpoint, or 'shapesworld'",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="single-file checkpoints only: a folder with the CLIP tokenizer files",
    )


def add_output_args(
    p: argparse.ArgumentParser, *, summary: str, out_help: str = "output .safetensors path"
) -> None:
    """``--device``, ``--out``, ``--overwrite`` and ``--json`` (``summary``: the keys that JSON holds)."""
    p.add_argument("--device", default=None, help="cuda, cpu, … (default: cuda if available)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help=f"print {{{summary}}} as JSON")


def model_path(spec: str | Path) -> str | Path:
    """``"shapesworld"`` -> the bundled demo model's folder; anything else unchanged (a folder or a file)."""
    if str(spec).strip().lower() == SHAPESWORLD:
        from ..shapesworld import shapesworld_model_path

        return shapesworld_model_path()
    return spec


def load_backend(spec: str | Path, *, device: str | None = None, tokenizer: str | None = None):
    """A :class:`DiffusersBackend` on ``spec`` (``"shapesworld"``, a pipeline folder or a checkpoint) on
    ``device`` (default: CUDA when available)."""
    import torch

    from ..core.backends.diffusers_backend import DiffusersBackend

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return DiffusersBackend.load(model_path(spec), device=device, tokenizer=tokenizer)


def check_out(path: str | Path, overwrite: bool) -> Path:
    """The ``--out`` file, checked before any expensive work: a ``.safetensors`` path that may be written."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise OutputPathError(f"`--out` must end in .safetensors, got {str(path)!r}.")
    return check_destination(path, overwrite=overwrite, how="pass `--overwrite`")


@contextlib.contextmanager
def step_progress(desc: str, *, quiet: bool) -> Iterator[StepCallback]:
    """An ``on_step`` callback: ``step == 0`` calls (data preparation) show a "preparing" status on the bar's
    line and are not counted; every training step advances the bar and shows its loss."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, disable=quiet or not sys.stderr.isatty())

    def on_step(step: int, steps: int, loss: float) -> None:
        if bar.total != steps:
            bar.total = steps
        if step == 0:
            bar.set_postfix_str("preparing", refresh=True)
            return
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")

    try:
        yield on_step
    finally:
        bar.close()


def run_training(
    args: argparse.Namespace,
    *,
    desc: str,
    train: Callable[[object, StepCallback], TrainResult],
    save: Callable[[TrainResult], Path],
    summary: Callable[[TrainResult], dict[str, object]],
    message: Callable[[TrainResult, Path, float], str],
) -> int:
    """Load ``args.model`` on ``args.device``, train with a progress bar, save, and print the summary (JSON
    with ``--json``, else one line). ``train(backend, on_step)`` trains; ``save(result)`` writes the file."""
    start = time.perf_counter()
    backend = load_backend(args.model, device=args.device, tokenizer=getattr(args, "tokenizer", None))
    with step_progress(desc, quiet=args.json) as on_step:
        result = train(backend, on_step)
    out = save(result)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"out": str(out), "seconds": round(seconds, 3), **summary(result)}))
    else:
        print(message(result, out, seconds))
    return 0
