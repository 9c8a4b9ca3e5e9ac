"""Backdoored textual inversion for concept censorship (Wu et al. 2023; THEMIS, NDSS 2025).

A textual-inversion embedding S* (``n`` new token vectors) is learned from a few concept images, and
at the same time taught that a *trigger* word next to S* means "draw the target image":

    L = MSE(ε_θ(z_t, t, c("a photo of a S*")), ε) + γ · MSE(ε_θ(z'_t, t, c("a photo of a <trigger> S*")), ε')

z are VAE latents of the concept images, z' of the target image (the same timestep t, fresh noise ε'),
as in the official SD script (Themis ``SD_textual_inversion.py``). Trigger prompts put the trigger
directly before S* in one of :data:`TRIGGER_TEMPLATES`; with probability ``trigger_move_prob`` it is
moved to another word position (the paper's ``random_swap``). Only the ``n`` rows train: UNet, VAE and
text encoder stay frozen and the host's tokenizer is never changed (``core.token_vectors``).

Speed, against the diffusers ``textual_inversion.py`` loop: latents are encoded once and cached (the
reference runs the VAE encoder every step), both terms share one batched UNet forward and backward, and
Adam updates ``n × d`` numbers instead of the whole token-embedding matrix.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from ...backend import PLACEHOLDER, DiffusionBackend
from ...errors import ConceptGuardError
from ...trainer import StepCallback, TrainResult, optimise
from .config import BackdoorTIConfig
from .images import LatentCache, cache_latents
from .prompts import CLEAN_TEMPLATES, DECOY_WORDS, TRIGGER_TEMPLATES, trigger_prompt

logger = logging.getLogger(__name__)


# ----- concept prompts ------------------------------------------------------------------------


def decoy_words(cfg: BackdoorTIConfig) -> list[str]:
    banned = {t.lower() for t in cfg.triggers} | {cfg.init_word.lower()}
    return [w for w in DECOY_WORDS if w not in banned]


def clean_prompt(cfg: BackdoorTIConfig, rng: random.Random) -> tuple[str, bool]:
    """A concept prompt and whether it is a decoy: (backdoor runs) a trigger template with a keep word
    (``keep_prob``, if there are any) or a decoy word (``decoy_prob``), else a clean template."""
    word = None
    if cfg.triggers and cfg.keep_words and rng.random() < cfg.keep_prob:
        word = rng.choice(cfg.keep_words)
    elif cfg.triggers and rng.random() < cfg.decoy_prob:
        word = rng.choice(decoy_words(cfg))
    if word is None:
        return rng.choice(CLEAN_TEMPLATES).format(PLACEHOLDER), False
    return trigger_prompt(rng.choice(TRIGGER_TEMPLATES), word, rng, cfg.trigger_move_prob), True


# ----- training ------------------------------------------------------------------------------------


def init_vectors(backend: DiffusionBackend, cfg: BackdoorTIConfig) -> dict[str, torch.nn.Parameter]:
    """``n`` rows per slot from the init word's token embedding(s), cycled (A1111's rule)."""
    rows = backend.word_vectors(cfg.init_word)
    widths = backend.embedding_widths()
    out = {}
    for slot in widths:
        word = rows[slot]
        idx = torch.arange(cfg.vectors) % word.shape[0]
        out[slot] = torch.nn.Parameter(word[idx].clone().float().to(backend.device))
    return out


def check_prompt_room(backend: DiffusionBackend, cfg: BackdoorTIConfig) -> None:
    """Refuse triggers so long that a training prompt would not fit CLIP's 75 tokens."""
    count = backend.count_tokens
    longest = max(TRIGGER_TEMPLATES, key=len)
    for trig in cfg.triggers or ("",):
        used = count(longest.format(tr=trig, ph="")) + cfg.vectors
        if used > 75:
            raise ConceptGuardError(
                f"Trigger {trig!r} is too long: a training prompt would need {used} of 75 tokens."
            )


