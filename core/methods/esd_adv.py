"""Adversarial ESD: erase the concept from the prompts an attacker would find, not only from its words.

A plain ESD edit maps the concept's *words* away, but a few free token vectors learned against the edited
model (concept inversion, Pham et al. 2023; UnlearnDiffAtk) find another way into the same image. As in
AdvUnlearn (Zhang et al. 2024), training here alternates with such an attack:

- **inner attack**, every ``adv_every`` steps: ``adv_steps`` Adam steps on ``adv_vectors`` token vectors S*
  that take the concept's place in the erase prompts ("a red circle" → "a red S*"), so that the *edited*
  model's prediction on the concept's own x_t matches the frozen model's prediction for the concept,
  ``min_S* ‖ε_θ(x_t, f[c → S*]) − ε*(x_t, f)‖²`` (the attacker's goal, without images or a classifier);
- **outer step**: the ESD loss plus ``adv_weight`` × the same ESD target for those prompts,
  ``‖ε_θ(x_t, f[c → S*]) − target(x_t, f)‖²``, with S* drawn from every vector set found so far.

The attack keeps its vectors between rounds (it continues where the edit left it), so the edit meets an
attacker that has trained as long as the edit has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..backend import PLACEHOLDER, Conditioning, DiffusionBackend
from .esd_config import ESDConfig

#: Bank rows of the erase prompts that the attack and the adversarial term draw from.
MAX_ROWS = 256
#: Bank rows per attack step and per adversarial term.
BATCH = 8


def _core_word(concept: str) -> str:
    """The concept without a leading article ("a circle" → "circle")."""
    return re.sub(r"^(a|an|the)\s+", "", concept.strip(), flags=re.IGNORECASE)


def attack_prompt(prompt: str, concept: str) -> str:
    """``prompt`` with the concept's words replaced by :data:`PLACEHOLDER` (appended if absent)."""
    word = _core_word(concept)
    pattern = re.compile(rf"\b{re.escape(word)}\b", flags=re.IGNORECASE)
    if pattern.search(prompt):
        return pattern.sub(PLACEHOLDER, prompt)
    return f"{prompt}, {PLACEHOLDER}"


def erase_prompts(concepts: Sequence[str], erase_from: Sequence[str]) -> list[tuple[str, str]]:
    """``(concept, student prompt)`` of every erase job, in the order of the ESD bank's jobs."""
    return [(c, f) for c in concepts for f in (erase_from or (c,))]


@dataclass
class Adversary:
    """The attack's state: the bank rows it uses, their frozen predictions and targets, the vectors."""

    backend: DiffusionBackend
    prompts: list[str]  # per erase job: the student prompt with S* for the concept
    x_t: torch.Tensor
    t: torch.Tensor
    job: torch.Tensor
    teacher: torch.Tensor  # ε*(x_t, f): what the attack tries to make the edited model predict
    target: torch.Tensor  # the ESD target of the row
    vectors: dict[str, torch.nn.Parameter]
    lr: float
    keep: _Rows | None = None  # retain rows: the preserve prompts' x_t, conditionings and ε*(x_t, p)
    pool: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def _batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        r = torch.randint(0, len(self.t), (BATCH,), generator=gen)
        device = self.backend.device
        prompts = [self.prompts[int(j)] for j in self.job[r]]
        return self.x_t[r].to(device), self.t[r].to(device), r, prompts

    def attack(self, steps: int, gen: torch.Generator) -> float:
        """``steps`` attack steps on the current (edited) weights; the vectors found join the pool."""
        opt = torch.optim.Adam(self.vectors.values(), lr=self.lr)
        loss = torch.zeros(())
        for _ in range(steps):
            x, t, r, prompts = self._batch(gen)
            cond = self.backend.encode_text_with_vectors(prompts, self.vectors)
            loss = F.mse_loss(self.backend.eps(x, t, cond).float(), self.teacher[r].to(x.device))
            params = list(self.vectors.values())
            # gradients for the vectors only: the deltas' gradients belong to the outer step
            for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                p.grad = g
            opt.step()
        self.pool.append({k: v.detach().clone() for k, v in self.vectors.items()})
        return float(loss.detach())

    @torch.no_grad()
    def gap(self) -> float:
        """The attack's objective over every row with the current vectors: how close the attacker gets to
        the frozen model's concept predictions on the current weights (0 = it brings the concept back fully)."""
        total = 0.0
        for s in range(0, len(self.t), 64):
            x, t = self.x_t[s : s + 64].to(self.backend.device), self.t[s : s + 64].to(self.backend.device)
            prompts = [self.prompts[int(j)] for j in self.job[s : s + 64]]
            cond = self.backend.encode_text_with_vectors(prompts, self.vectors)
            err = (self.backend.eps(x, t, cond).float() - self.teacher[s : s + 64].to(x.device)) ** 2
            total += float(err.mean(dim=(1, 2, 3)).sum())
        return total / len(self.t)

    def loss(self, gen: torch.Generator, retain: float) -> torch.Tensor:
        """The ESD loss on prompts carrying vectors drawn from the pool, plus ``retain`` × the preserve
        prompts' loss (what holds the other concepts in place against the stronger push)."""
        x, t, r, prompts = self._batch(gen)
        vectors = self.pool[int(torch.randint(0, len(self.pool), (1,), generator=gen))]
        with torch.no_grad():
            cond = self.backend.encode_text_with_vectors(prompts, vectors)
        loss = F.mse_loss(self.backend.eps(x, t, cond).float(), self.target[r].to(x.device))
        if self.keep is None or not retain:
            return loss
        return loss + retain * self.keep.loss(self.backend, gen)


