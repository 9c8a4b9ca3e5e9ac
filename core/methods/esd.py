"""Erased Stable Diffusion (ESD, Gandikota et al. 2023) on the backend protocol.

Objective (concept-anchored form of the official 2025 scripts, so ``eta`` = paper's η + 1):

    target = ε*(x_t, a) − η · (ε*(x_t, c) − ε*(x_t, ""))      a = anchor if given, else f
    loss   = MSE(ε_θ(x_t, f), target)

f is the prompt the edit is trained on: the concept itself, or each of the ``erase_from`` prompts
(the official script's ``--erase_from``: erase the direction of c from prompts f that contain it,
e.g. c = "a circle", f = "a red circle", without pushing away from "red").

Optional ``preserve`` prompts p add bank entries whose target is the frozen model's own ε*(x_t, p):
a retain term (as in later unlearning work) that holds unrelated concepts in place, which matters
when deltas on shared tokens (BOS, articles, padding) would otherwise drift.

ε* is the frozen model — the same UNet with every delta switched off — and ε_θ the model with
trainable deltas on the method's weights. With an anchor ("erase circle to square"), prompts for
c are steered to a's prediction and pushed away from c.

Speed: the reference loop draws a fresh batch-1 DDIM trajectory (~25 guided UNet calls) every
iteration. Here x_t comes from a *trajectory bank* sampled once by the frozen model in large
batches, and because the teacher is frozen, the target of every entry that training will draw (the
seeded row schedule is drawn first) is computed once, batched, up front. Each iteration is then a
single student forward and backward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..backend import Conditioning, DiffusionBackend
from ..errors import ConceptGuardError
from ..sampling import latent_hw, sample_trajectory
from ..seeding import make_generator
from ..targets import select_for_method
from ..trainer import StepCallback, TrainResult, optimise
from .esd_adv import build_adversary
from .esd_config import ESDConfig, parse_concepts

__all__ = ["ESDConfig", "TrajectoryBank", "build_bank", "parse_concepts", "train"]

logger = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 75  # CLIP's 77 minus start/end tokens


@dataclass
class TrajectoryBank:
    """x_t samples from the frozen model with their precomputed ESD targets.

    Attributes:
        x_t (`torch.Tensor`): ``[N, C, h, w]`` noisy latents.
        t (`torch.Tensor`): ``[N]`` integer DDPM timesteps.
        concept (`torch.Tensor`): ``[N]`` index into ``conds`` (the student prompt f of each entry).
        target (`torch.Tensor`): ``[N, C, h, w]`` fp32 ESD targets (zero for rows training never draws).
    """

    x_t: torch.Tensor
    t: torch.Tensor
    concept: torch.Tensor
    target: torch.Tensor
    conds: list[Conditioning] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.t.shape[0])


def check_prompt_length(backend: DiffusionBackend, prompts: Sequence[str]) -> None:
    """Reject prompts longer than CLIP's context (ESD would silently train on a truncated prompt)."""
    for p in prompts:
        n = backend.count_tokens(p)
        if n > MAX_PROMPT_TOKENS:
            raise ConceptGuardError(
                f"Concept {p[:40]!r}… is {n} tokens; at most {MAX_PROMPT_TOKENS} fit in CLIP's 77-token context. Shorten it."
            )


@torch.no_grad()
def esd_targets(
    eps_anchor: torch.Tensor, eps_concept: torch.Tensor, eps_null: torch.Tensor, eta: float
) -> torch.Tensor:
    """``ε*(a) − η·(ε*(c) − ε*(∅))`` in fp32."""
    return eps_anchor.float() - eta * (eps_concept.float() - eps_null.float())


@torch.no_grad()
def _targets(
    backend: DiffusionBackend,
    x: torch.Tensor,
    t: torch.Tensor,
    base: Conditioning,
    concept: Conditioning,
    null: Conditioning,
    eta: float,
) -> torch.Tensor:
    """ESD targets for one chunk, all frozen predictions in one batched call (one when η = 0: ε*(base))."""
    n = x.shape[0]
    parts = [base] if eta == 0 else [concept, null] if base is concept else [base, concept, null]
    e = backend.eps(
        x.repeat(len(parts), 1, 1, 1), t.repeat(len(parts)), Conditioning.cat([c.expand_to(n) for c in parts])
    ).chunk(len(parts))
    if eta == 0:
        return e[0].float().cpu()
    e_base, e_c, e_0 = (e[0], e[0], e[1]) if base is concept else e
    return esd_targets(e_base, e_c, e_0, eta).cpu()


