"""Trainable token vectors in prompts on ComfyUI's CLIP (``core.token_vectors`` on the host's tokenizer).

ComfyUI token lists hold ``(token, weight)`` pairs, and an entry whose token is a tensor is an embedding
row inserted at that position: this is how ``embedding:NAME`` works at inference. Training puts the
trainable rows in the sentinel positions the same way, so a saved embedding is used at inference exactly
as it was trained.
"""

from __future__ import annotations

import torch

from ..core.backend import ENCODER_SLOTS, PLACEHOLDER, SENTINEL_WORD
from ..core.errors import ArchitectureMismatchError, ConceptGuardError, ModelLoadError
from ..core.token_vectors import expand_placeholder, vector_count

#: ComfyUI tokenizer keys -> vector slots ("h" is SD2's OpenCLIP-H, the only encoder there).
SLOT_OF_KEY = {"l": "clip_l", "h": "clip_l", "g": "clip_g"}


def _slot(key: str) -> str:
    if key not in SLOT_OF_KEY:
        raise ModelLoadError(
            f"Unsupported text encoder {key!r}; Concept Guard trains embeddings for CLIP-L/H/G only."
        )
    return SLOT_OF_KEY[key]


def text_encoder(clip, key: str) -> torch.nn.Module:
    """The CLIP sub-model behind tokenizer key ``key`` (``clip_l``, ``clip_g``, ``clip_h``)."""
    model = clip.cond_stage_model
    found = getattr(model, f"clip_{key}", None)
    if found is None and getattr(model, "clip_name", None) == key:
        found = getattr(model, model.clip, None)
    if found is None:
        raise ModelLoadError(f"CLIP {type(model).__name__} has no text encoder for tokenizer key {key!r}.")
    return found


def _ids(clip, text: str) -> dict[str, list[int]]:
    """Token ids of ``text`` per tokenizer key, without start/end/padding."""
    out = {}
    for key, chunks in clip.tokenize(text).items():
        row = [int(tok) for tok, *_ in chunks[0]]
        end_token = getattr(clip.tokenizer, f"clip_{key}").end_token  # SDXL's clip_g pads with 0, not the end
        out[key] = row[1 : row.index(end_token, 1)]
    return out


def embedding_widths(clip) -> dict[str, int]:
    widths = {}
    for key in clip.tokenize(""):
        table = text_encoder(clip, key).transformer.get_input_embeddings()
        widths[_slot(key)] = int(table.weight.shape[1])
    return {s: widths[s] for s in ENCODER_SLOTS if s in widths}


def token_table(clip) -> tuple[dict[str, torch.Tensor], list[int]]:
    keys = list(clip.tokenize(""))
    with torch.inference_mode(False):
        tables = {
            _slot(key): text_encoder(clip, key)
            .transformer.get_input_embeddings()
            .weight.detach()
            .float()
            .clone()
            for key in keys
        }
    special = {i for key in keys for i in getattr(clip.tokenizer, f"clip_{key}").tokenizer.all_special_ids}
    return tables, sorted(special)


def decode_tokens(clip, ids: list[int]) -> str:
    key = next(iter(clip.tokenize("")))
    return getattr(clip.tokenizer, f"clip_{key}").tokenizer.decode(ids).strip()


def check_clip_width(clip, arch: str, context_dim: int | None) -> None:
    """A CLIP from another model family (e.g. SDXL's with an SD1.5 MODEL) would fail deep in a matmul.

    Raises:
        ArchitectureMismatchError: the CLIP's token width is not the MODEL's text width (both named).
    """
    try:
        widths = embedding_widths(clip)
    except ModelLoadError:
        return  # not a CLIP-L/H/G text encoder: ComfyUI itself decides what it can encode
    if context_dim is not None and sum(widths.values()) != context_dim:
        raise ArchitectureMismatchError(
            f"The CLIP ({type(clip.cond_stage_model).__name__}, token width {sum(widths.values())}) does not "
            f"match the MODEL ({arch}, text width {context_dim}). Connect the CLIP loaded with this MODEL."
        )


def word_vectors(clip, word: str) -> dict[str, torch.Tensor]:
    out = {}
    with torch.inference_mode(False):
        for key, ids in _ids(clip, word).items():
            if not ids:
                raise ConceptGuardError(f"{word!r} has no tokens; give a word such as 'object'.")
            table = text_encoder(clip, key).transformer.get_input_embeddings().weight
            out[_slot(key)] = table[ids].detach().float().cpu().clone()
    return out


def sentinel_ids(clip) -> dict[str, int]:
    """The id of the sentinel word per tokenizer key.

    Raises:
        ModelLoadError: the word is not a single token (not a CLIP BPE vocabulary).
    """
    sentinel = {}
    for key, ids in _ids(clip, SENTINEL_WORD).items():
        if len(ids) != 1:
            raise ModelLoadError(
                f"This tokenizer splits {SENTINEL_WORD!r} into {len(ids)} tokens; expected CLIP BPE."
            )
        sentinel[key] = ids[0]
    return sentinel


def tokens_with_vectors(clip, prompts: list[str], vectors: dict[str, torch.Tensor]) -> list[dict[str, list]]:
    """ComfyUI tokens of each prompt with each placeholder's sentinel tokens replaced by the vector rows."""
    n = vector_count(vectors)
    sentinel = sentinel_ids(clip)
    out = []
    for prompt, text in zip(prompts, expand_placeholder(prompts, n), strict=True):
        tokens = clip.tokenize(text)
        for key, chunks in tokens.items():
            rows = vectors.get(_slot(key))
            if rows is None:
                raise ConceptGuardError(
                    f"This CLIP needs token vectors for {_slot(key)!r}; got {sorted(vectors)}."
                )
            k = 0
            for chunk in chunks:
                for i, (tok, *rest) in enumerate(chunk):
                    if isinstance(tok, int) and tok == sentinel[key]:
                        chunk[i] = (rows[k % n], *rest)
                        k += 1
            if k != n * prompt.count(PLACEHOLDER):
                raise ConceptGuardError(
                    f"Prompt {prompt!r}: placed {k} token vectors, expected {n} per {PLACEHOLDER}."
                )
        out.append(tokens)
    return out
