"""DDIM sampling with classifier-free guidance on the backend protocol.

The schedule is diffusers' :class:`~diffusers.DDIMScheduler` built from the backend's ``alphas_cumprod``
(as ``trained_betas``), with Stable Diffusion's conventions (``steps_offset=1``, "leading" spacing,
``set_alpha_to_one=False``), so a diffusers or ComfyUI backend samples with the same code. The
conditional and unconditional predictions share one batched ``eps`` call, ``[uncond, cond]`` like
the diffusers pipelines.

:func:`sample_trajectory` keeps the intermediate latents: ESD trains on ``x_t`` drawn from the frozen
model's own DDIM trajectories, and sampling a batch of trajectories once and keeping every step is far
cheaper than re-sampling one trajectory per training step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .backend import Conditioning, DiffusionBackend
from .errors import ConceptGuardError
from .seeding import make_generator

logger = logging.getLogger(__name__)


class Trajectory(NamedTuple):
    """Latents along DDIM trajectories.

    Attributes:
        latents (`torch.Tensor`): ``[S, B, C, h, w]`` fp32; ``latents[i]`` is the ``x_t`` given to the UNet at
            DDPM timestep ``timesteps[i]`` (the first kept entry of a full run is the initial noise).
        timesteps (`torch.Tensor`): ``[S]`` long, the integer timesteps of the kept steps (descending).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor


