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


def _check_embedding(backend, name: str, vectors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The rows for each of the backend's text encoders, checked before anything is changed: every slot
    present, the right width, finite values, and no token of this name loaded yet (diffusers would fail
    later, or after changing the first of SDXL's two encoders)."""
    keys = ["clip_l"] if len(backend.text_encoders) == 1 else ["clip_l", "clip_g"]
    if any(k not in vectors for k in keys):
        raise ConceptGuardError(
            f"Embedding {name!r} has {sorted(vectors)}; this {backend.arch} model needs {keys}."
        )
    rows = [vectors[k] for k in keys]
    if len({r.shape[0] for r in rows}) != 1:
        raise ConceptGuardError(
            f"Embedding {name!r} has {[r.shape[0] for r in rows]} vectors for {keys}; expected the same count "
            "in each. Re-export it with one row per token for every text encoder."
        )
    tokens = embedding_token_names(name, rows[0].shape[0])
    for key, r, enc, tok in zip(keys, rows, backend.text_encoders, backend.tokenizers, strict=True):
        width = enc.get_input_embeddings().weight.shape[1]
        if r.shape[-1] != width:
            raise ConceptGuardError(
                f"Embedding {name!r} is {r.shape[-1]} wide; this text encoder is {width} wide. "
                "Use an embedding trained for this model."
            )
        if not bool(torch.isfinite(r).all()):
            raise ConceptGuardError(
                f"Embedding {name!r} holds NaN or infinite values in {key!r}; expected finite vectors. "
                "Re-train or re-export it."
            )
        vocab = tok.get_vocab()
        if name in backend.embedding_tokens or any(t in vocab for t in tokens):
            raise ConceptGuardError(f"Tokens {tokens} already exist; load {name!r} under another name.")
    return rows


def embedding_token_names(name: str, n: int) -> list[str]:
    """The tokens ``<NAME_0> … <NAME_{n-1}>`` that stand for an embedding's ``n`` vectors in prompts."""
    return [f"<{name}_{i}>" for i in range(n)]


def add_embedding(backend, path: str | os.PathLike, name: str | None = None) -> list[str]:
    """Make ``embedding:NAME`` usable in the diffusers backend's prompts (NAME defaults to the file stem).

    The file is read with :func:`read_embedding` (it knows the A1111, SDXL ``clip_l``/``clip_g`` and
    ComfyUI layouts, and refuses code-carrying pickles) and checked with clearer messages than diffusers
    gives; the tokens ``<NAME_0> … <NAME_{n-1}>`` are then added by diffusers' own
    ``TextualInversionLoaderMixin.load_textual_inversion``, once per text encoder with its
    ``text_encoder=``/``tokenizer=`` arguments (diffusers' SDXL recipe). The backend's tokenizers and
    text encoders are changed (its own copies: a loaded model, not a host's). Returns the tokens.

    Raises:
        ConceptGuardError: missing slot, wrong width for this text encoder, NaN/inf values, or the name
            is taken; nothing is changed then.
    """
    from diffusers.loaders import TextualInversionLoaderMixin

    class _Loader(TextualInversionLoaderMixin):
        """diffusers' loader without a pipeline: no accelerate offload hooks to remove and re-apply."""

        hf_device_map = None
        components: dict = {}

    name = name or Path(path).stem
    rows = _check_embedding(backend, name, read_embedding(path))
    tokens = embedding_token_names(name, rows[0].shape[0])
    for r, enc, tok in zip(rows, backend.text_encoders, backend.tokenizers, strict=True):
        weight = enc.get_input_embeddings().weight
        # One token per row (diffusers' list form), so the names are ours, not NAME, NAME_1, ...
        _Loader().load_textual_inversion(
            r.to(weight.device, weight.dtype), token=list(tokens), text_encoder=enc, tokenizer=tok
        )
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
