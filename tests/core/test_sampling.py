"""DDIM + classifier-free guidance sampler on the backend protocol."""

from __future__ import annotations

import pytest
import torch
from concept_guard.core.errors import ConceptGuardError
from concept_guard.core.sampling import ddim_scheduler, sample, sample_trajectory
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tiny_models import LATENT


@pytest.fixture(scope="module")
def conds(sd1_backend):
    return sd1_backend.encode_text(["a photo of a cat"]), sd1_backend.encode_text([""])


def test_scheduler_matches_the_pipelines_schedule(sd1_backend):
    ours = ddim_scheduler(sd1_backend.alphas_cumprod, 20)
    theirs = DDIMScheduler.from_config(sd1_backend.scheduler_config)
    theirs.set_timesteps(20)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.timesteps[0] == 951 and ours.timesteps[-1] == 1  # SD's "leading" spacing, offset 1
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-6, atol=1e-7)


def test_deterministic_under_a_seed(sd1_backend, conds):
    cond, uncond = conds
    a = sample(sd1_backend, cond, uncond, batch=2, steps=5, seed=3)
    b = sample(sd1_backend, cond, uncond, batch=2, steps=5, generator=torch.Generator().manual_seed(3))
    c = sample(sd1_backend, cond, uncond, batch=2, steps=5, seed=4)
    assert a.shape == (2, 4, LATENT, LATENT) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # each sample has its own noise


def test_matches_the_diffusers_pipeline(sd1_backend, conds):
    b = sd1_backend
    cond, uncond = conds
    pipe = StableDiffusionPipeline(
        vae=b.vae,
        text_encoder=b.text_encoders[0],
        tokenizer=b.tokenizers[0],
        unet=b.unet,
        scheduler=DDIMScheduler.from_config(b.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    side = LATENT * b.vae_scale_factor
    for eta in (0.0, 0.7):
        expected = pipe(
            "a photo of a cat",
            negative_prompt="",
            num_inference_steps=6,
            guidance_scale=4.0,
            eta=eta,
            generator=torch.Generator().manual_seed(11),
            height=side,
            width=side,
            output_type="latent",
        ).images
        ours = sample(b, cond, uncond, steps=6, guidance=4.0, eta=eta, seed=11)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-4), (eta, (ours - expected).abs().max())


def test_guidance_one_skips_the_unconditional_pass(sd1_backend, conds):
    cond, uncond = conds
    calls = []
    original = sd1_backend.eps

    def counting(x, t, c):
        calls.append(x.shape[0])
        return original(x, t, c)

    sd1_backend.eps = counting
    try:
        sample(sd1_backend, cond, uncond, batch=3, steps=2, guidance=1.0, seed=0)
        sample(sd1_backend, cond, uncond, batch=3, steps=2, guidance=2.0, seed=0)
    finally:
        del sd1_backend.eps
    assert calls == [3, 3, 6, 6]  # cond+uncond in one batched call when guided


def test_trajectory_keeps_every_x_t_with_its_timestep(sd1_backend, conds):
    b = sd1_backend
    cond, uncond = conds
    traj, timesteps = sample_trajectory(b, cond, uncond, batch=2, steps=4, guidance=3.0, seed=5)
    assert traj.shape == (4, 2, 4, LATENT, LATENT)
    assert timesteps.tolist() == [751, 501, 251, 1] and timesteps.dtype == torch.long
    noise = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(5))
    assert torch.equal(traj[0], noise)  # the first x_t is the initial noise
    # Each kept x_t is one guided DDIM step from the previous one, and the last step gives sample().
    scheduler = ddim_scheduler(b.alphas_cumprod, 4)
    with torch.no_grad():
        for i in range(3):
            t = timesteps[i].repeat(2)
            e_u, e_c = b.eps(
                traj[i].repeat(2, 1, 1, 1), t.repeat(2), type(cond).cat([uncond.repeat(2), cond.repeat(2)])
            ).chunk(2)
            step = scheduler.step(e_u + 3.0 * (e_c - e_u), timesteps[i], traj[i]).prev_sample
            assert torch.allclose(step, traj[i + 1], atol=1e-6)
    final = sample(b, cond, uncond, batch=2, steps=4, guidance=3.0, seed=5)
    picked = sample_trajectory(b, cond, uncond, batch=2, steps=4, guidance=3.0, seed=5, keep=[1, -1])
    assert picked.timesteps.tolist() == [501, 1]
    assert torch.equal(picked.latents, traj[[1, 3]])
    assert not torch.allclose(final, traj[-1])


def test_sdxl_sampling_runs(sdxl_backend):
    cond, uncond = sdxl_backend.encode_text(["a red circle"]), sdxl_backend.encode_text([""])
    out = sample(sdxl_backend, cond, uncond, batch=2, steps=3, seed=0, latent_size=(LATENT, 2 * LATENT))
    assert out.shape == (2, 4, LATENT, 2 * LATENT) and torch.isfinite(out).all()


def test_argument_errors(sd1_backend, conds):
    cond, uncond = conds
    with pytest.raises(ConceptGuardError, match=r"`steps` must be an integer in \[1, 1000\], got 0"):
        sample(sd1_backend, cond, uncond, steps=0)
    with pytest.raises(ConceptGuardError, match="either `generator` or `seed`"):
        sample(sd1_backend, cond, uncond, seed=1, generator=torch.Generator())
    with pytest.raises(ConceptGuardError, match="`guidance` must be >= 0"):
        sample(sd1_backend, cond, uncond, guidance=float("nan"))
    with pytest.raises(ValueError, match="expected 1 or 3"):
        sample(sd1_backend, cond.repeat(2), uncond, batch=3, steps=1)
    with pytest.raises(ConceptGuardError, match="selects none"):
        sample_trajectory(sd1_backend, cond, uncond, steps=2, keep=[])