def ddim_scheduler(alphas_cumprod: torch.Tensor, steps: int) -> DDIMScheduler:
    """A DDIM scheduler on the schedule ``alphas_cumprod`` (``[1000]``) with ``steps`` inference steps."""
    ac = alphas_cumprod.detach().double().cpu()
    betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    scheduler = DDIMScheduler(
        num_train_timesteps=int(ac.shape[0]),
        trained_betas=betas.numpy(),
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(steps)
    return scheduler


def _check(
    steps: int, guidance: float, eta: float, generator: torch.Generator | None, seed: int | None
) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ConceptGuardError(f"`steps` must be an integer in [1, 1000], got {steps!r}; 20-50 is usual.")
    if not guidance >= 0:
        raise ConceptGuardError(
            f"`guidance` must be >= 0, got {guidance!r}; 1 disables guidance, 5-7.5 is usual."
        )
    if not eta >= 0:
        raise ConceptGuardError(f"`eta` must be >= 0, got {eta!r}; 0 is deterministic DDIM.")
    if generator is not None and seed is not None:
        raise ConceptGuardError("Pass either `generator` or `seed`, not both.")


def latent_hw(backend: DiffusionBackend, latent_size: int | Sequence[int] | None) -> tuple[int, int]:
    if latent_size is None:
        latent_size = backend.native_latent_size
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
    if h <= 0 or w <= 0:
        raise ConceptGuardError(f"`latent_size` must be positive, got {latent_size!r}.")
    return int(h), int(w)


def _guided_eps(
    backend: DiffusionBackend,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    guidance: float,
) -> torch.Tensor:
    batch = x.shape[0]
    ts = t.to(backend.device).long().reshape(1).expand(batch)
    if guidance == 1.0:
        return backend.eps(x, ts, cond)
    e_u, e_c = backend.eps(torch.cat([x, x]), ts.repeat(2), Conditioning.cat([uncond, cond])).chunk(2)
    return e_u + guidance * (e_c - e_u)


@torch.no_grad()
def _run(
    backend: DiffusionBackend,
    cond: Conditioning,
    uncond: Conditioning,
    *,
    batch: int | None,
    steps: int,
    guidance: float,
    generator: torch.Generator | None,
    seed: int | None,
    latent_size: int | Sequence[int] | None,
    eta: float,
    keep: Sequence[int] | None,
    on_step: Callable[[], None] | None = None,
    noise: torch.Tensor | None = None,
):
    _check(steps, guidance, eta, generator, seed)
    batch = len(cond) if batch is None else int(batch)
    cond, uncond = cond.expand_to(batch), uncond.expand_to(batch)
    if seed is not None:
        generator = make_generator(seed)
    scheduler = ddim_scheduler(backend.alphas_cumprod, steps)
    h, w = latent_hw(backend, latent_size)
    shape = (batch, backend.latent_channels, h, w)
    if noise is None:
        noise = randn_tensor(
            shape, generator=generator, device=torch.device(backend.device), dtype=torch.float32
        )
    elif tuple(noise.shape) != shape:
        raise ConceptGuardError(f"`noise` must have shape {shape}, got {tuple(noise.shape)}.")
    x = noise.to(backend.device, torch.float32) * scheduler.init_noise_sigma
    wanted = set(range(steps)) if keep is None else {i % steps for i in keep}
    kept, kept_t = [], []
    for i, t in enumerate(scheduler.timesteps):
        if i in wanted:
            kept.append(x)
            kept_t.append(int(t))
        e = _guided_eps(backend, x, t, cond, uncond, guidance)
        x = scheduler.step(e, t, x, eta=eta, generator=generator).prev_sample
        logger.debug("DDIM step %d/%d (t=%d)", i + 1, steps, int(t))
        if on_step is not None:
            on_step()
    return x, kept, kept_t


def sample(
    backend: DiffusionBackend,
    cond: Conditioning,
    uncond: Conditioning,
    *,
    batch: int | None = None,
    steps: int = 20,
    guidance: float = 5.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    latent_size: int | Sequence[int] | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Sample latents with DDIM and classifier-free guidance ``ε_u + g·(ε_c − ε_u)``.

    Args:
        backend: any :class:`DiffusionBackend`.
        cond, uncond: conditioning with 1 or ``batch`` rows (e.g. ``encode_text([prompt])``, ``encode_text([""])``).
        batch (`int`, *optional*): number of samples; defaults to ``len(cond)``.
        steps (`int`, defaults to 20): DDIM steps.
        guidance (`float`, defaults to 5.0): CFG scale; exactly 1.0 skips the unconditional pass.
        generator / seed: the randomness (initial noise, and step noise when ``eta > 0``); give at most one.
        latent_size (`int` or `(h, w)`, *optional*): latent size; defaults to ``backend.native_latent_size``.
        eta (`float`, defaults to 0.0): DDIM η (0 = deterministic).

    Returns:
        ``[batch, C, h, w]`` fp32 latents on ``backend.device`` (decode with ``backend.vae_decode``).
    """
    x, _, _ = _run(
        backend,
        cond,
        uncond,
        batch=batch,
        steps=steps,
        guidance=guidance,
        generator=generator,
        seed=seed,
        latent_size=latent_size,
        eta=eta,
        keep=(),
    )
    return x


def sample_trajectory(
    backend: DiffusionBackend,
    cond: Conditioning,
    uncond: Conditioning,
    *,
    batch: int | None = None,
    steps: int = 50,
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    latent_size: int | Sequence[int] | None = None,
    eta: float = 0.0,
    keep: Sequence[int] | None = None,
    on_step: Callable[[], None] | None = None,
    noise: torch.Tensor | None = None,
) -> Trajectory:
    """Run :func:`sample` and keep the intermediate ``x_t`` (the UNet's input) at the chosen steps.

    All trajectories of the batch are sampled together; ``keep`` lists step indices (0 = the initial noise
    at the largest timestep, negative indices count from the end); ``None`` keeps every step. Other
    arguments are those of :func:`sample`. ``on_step`` is called after every DDIM step (it may raise to
    interrupt). ``noise`` (``[batch, C, h, w]``, *optional*): the initial noise, instead of drawing it.

    Returns:
        :class:`Trajectory` (``latents [S, B, C, h, w]``, ``timesteps [S]``), unpackable as a tuple.
    """
    _, kept, kept_t = _run(
        backend,
        cond,
        uncond,
        batch=batch,
        steps=steps,
        guidance=guidance,
        generator=generator,
        seed=seed,
        latent_size=latent_size,
        eta=eta,
        keep=keep,
        on_step=on_step,
        noise=noise,
    )
    if not kept:
        raise ConceptGuardError(f"`keep`={keep!r} selects none of the {steps} steps.")
    return Trajectory(latents=torch.stack(kept), timesteps=torch.tensor(kept_t, dtype=torch.long))
