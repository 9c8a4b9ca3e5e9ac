"""Closed-form erasure in the cross-attention: UCE (Gandikota et al., WACV 2024) and RECE (Gong et al., ECCV 2024).

Every cross-attention key and value projection ``W`` reads the text encoder's token vectors. UCE re-solves them so
that the vectors of the erased prompts produce what the anchor's vectors produced, while the vectors of the
preserved prompts produce what they did:

    W' = argmin  s_e·Σ_e ‖W'c_e − W a_e‖² + s_p·Σ_p ‖W'c_p − W c_p‖² + λ‖W' − W‖²
       = W · X · B⁻¹,   X = λI + s_e·Σ a_e c_eᵀ + s_p·Σ c_p c_pᵀ,   B = λI + s_e·Σ c_e c_eᵀ + s_p·Σ c_p c_pᵀ

``M = X B⁻¹`` is the same ``d × d`` matrix for every projection (they all read the same token vectors), so the
whole edit is one solve, and every projection's delta is ``W (M − I)``.

Which vectors: for each erased prompt, its last word's position and every position after it (end and padding
tokens carry the whole prompt in a causal encoder), paired position by position with the anchor's, as in the
official script; preserved prompts likewise map to themselves.

RECE then looks for what still brings the concept back: the embedding ``e`` whose outputs under the edited
weights match the concept's under the original ones, in closed form over all projections,
``e = (Mᵀ G M + γI)⁻¹ Mᵀ G c`` with ``G = Σ_l W_lᵀ W_l``; it adds ``e → anchor`` to the erased set and solves
again, for a few rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..backend import DiffusionBackend
from ..config_io import config_from_metadata, config_metadata
from ..errors import ConceptGuardError
from ..targets import TargetSpec
from ..trainer import TrainResult
from .esd import check_prompt_length
from .esd_config import check_preserve, mentions, parse_concepts

__all__ = ["UCE_MODULES", "UCEConfig", "erase_map", "train"]

logger = logging.getLogger(__name__)

#: The weights a closed-form edit changes: the key and value projections of the text in every cross-attention.
UCE_MODULES = TargetSpec(include=("attn2.to_k", "attn2.to_v"))
CLOSED_FORM_METHODS = ("uce", "rece")


@dataclass(frozen=True, kw_only=True)
class UCEConfig:
    """Settings of one closed-form edit. Defaults follow the official UCE script.

    Args:
        concepts (`tuple[str, ...]`): concepts to erase (comma-separated or a tuple).
        method (`str`, defaults to ``"uce"``): ``"uce"``, or ``"rece"`` for UCE followed by ``rounds`` of RECE.
        anchor (`str`, defaults to ``""``): what the concepts map to; empty = the empty prompt.
        erase_from (`tuple[str, ...]`): prompts erased as well (e.g. the concept in several colours); empty = none.
        preserve (`tuple[str, ...]`): prompts whose cross-attention outputs must not change; none may name a
            concept.
        eta (`float`, defaults to 0.0): push the erased prompts past the anchor, away from the concept: their
            outputs map to ``W (a + η (a − c))`` (0 = onto the anchor, as in UCE). The closed-form analogue of
            ESD's negative guidance; with the empty anchor and η = 0 an erased prompt draws what the empty prompt
            draws, which may include the concept.
        erase_scale (`float`, defaults to 1.0): weight of the erased prompts.
        preserve_scale (`float`, *optional*): weight of the preserved prompts; ``None`` = ``max(0.1, 1/len(preserve))``.
        lamb (`float`, defaults to 0.5): weight of staying close to the original weights.
        rounds (`int`, defaults to 3): RECE rounds (``method="rece"`` only).
        rece_reg (`float`, defaults to 0.1): RECE's ridge γ, as a share of the mean eigenvalue of ``MᵀGM``.
    """

    concepts: tuple[str, ...]
    method: str = "uce"
    anchor: str = ""
    erase_from: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()
    eta: float = 0.0
    erase_scale: float = 1.0
    preserve_scale: float | None = None
    lamb: float = 0.5
    rounds: int = 3
    rece_reg: float = 0.1

    def __post_init__(self) -> None:
        concepts = parse_concepts(self.concepts)
        if not concepts:
            raise ConceptGuardError(
                f"`concepts` must name at least one concept, got {self.concepts!r}. Example: 'circle'."
            )
        object.__setattr__(self, "concepts", concepts)
        object.__setattr__(self, "erase_from", parse_concepts(self.erase_from))
        object.__setattr__(self, "preserve", parse_concepts(self.preserve))
        object.__setattr__(self, "anchor", (self.anchor or "").strip())
        if self.method not in CLOSED_FORM_METHODS:
            raise ConceptGuardError(
                f"`method` must be one of {list(CLOSED_FORM_METHODS)}, got {self.method!r}."
            )
        for name in ("erase_scale", "lamb", "rece_reg"):
            value = getattr(self, name)
            if not 0 < value <= 1e4:
                raise ConceptGuardError(f"`{name}` must be in (0, 10000], got {value!r}.")
        if not 0 <= self.eta <= 20:
            raise ConceptGuardError(f"`eta` must be in [0, 20], got {self.eta!r}.")
        if self.preserve_scale is not None and not 0 < self.preserve_scale <= 1e4:
            raise ConceptGuardError(
                f"`preserve_scale` must be in (0, 10000] (or auto), got {self.preserve_scale!r}."
            )
        if not isinstance(self.rounds, int) or not 0 <= self.rounds <= 20:
            raise ConceptGuardError(f"`rounds` must be an integer in [0, 20], got {self.rounds!r}.")
        check_preserve(concepts, self.preserve)

    @property
    def effective_preserve_scale(self) -> float:
        if self.preserve_scale is not None:
            return self.preserve_scale
        return max(0.1, 1.0 / max(1, len(self.preserve)))

    @property
    def erased_prompts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.concepts, *self.erase_from)))

    def to_metadata(self) -> dict[str, str]:
        return config_metadata(self, summary=("method", "concepts", "anchor", "erase_from", "preserve"))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> UCEConfig:
        return config_from_metadata(cls, metadata)


def _token_rows(backend: DiffusionBackend, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
    """The encoder's token vectors ``[B, L, D]`` (fp64) and each prompt's last-word position."""
    context = backend.encode_text(list(prompts)).context.detach().to(torch.float64)
    return context, [backend.count_tokens(p) for p in prompts]


def _concept_of(prompt: str, concepts: Sequence[str]) -> int:
    """Which concept an erased prompt is about: the first whose words it contains (else the first)."""
    return next((i for i, concept in enumerate(concepts) if mentions(prompt, concept)), 0)


def _aligned(rows: torch.Tensor, last: int, far: int) -> torch.Tensor:
    """A prompt's rows from its last word on, cut to the length shared by prompts whose last word is as far as
    ``far`` (row j of every prompt is then j tokens after its last word)."""
    return rows[last : rows.shape[0] - (far - last)]


def _pairs(backend: DiffusionBackend, cfg: UCEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Erased rows ``C``, their target rows ``A`` and preserved rows ``P`` (each ``[n, d]``).

    An erased prompt f about concept k keeps its own rows minus the concept's direction from the anchor,
    ``c_f − (1 + η)(c_k − c_anchor)``, rows aligned from each prompt's last word on: for f = k this is
    ``a + η (a − c_k)``, UCE's anchor mapping when η = 0; for "a red circle" it keeps "red".
    """
    erased, concepts = cfg.erased_prompts, cfg.concepts
    ctx, last = _token_rows(backend, [*erased, *concepts, cfg.anchor])
    anchor, n_a = ctx[-1], last[-1]
    cs, targets = [], []
    for i, n in enumerate(last[: len(erased)]):
        k = len(erased) + _concept_of(erased[i], concepts)
        far = max(n, n_a, last[k])
        c = _aligned(ctx[i], n, far)
        cs.append(c)
        targets.append(c - (1 + cfg.eta) * (_aligned(ctx[k], last[k], far) - _aligned(anchor, n_a, far)))
    if cfg.preserve:
        pctx, plast = _token_rows(backend, cfg.preserve)
        p = torch.cat([pctx[i, n:] for i, n in enumerate(plast)])
    else:
        p = ctx.new_zeros((0, ctx.shape[-1]))
    return torch.cat(cs), torch.cat(targets), p


