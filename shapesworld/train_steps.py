"""The stages that ``train.py`` strings together: the training config, the VAE with its judge gate, the text
conditioning, and the sampler and judge score that training evaluates its EMA weights with."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import ConceptGuardError, TrainingDivergedError
from . import model as sw_model
from . import world
from .judge import Judge

logger = logging.getLogger(__name__)

EVAL_PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a purple heart",
    "a crimson disc",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines the trained model (saved next to it)."""

    seed: int = 0
    data_size: int = 40000
    target_share: float = 0.03
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_gate: float = 0.97
    unet_steps: int = 6000
    batch: int = 64
    lr: float = 7e-4
    warmup: int = 200
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    eval_every: int = 500
    eval_samples: int = 16

    def __post_init__(self) -> None:
        for name in ("data_size", "vae_steps", "unet_steps", "batch", "eval_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConceptGuardError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        for name in ("target_share", "caption_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConceptGuardError(f"`{name}` must be in [0, 1), got {getattr(self, name)}.")


def _train_vae_steps(vae, opt, images: torch.Tensor, steps: int, g: torch.Generator, batch: int) -> float:
    vae.train()
    loss_val = float("nan")
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = loss.item()
        if step % 100 == 0:
            logger.info("vae step %d/%d loss %.4f", step, steps, loss_val)
    vae.eval()
    return loss_val


@torch.no_grad()
def vae_gate_scores(vae, judge: Judge, n: int = 1000, seed: int = 777) -> dict[str, float]:
    """Judge accuracy on VAE reconstructions of fresh renders (the UNet-training gate)."""
    from .judge import accuracy, labelled_set

    images, labels = labelled_set(n, seed, target_share=0.1)
    rec = torch.cat([vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample for x in images.split(250)])
    return accuracy(judge, ((rec + 1) / 2).clamp(0, 1), labels)


def train_vae(cfg: TrainConfig, images: torch.Tensor, judge: Judge):
    """Train the VAE until the judge gate passes (up to 3 extensions of half the steps)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    vae = sw_model.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start, steps, done = time.monotonic(), cfg.vae_steps, 0
    for attempt in range(4):
        loss = _train_vae_steps(vae, opt, images, steps, g, cfg.vae_batch)
        done += steps
        scores = vae_gate_scores(vae, judge)
        logger.info(
            "VAE %d steps loss %.4f gate %s (%.0f s)",
            done,
            loss,
            json.dumps(scores),
            time.monotonic() - start,
        )
        if min(scores.values()) >= cfg.vae_gate:
            return vae, scores, done
        steps = cfg.vae_steps // 2
        for group in opt.param_groups:
            group["lr"] *= 0.5
        logger.info("VAE gate not met (attempt %d); training %d more steps", attempt + 1, steps)
    raise TrainingDivergedError(
        f"VAE reconstructions stay below the judge gate {cfg.vae_gate}: {scores}. "
        "Train longer (`--vae-steps`) or widen the VAE."
    )


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Posterior modes and the scaling factor that makes them ~unit variance."""
    modes = torch.cat([vae.encode(x * 2 - 1).latent_dist.mode() for x in images.split(500)])
    scale = float(1.0 / modes.std())
    vae.register_to_config(scaling_factor=scale)
    return modes * scale, scale


def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states of ``prompts``, padded to the tokenizer's full length."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def sample(
    parts: dict, prompts: list[str], *, seed: int, steps: int = 20, guidance: float = 5.0
) -> torch.Tensor:
    """DDIM + CFG samples ``[len(prompts), 3, 32, 32]`` in [0, 1] from the raw parts (for training evals)."""
    unet, te, tok, vae = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["vae"]
    sched = sw_model.make_scheduler()
    sched.set_timesteps(steps)
    cond = encode_prompts(te, tok, list(prompts))
    uncond = encode_prompts(te, tok, [""]).expand_as(cond)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 4, 8, 8, generator=g)
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
        e_u, e_c = eps.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return ((vae.decode(x / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)


def quick_eval(
    parts: dict, judge: Judge, prompts=EVAL_PROMPTS, n: int = 16, seed: int = 1
) -> dict[str, float]:
    """Fraction of samples whose judged shape/colour match each prompt's (averaged)."""
    rates = {"shape": [], "colour": []}
    for p in prompts:
        want = world.parse_prompt(p)
        got = judge.classify(sample(parts, [p] * n, seed=seed))
        for h in rates:
            rates[h].append(float(np.mean([lab == want[h] for lab in got[h]])))
    return {h: round(float(np.mean(v)), 3) for h, v in rates.items()}
