"""Putting trainable token vectors into prompts, the same way on every backend.

A prompt names the vectors with :data:`~concept_guard.core.backend.PLACEHOLDER`. Before tokenizing,
the placeholder becomes ``n`` copies of :data:`~concept_guard.core.backend.SENTINEL_WORD` (one CLIP
token each); after the token-embedding lookup, the i-th sentinel of each occurrence is replaced by
row i. The host's tokenizer and embedding table are never changed, and ComfyUI's own
``embedding:NAME`` path inserts an embedding file's rows at exactly these positions at inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .backend import PLACEHOLDER, SENTINEL_WORD
from .errors import ConceptGuardError, ModelLoadError


def vector_count(vectors: dict[str, torch.Tensor]) -> int:
    """``n`` of the ``[n, d]`` rows (equal for every slot).

    Raises:
        ConceptGuardError: empty, not 2-D, or slots with different row counts.
    """
    if not vectors:
        raise ConceptGuardError("`vectors` is empty; give at least one slot (e.g. {'clip_l': tensor[n, d]}).")
    counts = {k: (v.shape[0] if v.dim() == 2 else -1) for k, v in vectors.items()}
    if len(set(counts.values())) != 1 or -1 in counts.values():
        raise ConceptGuardError(f"Token vectors must be [n, d] with the same n in every slot, got {counts}.")
    return next(iter(counts.values()))


def expand_placeholder(prompts: Sequence[str], n: int) -> list[str]:
    """Replace each :data:`PLACEHOLDER` by ``n`` sentinel words.

    Raises:
        ConceptGuardError: a prompt already contains the sentinel word (it would be mistaken for a vector).
    """
    out = []
    for prompt in prompts:
        if SENTINEL_WORD in prompt.lower().split():
            raise ConceptGuardError(
                f"Prompt {prompt!r} contains the word {SENTINEL_WORD!r}, which Concept Guard reserves for "
                "trainable token vectors; rephrase it."
            )
        out.append(prompt.replace(PLACEHOLDER, " ".join([SENTINEL_WORD] * n)))
    return out


def substitute_rows(
    embeds: torch.Tensor, ids: torch.Tensor, sentinel_id: int, rows: torch.Tensor
) -> torch.Tensor:
    """Token embeddings ``[B, L, d]`` with the sentinel positions replaced by ``rows`` ``[n, d]`` in order
    (the k-th sentinel of a prompt gets row ``k mod n``). Differentiable with respect to ``rows``.

    Raises:
        ConceptGuardError: a prompt's sentinel count is not a multiple of n (it was truncated).
    """
    mask = ids == sentinel_id
    n = rows.shape[0]
    counts = mask.sum(dim=1)
    if bool((counts % n).any()):
        raise ConceptGuardError(
            f"A prompt lost part of its {n} token vectors to truncation (sentinels per prompt: {counts.tolist()}); "
            "shorten the prompt."
        )
    order = (mask.long().cumsum(dim=1) - 1).clamp(min=0) % n
    picked = rows.to(embeds.dtype)[order]
    return torch.where(mask.unsqueeze(-1), picked, embeds)


def sentinel_id(tokenizer) -> int:
    """The id of :data:`SENTINEL_WORD` in a transformers CLIP tokenizer.

    Raises:
        ModelLoadError: the word is not a single token (not a CLIP BPE vocabulary).
    """
    ids = tokenizer(SENTINEL_WORD).input_ids[1:-1]
    if len(ids) != 1:
        raise ModelLoadError(
            f"This tokenizer splits {SENTINEL_WORD!r} into {len(ids)} tokens; expected a CLIP BPE vocabulary."
        )
    return ids[0]


@contextlib.contextmanager
def substituting(encoder, tokenizer, rows: torch.Tensor | None) -> Iterator[None]:
    """Within the block, a transformers text encoder's token-embedding output has the sentinel positions
    replaced by ``rows`` (a forward hook, removed on exit); ``rows=None`` changes nothing."""
    if rows is None:
        yield
        return
    sentinel = sentinel_id(tokenizer)

    def hook(module, args, output):
        return substitute_rows(output, args[0], sentinel, rows.to(output.device))

    handle = encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