def erase_map(
    c: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    *,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> torch.Tensor:
    """``M = X B⁻¹`` (see the module docstring) for erased rows ``c → a`` and preserved rows ``p`` (all ``[n, d]``)."""
    d = c.shape[-1]
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    x = lamb * eye + erase_scale * a.T @ c + preserve_scale * p.T @ p
    b = lamb * eye + erase_scale * c.T @ c + preserve_scale * p.T @ p
    # M B = X and B is symmetric, so Mᵀ = B⁻¹ Xᵀ.
    return torch.linalg.solve(b, x.T).T


def _rece_embeddings(m: torch.Tensor, gram: torch.Tensor, c: torch.Tensor, reg: float) -> torch.Tensor:
    """Rows ``e`` that the edited weights ``W M`` turn into what ``W`` made of ``c`` (ridge-regularised)."""
    mgm = m.T @ gram @ m
    gamma = reg * torch.trace(mgm) / mgm.shape[0]
    eye = torch.eye(mgm.shape[0], dtype=m.dtype, device=m.device)
    return torch.linalg.solve(mgm + gamma * eye, m.T @ gram @ c.T).T


def _rece_targets(e: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What a found row ``e = s·c + r`` (r ⟂ c) maps to: ``s·a``, the erased row's target to the same extent, with
    the part that the attack added (r) sent to zero. A target of ``a`` for every ``e`` would contradict ``c → a``
    wherever ``e`` is close to a multiple of ``c``, and weaken the first erasure."""
    s = (e * c).sum(-1, keepdim=True) / (c * c).sum(-1, keepdim=True).clamp_min(1e-12)
    return s * a


def _residual(m: torch.Tensor, gram: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> float:
    """How far the edited outputs of the erased rows are from the anchor's, relative to the anchor's (0 = exact)."""
    diff = c @ m.T - a
    return float(torch.einsum("nd,de,ne->", diff, gram, diff) / torch.einsum("nd,de,ne->", a, gram, a))


def train(
    cfg: UCEConfig,
    backend: DiffusionBackend,
    *,
    on_phase: Callable[[str], None] | None = None,
) -> TrainResult:
    """Solve the closed-form edit of ``cfg`` on the backend's UNet.

    The backend's weights are only read. The result's ``tensors`` are LDM-keyed fp32 deltas of every
    ``attn2.to_k``/``attn2.to_v`` weight, and its ``losses`` hold the erase residual after each solve.

    Raises:
        ConceptGuardError: a prompt too long; NoMatchingModulesError: a UNet without cross-attention.
    """
    check_prompt_length(backend, [*cfg.erased_prompts, *cfg.preserve, cfg.anchor])
    names = UCE_MODULES.select(backend.unet_module_names())
    start = time.perf_counter()
    if on_phase:
        on_phase("encoding prompts")
    c, a, p = _pairs(backend, cfg)
    weights = {n: backend.unet_weight(n) for n in names}
    gram = sum(w.to(torch.float64).T @ w.to(torch.float64) for w in weights.values())
    scales = dict(erase_scale=cfg.erase_scale, preserve_scale=cfg.effective_preserve_scale, lamb=cfg.lamb)
    if on_phase:
        on_phase("solving")
    m = erase_map(c, a, p, **scales)
    residuals = [_residual(m, gram, c, a)]
    if cfg.method == "rece":
        found_c, found_a = [c], [a]
        for r in range(cfg.rounds):
            e = _rece_embeddings(m, gram, c, cfg.rece_reg)
            found_c.append(e)
            found_a.append(_rece_targets(e, c, a))
            m = erase_map(torch.cat(found_c), torch.cat(found_a), p, **scales)
            residuals.append(
                _residual(m, gram, found_c[-1], found_a[-1])
            )  # the found rows against their targets
            if on_phase:
                on_phase(f"RECE round {r + 1}/{cfg.rounds}")
    shift = m - torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    tensors = {
        f"{n}.weight": (w.to(torch.float64) @ shift).float().cpu().contiguous() for n, w in weights.items()
    }
    seconds = time.perf_counter() - start
    logger.info(
        "%s on %d projections: %d erased, %d preserved token vectors, residual %.3g, %.2fs",
        cfg.method.upper(),
        len(names),
        len(c),
        len(p),
        residuals[-1],
        seconds,
    )
    result = TrainResult(losses=residuals, seconds=seconds, iterations=len(residuals), tensors=tensors)
    result.metadata = {**cfg.to_metadata(), **result.provenance(backend)}
    return result