_BankJob = tuple[Conditioning, Conditioning, Conditioning, float]  # (student f, base a, concept c, eta)


def _bank_jobs(
    backend: DiffusionBackend, cfg: ESDConfig, null: Conditioning, anchor: Conditioning | None
) -> list[_BankJob]:
    """One job per student prompt: erase entries (target from a, c and η), then retain entries (ε*(p))."""
    jobs = []
    for concept in cfg.concepts:
        cond = backend.encode_text([concept])
        for prompt in cfg.erase_from or (concept,):
            student = cond if prompt == concept else backend.encode_text([prompt])
            jobs.append((student, anchor if anchor is not None else student, cond, cfg.eta))
    for prompt in (*cfg.preserve, *([""] if cfg.preserve_null else [])):
        keep = null if prompt == "" else backend.encode_text([prompt])
        jobs.append((keep, keep, keep, 0.0))
    return jobs


#: Latent pixels (rows × h × w) sampled in one batch while building the bank: a small model samples many
#: prompts together (ShapesWorld: 64 prompts of 4 trajectories), SD-size models one prompt at a time.
BANK_GROUP_PIXELS = 16384


def _sample_bank(
    backend: DiffusionBackend,
    cfg: ESDConfig,
    jobs: list[_BankJob],
    null: Conditioning,
    gen: torch.Generator,
    on_progress: Callable[[], None] | None,
) -> TrajectoryBank:
    """The frozen model's trajectories for every job's student prompt, targets still zero. Each job's initial
    noise is drawn in job order from ``gen``, so grouping jobs into batches does not change the bank."""
    b = cfg.bank_trajectories
    h, w = latent_hw(backend, cfg.latent_size)
    shape = (b, backend.latent_channels, h, w)
    device = torch.device(backend.device)
    noise = [randn_tensor(shape, generator=gen, device=device, dtype=torch.float32) for _ in jobs]
    per_group = max(1, BANK_GROUP_PIXELS // (b * h * w))
    xs, ts, idx, conds = [], [], [], []
    for g in range(0, len(jobs), per_group):
        group = jobs[g : g + per_group]
        traj, steps = sample_trajectory(
            backend,
            Conditioning.cat([student.expand_to(b) for student, *_ in group]),
            null,
            batch=b * len(group),
            steps=cfg.sampling_steps,
            guidance=cfg.guidance,
            latent_size=cfg.latent_size,
            on_step=on_progress,
            noise=torch.cat(noise[g : g + per_group]),
        )  # traj: [S, B·jobs, C, h, w]; steps: [S] timesteps at which each x_t is evaluated
        for k, (student, *_) in enumerate(group):
            xs.append(traj[:, k * b : (k + 1) * b].flatten(0, 1).cpu())
            ts.append(steps.repeat_interleave(b).cpu())
            idx.append(torch.full((xs[-1].shape[0],), len(conds), dtype=torch.long))
            conds.append(student)
    x_t = torch.cat(xs)
    return TrajectoryBank(
        x_t=x_t, t=torch.cat(ts), concept=torch.cat(idx), target=torch.zeros(x_t.shape), conds=conds
    )


def build_bank(
    backend: DiffusionBackend,
    cfg: ESDConfig,
    *,
    draw_rows: Callable[[int], torch.Tensor] | None = None,
    chunk: int = 32,
    on_progress: Callable[[], None] | None = None,
) -> TrajectoryBank:
    """Sample the frozen model's trajectories for every concept and precompute their targets.

    ``draw_rows(bank_size)``: the entries training will draw (see :func:`row_schedule`); only they get
    targets, the others stay zero. ``None`` = every entry.

    Must be called while every delta is off (inside ``deltas.teacher()``) or before deltas exist.
    ``on_progress`` is called after each DDIM step of the trajectories and each batch of targets; it may raise to
    interrupt (nothing has been attached or written yet).
    """
    gen = make_generator(cfg.seed)
    null = backend.encode_text([""])
    anchor = backend.encode_text([cfg.anchor]) if cfg.anchor else None
    jobs = _bank_jobs(backend, cfg, null, anchor)
    bank = _sample_bank(backend, cfg, jobs, null, gen, on_progress)
    wanted = torch.zeros(len(bank), dtype=torch.bool)
    wanted[torch.arange(len(bank)) if draw_rows is None else draw_rows(len(bank)).flatten()] = True
    for j, (_, base, cond, eta) in enumerate(jobs):
        todo = torch.nonzero(wanted & (bank.concept == j)).flatten()
        for s in range(0, len(todo), chunk):
            r = todo[s : s + chunk]
            x, t = bank.x_t[r].to(backend.device), bank.t[r].to(backend.device)
            bank.target[r] = _targets(backend, x, t, base, cond, null, eta)
            if on_progress:
                on_progress()
    return bank


def row_schedule(bank_size: int, cfg: ESDConfig) -> torch.Tensor:
    """``[iterations, batch_size]`` bank rows drawn uniformly (seeded): which entries each step trains on.

    Drawn before the targets are computed so that only entries that are used get targets: with the
    default settings (200 steps, 400 entries) that is 155 entries, 39 % of the teacher calls."""
    gen = make_generator(cfg.seed + 1)
    return torch.randint(0, bank_size, (cfg.iterations, cfg.batch_size), generator=gen)


def esd_loss(backend: DiffusionBackend, bank: TrajectoryBank, rows: torch.Tensor) -> torch.Tensor:
    """MSE between the student's ε_θ(x_t, c) and the stored targets for bank ``rows``."""
    device = backend.device
    x = bank.x_t[rows].to(device)
    t = bank.t[rows].to(device)
    cond = Conditioning.cat([bank.conds[int(i)] for i in bank.concept[rows]])
    pred = backend.eps(x, t, cond)
    return F.mse_loss(pred.float(), bank.target[rows].to(device))


def _prepare(
    cfg: ESDConfig,
    backend: DiffusionBackend,
    on_step: StepCallback | None,
    on_phase: Callable[[str], None] | None,
) -> tuple[TrajectoryBank, torch.Tensor]:
    """The trajectory bank and the ``[iterations, batch_size]`` rows that training draws from it."""
    if on_phase:
        on_phase("sampling the frozen model's trajectories")
    # step 0 of the progress callback = still preparing (lets hosts check for interrupts)
    tick = (lambda: on_step(0, cfg.iterations, float("nan"))) if on_step else None
    bank = build_bank(backend, cfg, draw_rows=lambda n: row_schedule(n, cfg), on_progress=tick)
    return bank, row_schedule(len(bank), cfg)  # the same seeded draw: the rows that got targets


def train(
    cfg: ESDConfig,
    backend: DiffusionBackend,
    *,
    on_step: StepCallback | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TrainResult:
    """Erase ``cfg.concepts`` from the backend's UNet.

    The backend's weights are never modified: deltas are attached for the run and removed in
    ``finally``. The result's ``tensors`` are LDM-keyed fp32 deltas (``<module>.weight``/``.bias``).

    Raises:
        ConceptGuardError: bad prompts; TrainingDivergedError: NaN/inf loss (nothing returned).
    """
    check_prompt_length(
        backend, [*cfg.concepts, *cfg.erase_from, *cfg.preserve, *([cfg.anchor] if cfg.anchor else [])]
    )
    names = select_for_method(cfg.method, backend.unet_module_names())
    setup_start = time.perf_counter()
    bank, schedule = _prepare(cfg, backend, on_step, on_phase)
    setup_seconds = time.perf_counter() - setup_start
    logger.info(
        "ESD %s on %d modules: bank of %d x_t samples built in %.1fs",
        cfg.method,
        len(names),
        len(bank),
        setup_seconds,
    )
    adversary = build_adversary(backend, cfg, bank, make_generator(cfg.seed + 2)) if cfg.adv_steps else None
    deltas = backend.attach_deltas(names)
    try:

        def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
            loss = esd_loss(backend, bank, schedule[step])
            if adversary is None:
                return loss
            if step % cfg.adv_every == 0:
                adversary.attack(cfg.adv_steps, gen)
            return loss + cfg.adv_weight * adversary.loss(gen, cfg.adv_retain)

        if on_phase:
            on_phase("training")
        result = optimise(
            deltas.parameters(),
            loss_fn,
            iterations=cfg.iterations,
            lr=cfg.lr,
            seed=cfg.seed + 1,
            device=backend.device,
            on_step=on_step,
        )
        result.tensors = deltas.state_dict_ldm()
    finally:
        deltas.detach()
    result.setup_seconds = setup_seconds
    result.metadata = {
        **cfg.to_metadata(),
        **result.provenance(backend),
    }
    return result
