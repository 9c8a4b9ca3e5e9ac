"""Prompt optimisation against an erased model (UnlearnDiffAtk-style, Zhang et al. 2024): no classifier needed.

A few free tokens in a prompt (``cfg.prompt`` holds :data:`~concept_guard.core.backend.PLACEHOLDER` where they
go, e.g. "<S*> a circle") are optimised so that the model under attack denoises images of the concept well with
that prompt — the diffusion-classifier objective ``min E_t,ε ‖ε_θ(√ᾱ z + √(1−ᾱ) ε, t, prompt) − ε‖²`` over the
concept images' latents z. Whatever the model still knows of the concept, a prompt that makes it a good denoiser
of the concept's images steers it there.

- **continuous**: the tokens are free vectors (sampled through an ``embedding:`` file, as concept inversion);
- **discrete**: every step uses the nearest vocabulary token of each vector (cosine, all text encoders
  together), with the gradient passed straight through to the vector (as in PEZ, Wen et al. 2023): the result
  is plain text anyone can type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import PLACEHOLDER, DiffusionBackend
from .errors import ConceptGuardError
from .seeding import make_generator
from .trainer import StepCallback, optimise


@dataclass(frozen=True, kw_only=True)
class PromptAttackConfig:
    """Args:
    prompt (`str`): the attack prompt, with ``PLACEHOLDER`` where the optimised tokens go.
    tokens (`int`, defaults to 5): optimised tokens (UnlearnDiffAtk uses 5).
    steps (`int`, defaults to 300), lr (`float`, defaults to 1e-2), batch (`int`, defaults to 8): the search.
    discrete (`bool`, defaults to True): project onto vocabulary tokens (plain text) or keep free vectors.
    max_timestep (`int`, defaults to 1000): timesteps are drawn below it.
    seed (`int`, defaults to 0).
    """

    prompt: str
    tokens: int = 5
    steps: int = 300
    lr: float = 1e-2
    batch: int = 8
    discrete: bool = True
    max_timestep: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt.count(PLACEHOLDER) != 1:
            raise ConceptGuardError(f"The attack prompt must hold {PLACEHOLDER!r} once, got {self.prompt!r}.")
        if not (1 <= self.tokens <= 32 and 1 <= self.steps <= 100000 and 1 <= self.batch <= 1024):
            raise ConceptGuardError(
                f"`tokens` must be in [1, 32], `steps` in [1, 100000] and `batch` in [1, 1024], got "
                f"{self.tokens}, {self.steps}, {self.batch}."
            )
        if not (0 < self.lr < 10 and 1 <= self.max_timestep <= 1000):
            raise ConceptGuardError(
                f"`lr` must be in (0, 10) and `max_timestep` in [1, 1000], got {self.lr}."
            )


@dataclass
class PromptAttackResult:
    """Attributes:
    vectors (`dict[str, torch.Tensor]`): the tokens' rows per slot (the vocabulary's rows when discrete).
    prompt (`str`): the attack prompt with the found text in place (discrete), else with ``PLACEHOLDER``.
    token_ids (`list[int]`): the found token ids (discrete only).
    losses (`list[float]`): the objective per step.
    """

    vectors: dict[str, torch.Tensor]
    prompt: str
    token_ids: list[int]
    losses: list[float]


def nearest_tokens(
    vectors: dict[str, torch.Tensor], table: dict[str, torch.Tensor], allowed: torch.Tensor
) -> torch.Tensor:
    """The allowed vocabulary id nearest to each row (cosine similarity summed over the slots)."""
    sims = sum(F.normalize(vectors[s].float(), dim=-1) @ F.normalize(table[s], dim=-1).T for s in table)
    return sims.masked_fill(~allowed.to(sims.device), -float("inf")).argmax(dim=-1)


def allowed_ids(vocab: int, special: list[int]) -> torch.Tensor:
    """``[V]`` bool: the ids a search may propose — not the special tokens, nor the 256 single bytes a full CLIP
    vocabulary starts with."""
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[special] = False
    if vocab > 1024:
        allowed[:256] = False
    return allowed


def optimise_prompt(
    backend: DiffusionBackend,
    latents: torch.Tensor,
    cfg: PromptAttackConfig,
    *,
    on_step: StepCallback | None = None,
) -> PromptAttackResult:
    """Search ``cfg.tokens`` tokens for ``cfg.prompt`` that make the backend's model denoise ``latents`` (the
    concept's images, VAE-encoded) best. The model is only read.

    Raises:
        ConceptGuardError: no latents, a bad config; TrainingDivergedError: the objective became NaN.
    """
    if latents.shape[0] == 0:
        raise ConceptGuardError("The prompt attack needs images of the concept; none were given.")
    gen = make_generator(cfg.seed)
    tables, special = backend.token_table()
    table = {s: t.to(backend.device) for s, t in tables.items()}
    allowed = allowed_ids(next(iter(table.values())).shape[0], special)
    pool = torch.nonzero(allowed).flatten()
    start = pool[torch.randint(0, len(pool), (cfg.tokens,), generator=gen)].to(backend.device)
    vectors = {s: torch.nn.Parameter(t[start].clone()) for s, t in table.items()}
    ac_all = backend.alphas_cumprod.float().cpu()
    prompts = [cfg.prompt] * cfg.batch

    def used() -> dict[str, torch.Tensor]:
        if not cfg.discrete:
            return dict(vectors)
        with torch.no_grad():
            ids = nearest_tokens(vectors, table, allowed)
        return {s: table[s][ids] + (v - v.detach()) for s, v in vectors.items()}  # straight-through

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, latents.shape[0], (cfg.batch,), generator=g)
        t = torch.randint(0, cfg.max_timestep, (cfg.batch,), generator=g)
        noise = torch.randn((cfg.batch, *latents.shape[1:]), generator=g)
        ac = ac_all[t].view(-1, 1, 1, 1)
        x_t = (ac.sqrt() * latents[rows].cpu() + (1 - ac).sqrt() * noise).to(backend.device)
        cond = backend.encode_text_with_vectors(prompts, used())
        return F.mse_loss(backend.eps(x_t, t.to(backend.device), cond).float(), noise.to(backend.device))

    result = optimise(
        vectors.values(),
        loss_fn,
        iterations=cfg.steps,
        lr=cfg.lr,
        seed=cfg.seed + 1,
        device=backend.device,
        on_step=on_step,
    )
    found = {s: v.detach().cpu() for s, v in vectors.items()}
    if not cfg.discrete:
        return PromptAttackResult(vectors=found, prompt=cfg.prompt, token_ids=[], losses=result.losses)
    ids = nearest_tokens(vectors, table, allowed).tolist()
    text = backend.decode_tokens(ids)
    rows = {s: table[s][ids].detach().cpu() for s in table}
    return PromptAttackResult(
        vectors=rows, prompt=cfg.prompt.replace(PLACEHOLDER, text), token_ids=ids, losses=result.losses
    )
