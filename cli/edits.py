"""``concept-guard convert`` (edit formats and merged models) and ``concept-guard apply`` (merge for diffusers users)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..core.edits.export import DEFAULT_RANK, EDIT_KINDS
from ..core.edits.read import LoadedEdit
from ._run import model_path

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TARGETS = (*EDIT_KINDS, "diffusers", "checkpoint")


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "convert",
        help="convert an edit between .diff, low-rank LoRA and a merged model",
        description="Read any accepted edit (our .diff, LoRAs, ESD/UCE weight files, full UNets or checkpoints; "
        "recognised from content) and write it as a .diff edit, a kohya-named LoRA (SVD at --rank, printing the "
        "relative approximation error), a merged diffusers pipeline folder or a merged single-file checkpoint.",
    )
    c.add_argument("--edit", required=True, help="the edit file to read")
    c.add_argument("--to", required=True, choices=TARGETS, help="output kind")
    c.add_argument(
        "--out", required=True, help=".safetensors file (diff, lora, checkpoint) or folder (diffusers)"
    )
    c.add_argument(
        "--model",
        default=None,
        help="base model (pipeline folder or checkpoint); needed for everything "
        "but .diff -> diff/lora with LDM names",
    )
    c.add_argument(
        "--rank", type=int, default=DEFAULT_RANK, help=f"LoRA rank for --to lora (default {DEFAULT_RANK})"
    )
    c.add_argument(
        "--lora-names",
        choices=("ldm", "diffusers"),
        default="ldm",
        help="module names in LoRA keys: ldm (ComfyUI, A1111, SDXL kohya) or diffusers (SD1/2 kohya)",
    )
    c.add_argument("--strength", type=float, default=1.0, help="edit strength for merged outputs (default 1)")
    c.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float16", help="dtype of written .diff/LoRA tensors"
    )
    _common(c)
    c.set_defaults(func=run_convert)

    a = sub.add_parser(
        "apply",
        help="merge an edit into a model at a strength and write the merged model",
        description="W + strength·ΔW for any accepted edit file; writes a diffusers pipeline folder (from a folder) "
        "or a single-file .safetensors checkpoint (from a checkpoint) that ComfyUI's CheckpointLoaderSimple loads.",
    )
    a.add_argument(
        "--model", required=True, help="base model: diffusers pipeline folder or .safetensors/.ckpt file"
    )
    a.add_argument("--edit", required=True, help="the edit file")
    a.add_argument(
        "--strength", type=float, default=1.0, help="edit strength, e.g. 0.5 for a half-strength erasure"
    )
    a.add_argument("--out", required=True, help="output folder, or .safetensors for a single-file checkpoint")
    _common(a)
    a.set_defaults(func=run_apply)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="fail if any key of the edit would not be applied")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _read(args: argparse.Namespace):
    """(LoadedEdit, BaseModel or None): with --model the edit is read for that UNet, else only .diff files."""
    from ..core.edits.containers import read_tensor_file
    from ..core.edits.diff_file import file_keys_to_ldm_deltas
    from ..core.edits.export import load_base_model
    from ..core.edits.read import read_edit_file
    from ..core.errors import ConceptGuardError

    if args.model:
        base = load_base_model(model_path(args.model))
        return read_edit_file(args.edit, base.target, strict=args.strict), base
    raw = read_tensor_file(args.edit)
    try:
        deltas = {k: v.float() for k, v in file_keys_to_ldm_deltas(raw.tensors).items()}
    except ConceptGuardError as e:
        raise ConceptGuardError(
            f"{args.edit!r} is not a 'diffusion_model.<module>.diff' edit ({e}); pass `--model` so its names and "
            "weights can be matched to a UNet."
        ) from e
    return LoadedEdit(
        deltas=deltas,
        source_format=f".diff patches (LDM names) [{raw.container}]",
        metadata=raw.metadata,
        path=str(args.edit),
    ), None


def _check_out(args: argparse.Namespace, single_file: bool | None, what: str) -> Path:
    """Fail before any loading: wrong suffix for the output kind, or an existing output without --overwrite."""
    from ..core.errors import OutputPathError
    from ..core.files import check_destination

    out = Path(args.out)
    if single_file is not None and (out.suffix == ".safetensors") != single_file:
        raise OutputPathError(
            f"`--out` for {what} must {'' if single_file else 'not '}end in .safetensors, got {str(out)!r}."
        )
    return check_destination(out, overwrite=args.overwrite, how="pass `--overwrite`")


def run_convert(args: argparse.Namespace) -> int:
    from ..core.edits.export import converted_metadata, kohya_name, write_edit_as, write_merged
    from ..core.errors import ConceptGuardError

    out = _check_out(args, args.to != "diffusers", f"--to {args.to}")
    if args.to in ("diffusers", "checkpoint") or args.lora_names == "diffusers":
        if not args.model:
            raise ConceptGuardError(
                f"--to {args.to} with --lora-names {args.lora_names} needs `--model` (the base model)."
            )
    edit, base = _read(args)
    result: dict[str, object] = {
        "out": str(out),
        "format": edit.source_format,
        "applied": len(edit.deltas),
        "ignored": len(edit.ignored),
    }
    if args.to in EDIT_KINDS:
        name = kohya_name
        if args.lora_names == "diffusers":
            name = lambda m: kohya_name(base.target.diffusers_module(m))  # noqa: E731
        export = write_edit_as(
            edit, args.to, out, rank=args.rank, name=name, dtype=DTYPES[args.dtype], overwrite=args.overwrite
        )
        if export.relative_error is not None:
            result["relative_error"] = export.relative_error
            if not args.json:
                print(export.error_line)
    else:
        write_merged(
            base, edit.deltas, args.strength, out, converted_metadata(edit), overwrite=args.overwrite
        )
        result["strength"] = args.strength
    _report(args, edit, result)
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from ..core.edits.export import converted_metadata, write_merged

    _check_out(args, None, "apply")
    edit, base = _read(args)
    out = write_merged(
        base, edit.deltas, args.strength, args.out, converted_metadata(edit), overwrite=args.overwrite
    )
    _report(
        args,
        edit,
        {
            "out": str(out),
            "format": edit.source_format,
            "applied": len(edit.deltas),
            "ignored": len(edit.ignored),
            "strength": args.strength,
        },
    )
    return 0


def _report(args: argparse.Namespace, edit: LoadedEdit, result: dict[str, object]) -> None:
    if args.json:
        print(json.dumps(result))
        return
    print(edit.summary(result.get("strength")))
    print(f"Wrote {result['out']}")