@dataclass
class _Rows:
    """Bank rows with fixed conditionings and frozen targets."""

    x_t: torch.Tensor
    t: torch.Tensor
    conds: list[Conditioning]
    target: torch.Tensor

    def loss(self, backend: DiffusionBackend, gen: torch.Generator) -> torch.Tensor:
        r = torch.randint(0, len(self.t), (BATCH,), generator=gen)
        x, t = self.x_t[r].to(backend.device), self.t[r].to(backend.device)
        cond = Conditioning.cat([self.conds[int(i)] for i in r])
        return F.mse_loss(backend.eps(x, t, cond).float(), self.target[r].to(x.device))


def init_vectors(backend: DiffusionBackend, concept: str, n: int) -> dict[str, torch.nn.Parameter]:
    """``n`` rows per slot, each the mean of the concept word's token vectors (where an attacker starts)."""
    words = backend.word_vectors(_core_word(concept))
    return {
        slot: torch.nn.Parameter(v.mean(0, keepdim=True).repeat(n, 1).to(backend.device).float().clone())
        for slot, v in words.items()
    }


@torch.no_grad()
def frozen_predictions(
    backend: DiffusionBackend,
    x: torch.Tensor,
    t: torch.Tensor,
    conds: Sequence[Conditioning],
    chunk: int = 64,
) -> torch.Tensor:
    """ε*(x_t, cond) row by row (``conds[i]`` for row i), batched; call while no delta is enabled."""
    out = torch.empty(x.shape, dtype=torch.float32)
    for s in range(0, x.shape[0], chunk):
        cond = Conditioning.cat(list(conds[s : s + chunk]))
        xs, ts = x[s : s + chunk].to(backend.device), t[s : s + chunk].to(backend.device)
        out[s : s + chunk] = backend.eps(xs, ts, cond).float().cpu()
    return out


def build_adversary(backend: DiffusionBackend, cfg: ESDConfig, bank: Any, gen: torch.Generator) -> Adversary:
    """The attack's rows (up to :data:`MAX_ROWS` entries of the erase prompts of ESD's trajectory ``bank``)
    with their frozen predictions and ESD targets. Call before any delta is
    attached (the frozen model is the UNet as loaded)."""
    jobs = erase_prompts(cfg.concepts, cfg.erase_from)
    rows = torch.nonzero(bank.concept < len(jobs)).flatten()
    rows = rows[torch.randperm(len(rows), generator=gen)[:MAX_ROWS]]
    job, x, t = bank.concept[rows], bank.x_t[rows], bank.t[rows]
    teacher = frozen_predictions(backend, x, t, [bank.conds[int(j)] for j in job])
    target = teacher
    if cfg.anchor:
        target = frozen_predictions(backend, x, t, [backend.encode_text([cfg.anchor])] * len(rows))
    if cfg.eta:
        concept = {c: backend.encode_text([c]) for c in cfg.concepts}
        e_c = frozen_predictions(backend, x, t, [concept[jobs[int(j)][0]] for j in job])
        e_0 = frozen_predictions(backend, x, t, [backend.encode_text([""])] * len(rows))
        target = target - cfg.eta * (e_c - e_0)
    keep = torch.nonzero(bank.concept >= len(jobs)).flatten()
    keep = keep[torch.randperm(len(keep), generator=gen)[:MAX_ROWS]]
    keep_conds = [bank.conds[int(j)] for j in bank.concept[keep]]
    retain = _Rows(
        x_t=bank.x_t[keep],
        t=bank.t[keep],
        conds=keep_conds,
        target=frozen_predictions(backend, bank.x_t[keep], bank.t[keep], keep_conds),
    )
    return Adversary(
        backend=backend,
        keep=retain if len(keep) else None,
        prompts=[attack_prompt(f, c) for c, f in jobs],
        x_t=x,
        t=t,
        job=job,
        teacher=teacher,
        target=target,
        vectors=init_vectors(backend, cfg.concepts[0], cfg.adv_vectors),
        lr=cfg.adv_lr,
    )
