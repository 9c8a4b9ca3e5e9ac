"""Textual-inversion embedding files: reading the formats A1111/Forge, ComfyUI, kohya and diffusers
write, writing the one layout all of them load, and using one in prompts as ``embedding:NAME``
(ComfyUI's syntax) on the diffusers backend."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import ConceptGuardError
from .files import save_safetensors_atomic

_SYNTAX = re.compile(r"embedding:([A-Za-z0-9_\-.]+)")


def read_embedding(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Vectors of an embedding file, keyed by text encoder: ``{"clip_l": [n, d]}`` (SDXL also ``"clip_g"``).

    Accepts safetensors with ``emb_params`` (A1111), ``clip_l``/``clip_g`` (SDXL) or one tensor, and
    ``.pt``/``.bin`` with ``string_to_param`` (A1111) or ``{token: tensor}`` (diffusers), loaded with
    ``weights_only=True`` only.

    Raises:
        ConceptGuardError: missing file, unsafe pickle, or no recognisable tensor.
    """
    p = Path(path)
    if not p.is_file():
        raise ConceptGuardError(f"Embedding file {str(p)!r} does not exist.")
    if p.suffix == ".safetensors":
        data = load_file(str(p))
    else:
        try:
            data = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types for unsafe or broken pickles
            raise ConceptGuardError(
                f"{str(p)!r} is not a plain-tensor embedding file ({type(e).__name__}); refused."
            ) from e
        if isinstance(data, dict) and "string_to_param" in data:
            data = dict(data["string_to_param"])
    if not isinstance(data, dict) or not data:
        raise ConceptGuardError(f"{str(p)!r} holds no embedding tensors.")
    if "clip_l" in data or "clip_g" in data:
        return {k: data[k].float().reshape(-1, data[k].shape[-1]) for k in ("clip_l", "clip_g") if k in data}
    tensors = [v for v in data.values() if torch.is_tensor(v)]
    if len(tensors) != 1:
        raise ConceptGuardError(
            f"{str(p)!r} has {len(tensors)} tensors; expected one embedding tensor [n, d]."
        )
    t = tensors[0].float()
    return {"clip_l": t.reshape(-1, t.shape[-1])}


def embedding_tensors(vectors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The file layout every tool loads (see ``reference/ti_backdoor_and_embedding_formats.md`` §B):
    SD1.x/2.x one key, named after the embedding, holding ``[n, d]`` (diffusers then picks the token up
    by itself; A1111, ComfyUI and kohya take the single tensor); SDXL ``clip_l`` ``[n, 768]`` and
    ``clip_g`` ``[n, 1280]``. No other tensors (A1111 and diffusers insist on one)."""
    if "clip_g" in vectors:
        return {
            "clip_l": vectors["clip_l"].float().contiguous(),
            "clip_g": vectors["clip_g"].float().contiguous(),
        }
    return {name: vectors["clip_l"].float().contiguous()}


def save_embedding(
    vectors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, object],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``vectors`` (``{"clip_l": [n, d]}``, SDXL also ``"clip_g"``) atomically as ``path``
    (``.safetensors``; the stem is the embedding's name), with ``metadata`` in the header."""
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ConceptGuardError(f"Embedding files are written as .safetensors, got {str(p)!r}.")
    header = {"format": "pt", **metadata}
    return save_safetensors_atomic(embedding_tensors(vectors, p.stem), p, header, overwrite=overwrite)


def add_embedding(backend, path: str | os.PathLike, name: str | None = None) -> list[str]:
    """Make ``embedding:NAME`` usable in the diffusers backend's prompts (NAME defaults to the file stem).

    New tokens ``<NAME_0> … <NAME_{n-1}>`` are added to the backend's tokenizer and text encoder (its
    own copies: a loaded model, not a host's). Returns the tokens.

    Raises:
        ConceptGuardError: wrong width for this text encoder, or the name is taken.
    """
    name = name or Path(path).stem
    vectors = read_embedding(path)
    key_for = ["clip_l"] if len(backend.text_encoders) == 1 else ["clip_l", "clip_g"]
    if any(k not in vectors for k in key_for):
        raise ConceptGuardError(
            f"Embedding {name!r} has {sorted(vectors)}; this {backend.arch} model needs {key_for}."
        )
    n = vectors[key_for[0]].shape[0]
    tokens = [f"<{name}_{i}>" for i in range(n)]
    for key, enc, tok in zip(key_for, backend.text_encoders, backend.tokenizers, strict=True):
        rows = vectors[key]
        table = enc.get_input_embeddings()
        if rows.shape[-1] != table.weight.shape[1]:
            raise ConceptGuardError(
                f"Embedding {name!r} is {rows.shape[-1]} wide; this text encoder is {table.weight.shape[1]} wide. "
                "Use an embedding trained for this model."
            )
        if tok.add_tokens(tokens) != n:
            raise ConceptGuardError(f"Tokens {tokens} already exist; load {name!r} under another name.")
        enc.resize_token_embeddings(len(tok))
        with torch.no_grad():
            enc.get_input_embeddings().weight[-n:] = rows.to(table.weight.dtype)
    backend.embedding_tokens[name] = tokens
    return tokens


def expand_embedding_syntax(prompt: str, embedding_tokens: dict[str, list[str]]) -> str:
    """Replace ``embedding:NAME`` (optionally ``NAME.safetensors``/``.pt``) by NAME's tokens.

    Raises:
        ConceptGuardError: a prompt names an embedding that was not loaded.
    """

    def sub(m: re.Match) -> str:
        name = m.group(1)
        for key in (name, name.rsplit(".", 1)[0]):
            if key in embedding_tokens:
                return " ".join(embedding_tokens[key])
        raise ConceptGuardError(
            f"Prompt uses embedding:{name} but no such embedding is loaded (loaded: {sorted(embedding_tokens)})."
        )

    return _SYNTAX.sub(sub, prompt)
