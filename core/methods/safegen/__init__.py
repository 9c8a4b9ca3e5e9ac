"""SafeGen (Li et al., ACM CCS 2024): vision-only erasure in the UNet's self-attention.

ESD edits what a prompt asks for; SafeGen edits what an image becomes. Only the self-attention projections
(``attn1`` ``to_q/to_k/to_v/to_out.0``) train, always with the empty prompt, so the edit does not depend on
any wording: whenever the denoiser starts to form the sensitive pattern it steers towards its mosaic.

    L = w_m · MSE(ε_θ(x_t^s, t, ""), target_m) + w_p · MSE(ε_θ(x_t^b, t_b, ""), target_p)

x_t^s noises a sensitive latent z_s with ε; the mosaic target is the official code's ``z_s − z_mos + ε``
("paper") or the ε that denoises x_t^s to the mosaic's latent exactly, ``ε + √ᾱ_t/√(1−ᾱ_t)·(z_s − z_mos)``
("exact"). x_t^b noises a benign latent; its target is the frozen model's ε*(x_t^b, t_b, "") ("teacher",
the same UNet with every delta off) or the noise itself (official). Unlike the official script: the mosaic
term never falls back to teaching the concept, there is no unused third forward, and batches of any size
share one student forward (sensitive and benign rows together). Latents are encoded once, up front.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...backend import DiffusionBackend
from ...targets import TargetSpec
from ...trainer import StepCallback, TrainResult, optimise
from .config import MOSAIC_TARGETS, PRESERVE_TARGETS, SafeGenConfig
from .data import ImageBatch, Triplets, build_triplets, prepare_images
from .mosaic import pixelate

__all__ = [
    "MOSAIC_TARGETS",
    "PRESERVE_TARGETS",
    "SAFEGEN_MODULES",
    "SafeGenConfig",
    "Triplets",
    "build_triplets",
    "pixelate",
    "prepare_images",
    "train",
]

logger = logging.getLogger(__name__)

#: The weights SafeGen trains: every self-attention projection, weights and biases.
SAFEGEN_MODULES = TargetSpec(include=("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"))


def mosaic_target(
    cfg: SafeGenConfig, z_s: torch.Tensor, z_m: torch.Tensor, noise: torch.Tensor, ac: torch.Tensor
) -> torch.Tensor:
    """The ε the student should predict on x_t^s (``ac``: ᾱ_t per row)."""
    if cfg.target == "paper":
        return z_s - z_m + noise
    ratio = (ac / (1 - ac)).sqrt().view(-1, 1, 1, 1)
    return noise + ratio * (z_s - z_m)


def snr_weights(cfg: SafeGenConfig, ac: torch.Tensor) -> torch.Tensor:
    """Per-row weights of the mosaic term: ``min(SNR, γ)/SNR`` with SNR = ᾱ/(1−ᾱ), or ones when γ is 0."""
    if cfg.snr_gamma <= 0:
        return torch.ones_like(ac)
    snr = ac / (1 - ac)
    return snr.clamp(max=cfg.snr_gamma) / snr


def _draw(n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (batch,), generator=gen)


def safegen_loss(
    backend: DiffusionBackend, cfg: SafeGenConfig, data: Triplets, null, deltas, gen: torch.Generator
) -> torch.Tensor:
    """One step's loss: a batch of sensitive rows and a batch of benign rows through one student forward."""
    device, b = backend.device, cfg.batch_size
    ac_all = backend.alphas_cumprod.float().cpu()
    rows_s, rows_b = _draw(len(data.sensitive), b, gen), _draw(len(data.benign), b, gen)
    t = torch.randint(0, cfg.max_timestep, (2 * b,), generator=gen)
    noise = torch.randn((2 * b, *data.sensitive.shape[1:]), generator=gen)
    ac = ac_all[t].view(-1, 1, 1, 1)
    z = torch.cat([data.sensitive[rows_s], data.benign[rows_b]])
    x_t = ac.sqrt() * z + (1 - ac).sqrt() * noise
    target_m = mosaic_target(cfg, data.sensitive[rows_s], data.mosaic[rows_s], noise[:b], ac_all[t[:b]])
    x_t, t_dev = x_t.to(device), t.to(device)
    if cfg.preserve_target == "teacher":
        with deltas.teacher():
            target_p = backend.eps(x_t[b:], t_dev[b:], null.expand_to(b)).float()
    else:
        target_p = noise[b:].to(device)
    pred = backend.eps(x_t, t_dev, null.expand_to(2 * b)).float()
    rows_m = (pred[:b] - target_m.to(device)).pow(2).mean(dim=(1, 2, 3))
    loss_m = (rows_m * snr_weights(cfg, ac_all[t[:b]]).to(device)).mean()
    loss_p = F.mse_loss(pred[b:], target_p)
    return cfg.weight_mosaic * loss_m + cfg.weight_preserve * loss_p


def train(
    cfg: SafeGenConfig,
    backend: DiffusionBackend,
    images: ImageBatch,
    *,
    benign_images: ImageBatch | None = None,
    mask: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TrainResult:
    """Teach the backend's UNet to turn ``images``' visual concept into its mosaic, keeping benign images.

    The backend's weights are never modified: deltas are attached for the run and removed in ``finally``.
    The result's ``tensors`` are LDM-keyed fp32 ``attn1`` deltas.

    Raises:
        ConceptGuardError: no images, a bad image or mask; NoMatchingModulesError: a UNet without ``attn1``;
        TrainingDivergedError: NaN/inf loss (nothing returned).
    """
    names = SAFEGEN_MODULES.select(backend.unet_module_names())
    if on_phase:
        on_phase("encoding images" + ("" if benign_images is not None else " and sampling benign images"))
    tick = (lambda: on_step(0, cfg.steps, float("nan"))) if on_step else (lambda: None)
    setup_start = time.perf_counter()
    data = build_triplets(backend, cfg, images, benign_images=benign_images, mask=mask, tick=tick)
    null = backend.encode_text([""])
    setup_seconds = time.perf_counter() - setup_start
    logger.info(
        "SafeGen on %d modules: %d sensitive, %d benign latents in %.1fs",
        len(names),
        len(data.sensitive),
        len(data.benign),
        setup_seconds,
    )
    deltas = backend.attach_deltas(names)
    try:
        if on_phase:
            on_phase("training")
        result = optimise(
            deltas.parameters(),
            lambda step, gen: safegen_loss(backend, cfg, data, null, deltas, gen),
            iterations=cfg.steps,
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
        "concept_guard.method": "safegen",
        "concept_guard.images": str(len(data.sensitive)),
        **result.provenance(backend),
    }
    return result
