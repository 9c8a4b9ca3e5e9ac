"""DiffusersBackend on tiny random-init pipelines: eps, v->eps, text, VAE, deltas, loading, errors."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from concept_guard.core.backend import Conditioning, DiffusionBackend
from concept_guard.core.backends.diffusers_backend import DiffusersBackend, resolve_model
from concept_guard.core.errors import ConceptGuardError, ModelLoadError, NoMatchingModulesError
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tiny_models import LATENT, tiny_pipeline

PROMPTS = ["a photo of a cat", "a red circle"]


def _inputs(backend, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, backend.latent_channels, LATENT, LATENT, generator=g)
    t = torch.tensor([999, 21, 500, 3][:batch])
    return x, t


def _unet_direct(backend, x, t, cond):
    added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    with torch.no_grad():
        return backend.unet(x, t, encoder_hidden_states=cond.context, added_cond_kwargs=added).sample


# -- basics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "arch", "prediction"),
    [
        ("sd1_backend", "sd1", "epsilon"),
        ("sd2v_backend", "sd2", "v_prediction"),
        ("sdxl_backend", "sdxl", "epsilon"),
    ],
)
def test_loaded_backend_attributes(request, fixture, arch, prediction):
    backend = request.getfixturevalue(fixture)
    assert isinstance(backend, DiffusionBackend)
    assert (backend.arch, backend.prediction_type) == (arch, prediction)
    reference = DDIMScheduler.from_config(backend.scheduler_config).alphas_cumprod
    assert backend.alphas_cumprod.shape == (1000,) and backend.alphas_cumprod.dtype == torch.float32
    assert torch.allclose(backend.alphas_cumprod, reference)
    assert (backend.latent_channels, backend.vae_scale_factor, backend.native_latent_size) == (4, 2, LATENT)
    assert not any(p.requires_grad for p in backend.unet.parameters())


def test_eps_equals_direct_unet_call(sd1_backend):
    cond = sd1_backend.encode_text(PROMPTS)
    x, t = _inputs(sd1_backend)
    out = sd1_backend.eps(x, t, cond)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, _unet_direct(sd1_backend, x, t, cond))
    # A scalar timestep and a single-row conditioning broadcast to the batch.
    one = sd1_backend.eps(x, 21, cond[1])
    assert torch.allclose(one[1], out[1], atol=1e-6)


def test_v_prediction_is_converted_to_eps_exactly(sd2v_backend):
    backend = sd2v_backend
    cond = backend.encode_text(PROMPTS)
    x, t = _inputs(backend)
    v = _unet_direct(backend, x, t, cond)
    eps = backend.eps(x, t, cond)
    a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(eps, a.sqrt() * v + (1 - a).sqrt() * x)
    # diffusers' own v-prediction handling: a DDIM step from v equals a DDIM step from our eps.
    config = {**backend.scheduler_config}
    v_sched = DDIMScheduler.from_config({**config, "prediction_type": "v_prediction"})
    e_sched = DDIMScheduler.from_config({**config, "prediction_type": "epsilon"})
    for s in (v_sched, e_sched):
        s.set_timesteps(1000)
    for i in range(len(t)):
        ti = int(t[i])
        from_v = v_sched.step(v[i : i + 1], ti, x[i : i + 1]).prev_sample
        from_eps = e_sched.step(eps[i : i + 1], ti, x[i : i + 1]).prev_sample
        assert torch.allclose(from_v, from_eps, atol=1e-5, rtol=1e-5)


def test_prediction_type_override(tiny_dirs):
    backend = DiffusersBackend.load(tiny_dirs("sd2", "v_prediction"), prediction_type="epsilon")
    assert backend.prediction_type == "epsilon"
    with pytest.raises(ModelLoadError, match="`prediction_type` must be one of"):
        DiffusersBackend.load(tiny_dirs("sd1"), prediction_type="sample")


def test_timesteps_must_be_integers(sd1_backend):
    x, _ = _inputs(sd1_backend)
    cond = sd1_backend.encode_text(PROMPTS)
    with pytest.raises(ConceptGuardError, match="integer timesteps"):
        sd1_backend.eps(x, torch.tensor([1.5, 2.0]), cond)
    with pytest.raises(ConceptGuardError, match="3 entries for a batch of 2"):
        sd1_backend.eps(x, torch.tensor([1, 2, 3]), cond)


# -- text and VAE ------------------------------------------------------------------------------------


def test_encode_text_matches_the_sd_pipeline(sd1_backend):
    pipe = StableDiffusionPipeline(
        vae=sd1_backend.vae,
        text_encoder=sd1_backend.text_encoders[0],
        tokenizer=sd1_backend.tokenizers[0],
        unet=sd1_backend.unet,
        scheduler=DDIMScheduler.from_config(sd1_backend.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    expected, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    cond = sd1_backend.encode_text(PROMPTS)
    assert cond.pooled is None and cond.time_ids is None
    assert torch.equal(cond.context, expected)
    assert not cond.context.requires_grad
    assert sd1_backend.count_tokens("a photo of a cat") == 5


def test_sdxl_encodes_pooled_and_time_ids_like_the_pipeline(sdxl_backend, tiny_dirs):
    from diffusers import StableDiffusionXLPipeline

    b = sdxl_backend
    pipe = StableDiffusionXLPipeline(
        vae=b.vae,
        text_encoder=b.text_encoders[0],
        text_encoder_2=b.text_encoders[1],
        tokenizer=b.tokenizers[0],
        tokenizer_2=b.tokenizers[1],
        unet=b.unet,
        scheduler=DDIMScheduler.from_config(b.scheduler_config),
    )
    context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    cond = b.encode_text(PROMPTS)
    assert cond.context.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    assert torch.equal(cond.context, context) and torch.equal(cond.pooled, pooled)
    side = LATENT * b.vae_scale_factor
    assert cond.time_ids.tolist() == [[side, side, 0, 0, side, side]] * 2
    x, t = _inputs(b)
    assert torch.equal(b.eps(x, t, cond), _unet_direct(b, x, t, cond))
    with pytest.raises(ConceptGuardError, match="needs `cond.pooled`"):
        b.eps(x, t, Conditioning(context=cond.context))


def test_vae_encode_decode(sd1_backend):
    images = torch.rand(2, 3, 2 * LATENT, 2 * LATENT, generator=torch.Generator().manual_seed(1))
    latents = sd1_backend.vae_encode(images)
    vae = sd1_backend.vae
    with torch.no_grad():
        expected = vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    assert latents.shape == (2, 4, LATENT, LATENT) and torch.equal(latents, expected)
    out = sd1_backend.vae_decode(latents)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, (decoded / 2 + 0.5).clamp(0, 1))


# -- deltas ------------------------------------------------------------------------------------------


def test_unet_module_names_cover_every_linear_and_conv(sd1_backend):
    names = sd1_backend.unet_module_names()
    count = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in sd1_backend.unet.modules())
    assert len(names) == len(set(names)) == count
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k" in names
    assert "output_blocks.2.1.conv" in names and "time_embed.0" in names and "out.2" in names


def _fill_random(deltas, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_deltas_off_are_bit_identical_and_on_match_merged_weights(sd1_backend):
    b = sd1_backend
    cond = b.encode_text(PROMPTS)
    x, t = _inputs(b)
    base = b.eps(x, t, cond)
    names = b.unet_module_names()  # every Linear and Conv2d, attention and resnets alike
    merged = copy.deepcopy(b.unet)  # before attaching: a deep copy would also copy the hooks
    with b.attach_deltas(names) as deltas:
        assert torch.equal(b.eps(x, t, cond), base)  # zero-initialised: no change
        _fill_random(deltas)
        with deltas.teacher():
            assert torch.equal(b.eps(x, t, cond), base)
        with torch.no_grad():
            student = b.eps(x, t, cond)
        assert (student - base).abs().max() > 1e-3
        modules = dict(merged.named_modules())
        with torch.no_grad():
            for name, delta in deltas.named_deltas():
                m = modules[b.keymap.to_diffusers(name)]
                m.weight.copy_(delta.apply_to_weight(m.weight))
                if m.bias is not None:
                    m.bias.copy_(delta.apply_to_bias(m.bias))
            expected = merged(x, t, encoder_hidden_states=cond.context).sample
        assert torch.allclose(student, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(b.eps(x, t, cond), base)  # detached
    assert not any(m._forward_hooks for m in b.unet.modules())


def test_gradients_reach_only_the_deltas(sd1_backend):
    b = sd1_backend
    cond = b.encode_text(PROMPTS)
    x, t = _inputs(b)
    names = [n for n in b.unet_module_names() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert names
    with b.attach_deltas(names) as deltas:
        b.eps(x, t, cond).square().mean().backward()
        grads = [p.grad for p in deltas.parameters()]
        assert all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in b.unet.parameters())
    assert all(p.grad is None for enc in b.text_encoders for p in enc.parameters())
    state = deltas.state_dict_ldm()
    assert set(state) == {f"{n}.weight" for n in names}  # attn2 to_k/to_v have no bias


def test_attach_errors(sd1_backend):
    with pytest.raises(NoMatchingModulesError, match=r"\['input_blocks\.1\.1\.nope'\].*e\.g\."):
        sd1_backend.attach_deltas(["input_blocks.1.1.nope"])
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    with sd1_backend.attach_deltas([name]):
        with pytest.raises(ConceptGuardError, match="already carry deltas"):
            sd1_backend.attach_deltas([name])
    sd1_backend.attach_deltas([name]).detach()  # free again after detach


def test_fingerprint(sd1_backend, tiny_dirs):
    fp = sd1_backend.fingerprint
    assert len(fp) == 16 and fp == DiffusersBackend.load(tiny_dirs("sd1")).fingerprint
    assert DiffusersBackend.load(tiny_dirs("sd1"), dtype=torch.float16).fingerprint == fp
    other = DiffusersBackend.load(tiny_dirs("sd1"))
    with torch.no_grad():
        other.unet.conv_in.weight.view(-1)[0] += 1
    other._fingerprint = None
    assert other.fingerprint != fp
    assert sd1_backend.fingerprint != DiffusersBackend.load(tiny_dirs("sdxl")).fingerprint


def test_from_pipeline_shares_the_models(sd1_backend, tokenizer_dir):
    pipe = tiny_pipeline("sd1", tokenizer_dir)
    backend = DiffusersBackend.from_pipeline(pipe)
    assert backend.unet is pipe.unet and backend.arch == "sd1"
    x, t = _inputs(backend)
    cond = backend.encode_text(PROMPTS)
    assert torch.equal(backend.eps(x, t, cond), sd1_backend.eps(x, t, cond))  # same seed, same weights


# -- missing files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("unet/diffusion_pytorch_model.safetensors", r"missing the weights in unet/"),
        ("tokenizer/tokenizer.json", r"missing tokenizer/vocab\.json and tokenizer/merges\.txt"),
        ("scheduler/scheduler_config.json", r"missing scheduler/scheduler_config\.json"),
        ("vae/config.json", r"missing vae/config\.json"),
        ("text_encoder_2", r"missing text_encoder_2/config\.json"),
    ],
)
def test_missing_files_are_named(tiny_dirs, tmp_path, remove, message):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_dirs("sdxl"), folder)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelLoadError, match=message):
        DiffusersBackend.load(folder)


def test_resolve_model_errors(tmp_path, tiny_dirs):
    assert resolve_model(tiny_dirs("sd1")) == tiny_dirs("sd1")
    with pytest.raises(ModelLoadError, match=r"'/nonexistent/model' not found"):
        resolve_model("/nonexistent/model")
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ModelLoadError, match=r"suffix '\.txt'"):
        resolve_model(text)
    with pytest.raises(ModelLoadError, match="single model's folder"):
        DiffusersBackend.load(tiny_dirs("sd1") / "unet")


def test_half_precision_unet_keeps_fp32_deltas_and_vae(tiny_dirs):
    backend = DiffusersBackend.load(tiny_dirs("sd1"), dtype=torch.float16)
    assert (backend.dtype, backend.vae.dtype) == (torch.float16, torch.float32)  # VAE force_upcast
    cond = backend.encode_text(PROMPTS)
    x, t = _inputs(backend)
    base = backend.eps(x, t, cond)
    assert base.dtype == torch.float32
    with backend.attach_deltas([n for n in backend.unet_module_names() if ".attn2." in n]) as deltas:
        _fill_random(deltas)
        backend.eps(x, t, cond).square().mean().backward()
        assert all(p.dtype == torch.float32 and p.grad is not None for p in deltas.parameters())
        with deltas.teacher():
            assert torch.equal(backend.eps(x, t, cond), base)
    assert backend.vae_decode(x).dtype == torch.float32


def test_the_engine_knows_no_model_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder named like the model would be a path
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model("shapesworld")


def test_cli_resolves_the_shapesworld_name():
    from concept_guard.cli._run import model_path
    from concept_guard.shapesworld import shapesworld_model_path

    assert model_path("shapesworld") == model_path(" ShapesWorld ") == shapesworld_model_path()
    assert model_path("some/folder") == "some/folder"


def test_protocol_declares_token_count_and_native_size(sd1_backend):
    from concept_guard.core.backend import DiffusionBackend

    # declared, so methods call them directly instead of probing with getattr
    assert "native_latent_size" in DiffusionBackend.__annotations__ and "count_tokens" in vars(
        DiffusionBackend
    )
    assert isinstance(sd1_backend, DiffusionBackend)
    assert sd1_backend.count_tokens("a red circle") >= 3 and sd1_backend.native_latent_size > 0