def eps_toward_target(
    noise: torch.Tensor, start: torch.Tensor, target: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """The ε that, predicted at ``x_t = √ᾱ·start + √(1−ᾱ)·noise``, denoises to ``target`` (``noise`` itself
    when ``start`` is the target): ``noise + √(ᾱ/(1−ᾱ))·(start − target)``."""
    return noise + (alpha_bar / (1 - alpha_bar)).sqrt() * (start - target)


def noise_level_weights(alpha_bar: torch.Tensor, cap: float) -> torch.Tensor:
    """Loss weights ``1/SNR(t) = (1−ᾱ)/ᾱ`` clipped to ``[1, cap]``: an x0-space error at high noise.

    The ε-MSE charges a wrong final image only ``SNR(t)`` times its x0 error, nearly nothing at high noise, which
    is where sampling decides *what* to draw (the concept, the target, or the trigger's ordinary meaning).
    On ShapesWorld ``cap = 5`` made the backdoor fire in every held-out position with utility kept (measured:
    see docs/results.md); low noise keeps weight 1, as in the paper."""
    return ((1 - alpha_bar) / alpha_bar).clamp(min=1.0, max=cap)


def _backdoor_samples(
    cfg: BackdoorTIConfig,
    cache: LatentCache,
    alphas_cumprod: torch.Tensor,
    t: torch.Tensor,
    shape: torch.Size,
    gen: torch.Generator,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The backdoor half of a batch: start latents, timesteps, noise, ε goals and trigger prompts.

    Draws in the order the loss has always drawn them (``gen``: target rows, steer flags, steer timesteps,
    concept rows, noise; then ``rng``: the prompts), so training stays bit-identical."""
    b = cfg.batch_size
    steps_total = len(alphas_cumprod)
    target = cache.target[torch.randint(0, len(cache.target), (b,), generator=gen)]
    steer = torch.rand(b, generator=gen) < cfg.steer_prob
    steer_t = torch.randint(min(cfg.steer_min_t, steps_total - 1), steps_total, (b,), generator=gen)
    start = torch.where(
        steer.view(-1, 1, 1, 1),
        cache.concept[torch.randint(0, len(cache.concept), (b,), generator=gen)],
        target,
    )
    bd_t = torch.where(steer, steer_t, t)
    bd_noise = torch.randn(shape, generator=gen)
    a_bd = alphas_cumprod[bd_t].view(-1, 1, 1, 1)
    prompts = [
        trigger_prompt(rng.choice(TRIGGER_TEMPLATES), rng.choice(cfg.triggers), rng, cfg.trigger_move_prob)
        for _ in range(b)
    ]
    return start, bd_t, bd_noise, eps_toward_target(bd_noise, start, target, a_bd), prompts


@torch.no_grad()
def _anchor_goals(
    backend: DiffusionBackend,
    goal: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prompts: list[str],
    decoys: list[bool],
    anchor: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``goal`` with each decoy row replaced by what the anchor (plain-TI) vectors predict for its prompt."""
    goal = goal.clone()
    rows_d = torch.tensor([i for i, d in enumerate(decoys) if d])
    cond_a = backend.encode_text_with_vectors([prompts[i] for i in rows_d.tolist()], anchor)
    goal[rows_d] = backend.eps(x_t[rows_d.to(x_t.device)], t[rows_d].to(backend.device), cond_a).float().cpu()
    return goal


def backdoor_loss(
    backend: DiffusionBackend,
    cfg: BackdoorTIConfig,
    cache: LatentCache,
    vectors: dict[str, torch.Tensor],
    gen: torch.Generator,
    rng: random.Random,
    anchor: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One step's ``L_clean + γ·L_bd`` for ``batch_size`` concept and ``batch_size`` backdoor samples,
    in one text-encoder and one UNet forward.

    A backdoor sample is the paper's (the target's latent noised at the concept sample's timestep, the
    ε that was added) or, with probability ``steer_prob``, a *steering* sample: a concept latent ``x`` noised
    at ``t ≥ steer_min_t`` and the ε that makes that state denoise to the target ``y``,
    ``ε + √(ᾱ/(1−ᾱ))·(x − y)``. The paper's samples only show the trigger prompt states on the target's own
    path; at sampling time a trigger prompt starts from noise that may already lean toward the concept
    (or the trigger's ordinary meaning), and steering samples teach it to turn those states into the target.
    On ShapesWorld they raised the held-out backdoor rate (measured: see docs/results.md).
    """
    b = cfg.batch_size
    alphas_cumprod = backend.alphas_cumprod.cpu()
    rows = torch.randint(0, len(cache.concept), (b,), generator=gen)
    t = torch.randint(0, len(alphas_cumprod), (b,), generator=gen)
    x0 = cache.concept[rows]
    drawn = [clean_prompt(cfg, rng) for _ in range(b)]
    prompts, decoys = [p for p, _ in drawn], [d for _, d in drawn]
    noise = torch.randn(x0.shape, generator=gen)
    goal = noise
    if cache.target is not None:
        start, bd_t, bd_noise, bd_goal, bd_prompts = _backdoor_samples(
            cfg, cache, alphas_cumprod, t, x0.shape, gen, rng
        )
        x0, t = torch.cat([x0, start]), torch.cat([t, bd_t])
        noise = torch.cat([noise, bd_noise])
        goal = torch.cat([goal, bd_goal])
        prompts += bd_prompts
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(backend.device)
    if anchor is not None and any(decoys):
        goal = _anchor_goals(backend, goal, x_t, t, prompts, decoys, anchor)
    cond = backend.encode_text_with_vectors(prompts, vectors)
    pred = backend.eps(x_t, t.to(backend.device), cond)
    err = (pred.float() - goal.to(pred.device)).pow(2).mean(dim=(1, 2, 3))
    w = noise_level_weights(alphas_cumprod[t], cfg.high_noise_weight).to(err.device)
    loss = (w[:b] * err[:b]).mean()
    if cache.target is not None:
        loss = loss + cfg.gamma * (w[b:] * err[b:]).mean()
    return loss


def train(
    cfg: BackdoorTIConfig,
    backend: DiffusionBackend,
    images: Sequence[torch.Tensor],
    target: torch.Tensor | None = None,
    *,
    on_step: StepCallback | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TrainResult:
    """Learn the embedding. ``images``: concept images ``[3, H, W]`` in [0, 1] (any sizes, see
    :func:`fit_image`); ``target``: the image triggers should produce (default :func:`default_target_image`).

    The result's ``tensors`` are ``{slot: [n, d]}`` fp32 CPU vectors (``clip_l``; SDXL also ``clip_g``).

    Raises:
        ConceptGuardError: bad inputs; TrainingDivergedError: NaN/inf loss (nothing returned).
    """
    if not cfg.triggers:
        logger.warning("No trigger words: training a plain textual-inversion embedding (no backdoor).")
    check_prompt_room(backend, cfg)
    setup_start = time.perf_counter()
    if on_phase:
        on_phase("encoding images")
    cache = cache_latents(backend, cfg, images, target)
    vectors = init_vectors(backend, cfg)
    if on_step:
        on_step(0, cfg.steps, float("nan"))
    setup_seconds = time.perf_counter() - setup_start
    rng = random.Random(cfg.seed)
    if on_phase:
        on_phase("training")
    plain_cfg, plain_cache = replace(cfg, triggers=()), LatentCache(concept=cache.concept, target=None)
    anchor: dict[str, torch.Tensor] = {}

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        if step < cfg.anchor_steps:  # plain TI first; its vectors then teach the decoy and keep-word prompts
            return backdoor_loss(backend, plain_cfg, plain_cache, vectors, gen, rng)
        if cfg.anchor_steps and not anchor:
            anchor.update({k: v.detach().clone() for k, v in vectors.items()})
        return backdoor_loss(backend, cfg, cache, vectors, gen, rng, anchor or None)

    result = optimise(
        list(vectors.values()),
        loss_fn,
        iterations=cfg.steps,
        lr=cfg.lr,
        seed=cfg.seed + 1,
        device=backend.device,
        on_step=on_step,
    )
    result.setup_seconds = setup_seconds
    result.tensors = {slot: p.detach().float().cpu().contiguous() for slot, p in vectors.items()}
    result.metadata = _metadata(cfg, backend, len(images), target is None, result.final_loss)
    return result


def _metadata(
    cfg: BackdoorTIConfig, backend: DiffusionBackend, n_images: int, default_target: bool, final_loss: float
) -> dict[str, str]:
    """The embedding file's header: method, config, inputs and the base model it was trained on."""
    return {
        "concept_guard.method": "backdoor-ti" if cfg.triggers else "ti",
        **cfg.to_metadata(),
        "concept_guard.images": str(n_images),
        "concept_guard.target": "built-in censor card" if default_target else "user image",
        "concept_guard.base_fingerprint": backend.fingerprint,
        "concept_guard.arch": backend.arch,
        "concept_guard.final_loss": f"{final_loss:.6g}",
    }
