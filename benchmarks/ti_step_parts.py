"""Milliseconds per part of a backdoor-TI step, for ``benchmarks/ti_speed.py --split``."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch
from concept_guard.core.backend import PLACEHOLDER, Conditioning
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.methods.ti_backdoor.images import cache_latents
from concept_guard.core.methods.ti_backdoor.train import (
    BackdoorTIConfig,
    backdoor_loss,
    init_vectors,
)
from concept_guard.core.trainer import autocast_for


def _ms(fn: Callable[[], None], device: torch.device, calls: int = 20, budget_s: float = 3.0) -> float:
    """Mean over up to ``calls`` calls after one warm-up call, stopping once ``budget_s`` has passed."""
    fn()
    done, start = 0, time.perf_counter()
    while done < calls and (done == 0 or time.perf_counter() - start < budget_s):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        done += 1
    return round((time.perf_counter() - start) / done * 1000, 2)


def _reference_only_parts(
    backend: DiffusersBackend, cfg: BackdoorTIConfig, size: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """What only the reference does: a VAE encode of one batch of pixels, and AdamW over the whole token
    table followed by restoring every row but the new ones."""
    device, b = backend.device, cfg.batch_size
    pixels = torch.rand(b, 3, size, size, device=device)
    table = torch.nn.Parameter(
        backend.text_encoders[0].get_input_embeddings().weight.detach().clone().float()
    )
    adamw = torch.optim.AdamW([table], lr=cfg.lr, weight_decay=1e-2)
    keep = torch.ones(len(table), dtype=torch.bool, device=device)
    keep[-cfg.vectors :] = False
    original = table.detach().clone()

    def vae() -> None:
        with torch.no_grad():
            backend.vae.encode(pixels.to(backend.vae.dtype) * 2 - 1).latent_dist.sample()

    def optimiser() -> None:
        table.grad = torch.zeros_like(table)
        adamw.step()
        adamw.zero_grad()
        with torch.no_grad():
            table[keep] = original[keep]

    return vae, optimiser


def step_parts(
    backend: DiffusersBackend, cfg: BackdoorTIConfig, concept: list[torch.Tensor], size: int
) -> dict:
    """Milliseconds per call of each part of a step (``--split``): the work both loops do for the 2 × batch rows
    (text encoder and UNet forward + backward to the vectors, in our precision: bf16 autocast on CUDA), what only
    the reference does (VAE encode of one batch, twice a step; AdamW over the whole token table plus restoring
    its rows), and our whole step."""
    device, b = backend.device, cfg.batch_size
    cache = cache_latents(backend, cfg, concept, None)
    vectors = init_vectors(backend, cfg)
    prompts = [f"a photo of a {cfg.triggers[0]} {PLACEHOLDER}"] * (2 * b)
    x_t = cache.concept[torch.arange(2 * b) % len(cache.concept)].to(device)
    t = torch.linspace(0, len(backend.alphas_cumprod) - 1, 2 * b).long().to(device)
    with torch.no_grad():
        context = backend.encode_text_with_vectors(prompts, vectors).context
    context.requires_grad_(True)
    vae, optimiser = _reference_only_parts(backend, cfg, size)
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    ours_opt = torch.optim.Adam(list(vectors.values()), lr=cfg.lr)

    def text() -> None:
        with autocast_for(device):
            out = backend.encode_text_with_vectors(prompts, vectors).context
        out.float().square().mean().backward()

    def unet() -> None:
        with autocast_for(device):
            out = backend.eps(x_t, t, Conditioning(context=context))
        out.float().square().mean().backward()

    def ours() -> None:
        ours_opt.zero_grad(set_to_none=True)
        with autocast_for(device):
            loss = backdoor_loss(backend, cfg, cache, vectors, gen, rng)
        loss.backward()
        ours_opt.step()

    return {
        "text_encoder_fwd_bwd_ms": _ms(text, device),
        "unet_fwd_bwd_ms": _ms(unet, device),
        "vae_encode_batch_ms": _ms(vae, device),
        "adamw_table_restore_ms": _ms(optimiser, device),
        "ours_step_ms": _ms(ours, device),
    }
