"""ComfyBackend on ComfyUI's own tiny MODEL / CLIP / VAE objects (in-process, CPU)."""

from __future__ import annotations

import hashlib

import comfy.model_management
import pytest
import torch
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.comfy_backend.patches import make_patched_model
from concept_guard.core.backend import Conditioning, DiffusionBackend
from concept_guard.core.errors import ArchitectureMismatchError, ModelLoadError, NoMatchingModulesError
from concept_guard.core.trainer import optimise
from diffusers import DDPMScheduler

ATTN2 = ".attn2."


def _x_t(batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _weights_sha(model) -> str:
    """sha256 over every byte of the MODEL's UNet state (name, dtype, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _attn2_names(backend: ComfyBackend) -> list[str]:
    return [n for n in backend.unet_module_names() if ATTN2 in n]


def _fill_deltas(deltas, seed: int = 7, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def test_backend_satisfies_protocol_and_describes_sd1(tiny_model, tiny_clip, tiny_vae):
    backend = ComfyBackend(tiny_model, tiny_clip, tiny_vae)
    assert isinstance(backend, DiffusionBackend)
    assert (backend.arch, backend.prediction_type) == ("sd1", "epsilon")
    assert backend.latent_channels == 4 and backend.vae_scale_factor == 8
    assert len(backend.fingerprint) == 16 and backend.fingerprint == ComfyBackend(tiny_model).fingerprint
    names = backend.unet_module_names()
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k" in names
    assert "input_blocks.0.0" in names and "out.2" in names  # conv_in / conv_out convs too


def test_sdxl_eps_uses_pooled_text_and_size_conditioning():
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
    from comfy_harness import SDXL_CLIP_G, SDXL_CLIP_L, build_tiny_sdxl

    model, clip = build_tiny_sdxl()
    backend = ComfyBackend(model, clip)
    assert (backend.arch, backend.prediction_type) == ("sdxl", "epsilon")
    cond = backend.encode_text(["a red circle"]).expand_to(2)
    assert cond.context.shape == (2, 77, SDXL_CLIP_L + SDXL_CLIP_G) and cond.pooled.shape == (2, SDXL_CLIP_G)
    x, t = _x_t(), torch.tensor([30, 800])

    def direct(sizes: list[float]) -> torch.Tensor:  # y = [pooled, 256-d sinusoidal embedding of each size]
        emb = timestep_embedding(torch.tensor(sizes), 256).flatten()
        y = torch.cat([cond.pooled, emb.expand(2, -1)], dim=1)
        with torch.no_grad():
            return model.model.diffusion_model(x, t.float(), context=cond.context, y=y)

    # Without time ids, sizes default to the latent's pixel size (64 px), as in ComfyUI's samplers.
    torch.testing.assert_close(backend.eps(x, t, cond), direct([64, 64, 0, 0, 64, 64]), rtol=0, atol=1e-5)
    ids = torch.tensor([[1024.0, 768, 16, 8, 1024, 1024]]).expand(2, -1)
    with_ids = Conditioning(context=cond.context, pooled=cond.pooled, time_ids=ids)
    torch.testing.assert_close(
        backend.eps(x, t, with_ids), direct([1024, 768, 16, 8, 1024, 1024]), rtol=0, atol=1e-5
    )


def test_alphas_cumprod_is_diffusers_scaled_linear_schedule(tiny_model):
    expected = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    got = ComfyBackend(tiny_model).alphas_cumprod
    assert got.shape == (1000,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_eps_equals_direct_unet_call(tiny_model, tiny_clip):
    backend = ComfyBackend(tiny_model, tiny_clip)
    cond = backend.encode_text(["a red circle", ""])
    x, t = _x_t(), torch.tensor([3, 870])
    eps = backend.eps(x, t, cond)
    with torch.no_grad():
        direct = tiny_model.model.diffusion_model(x, t.float(), context=cond.context)
    assert eps.dtype == torch.float32 and eps.shape == x.shape
    assert direct.abs().mean() > 1e-3  # a real signal, not zeros
    torch.testing.assert_close(eps, direct, rtol=0, atol=1e-5)


def test_vprediction_eps_is_consistent_with_the_v_output(tiny_vpred_model, tiny_clip):
    backend = ComfyBackend(tiny_vpred_model, tiny_clip)
    assert (backend.arch, backend.prediction_type) == ("sd2", "v_prediction")
    cond = backend.encode_text(["a blue square"]).expand_to(3)
    x, t = _x_t(3), torch.tensor([0, 400, 999])
    with torch.no_grad():
        v = tiny_vpred_model.model.diffusion_model(x, t.float(), context=cond.context)
    acp = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = acp.sqrt() * v + (1 - acp).sqrt() * x  # eps from v: sqrt(a)·v + sqrt(1-a)·x_t
    torch.testing.assert_close(backend.eps(x, t, cond), expected, rtol=0, atol=2e-5)


def test_model_sampling_object_patch_is_respected(tiny_model, tiny_clip):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    (as_v,) = ModelSamplingDiscrete().patch(tiny_model, "v_prediction", False)
    assert ComfyBackend(as_v).prediction_type == "v_prediction"
    assert ComfyBackend(tiny_model).prediction_type == "epsilon"  # the input MODEL is unchanged
    (lcm,) = ModelSamplingDiscrete().patch(tiny_model, "lcm", False)
    with pytest.raises(ModelLoadError, match="1000-step"):
        ComfyBackend(lcm)


def test_deltas_switched_off_are_bit_identical(tiny_model, tiny_clip):
    backend = ComfyBackend(tiny_model, tiny_clip)
    cond = backend.encode_text(["a green triangle"]).expand_to(2)
    x, t = _x_t(), torch.tensor([50, 500])
    before = backend.eps(x, t, cond)
    deltas = backend.attach_deltas(_attn2_names(backend))
    assert torch.equal(backend.eps(x, t, cond), before)  # zero-initialised deltas change nothing
    _fill_deltas(deltas, scale=1.0)
    with deltas.teacher():
        teacher = backend.eps(x, t, cond)
    student = backend.eps(x, t, cond)
    assert torch.equal(teacher, before)
    assert (student - before).abs().max() > 1e-3  # the deltas do reach the forward pass
    deltas.detach()
    assert torch.equal(backend.eps(x, t, cond), before)


@pytest.mark.parametrize("inference_weights", [True, False], ids=["loader-built", "trainable-built"])
def test_gradients_reach_only_the_deltas(inference_weights, tiny_clip):
    from comfy_harness import build_tiny_model

    model = build_tiny_model("eps", inference=inference_weights)
    flags = [p.requires_grad for p in model.model.parameters()]
    assert all(flags)  # comfy ops create parameters with requires_grad=True
    backend = ComfyBackend(model, tiny_clip)
    cond = backend.encode_text(["a circle"]).expand_to(2)
    with torch.inference_mode(), backend.training():
        deltas = backend.attach_deltas(_attn2_names(backend))
        _fill_deltas(deltas, scale=0.01)
        backend.eps(_x_t(), torch.tensor([10, 900]), cond).pow(2).mean().backward()
        base_grads = [n for n, p in model.model.named_parameters() if p.grad is not None]
        clip_grads = [n for n, p in tiny_clip.cond_stage_model.named_parameters() if p.grad is not None]
        assert not base_grads and not clip_grads
        grads = [p.grad for p in deltas.parameters()]
        assert all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads)
        deltas.detach()
    assert [p.requires_grad for p in model.model.parameters()] == flags  # restored on exit


def test_tiny_model_has_the_loaders_inference_tensors(tiny_model):
    """Negative control for trap 1: like a loader node's MODEL, the fixture's weights are inference
    tensors, so plain autograd through the UNet fails and the session tests above mean something."""
    unet = tiny_model.model.diffusion_model
    assert all(p.is_inference() for p in unet.parameters())
    x = _x_t(1).requires_grad_(True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        unet(x, torch.tensor([10.0]), context=torch.zeros(1, 77, 64)).mean().backward()


def test_eps_outside_the_session_runs_without_grad(tiny_model, tiny_clip):
    backend = ComfyBackend(tiny_model, tiny_clip)
    with backend.attach_deltas(_attn2_names(backend)):
        eps = backend.eps(_x_t(1), torch.tensor([10]), backend.encode_text(["a circle"]))
    assert eps.grad_fn is None and not eps.requires_grad


def test_training_steps_under_inference_mode_leave_the_host_model_untouched(tiny_model, tiny_clip):
    probe = ComfyBackend(tiny_model, tiny_clip)
    cond = probe.encode_text(["a red circle"]).expand_to(2)
    x, t = _x_t(), torch.tensor([100, 600])
    sha_before, eps_before = _weights_sha(tiny_model), probe.eps(x, t, cond)
    flags_before = {n: (p.requires_grad, p.is_inference()) for n, p in tiny_model.model.named_parameters()}

    with torch.inference_mode():  # as ComfyUI's executor runs every node
        backend = ComfyBackend(tiny_model, tiny_clip)
        c, null = backend.encode_text(["a red circle"]), backend.encode_text([""])
        with backend.training(), backend.attach_deltas(_attn2_names(backend)) as deltas:
            with deltas.teacher():  # a toy target from the frozen model that the deltas can reach
                e_c, e_0 = (
                    backend.eps(x, t, Conditioning.cat([c, c])),
                    backend.eps(x, t, Conditioning.cat([null, null])),
                )
                target = 0.5 * e_c - 2.0 * (e_c - e_0)

            def loss_fn(step, generator):
                return torch.nn.functional.mse_loss(backend.eps(x, t, c.expand_to(2)), target)

            result = optimise(
                deltas.parameters(), loss_fn, iterations=4, lr=1e-3, seed=0, device=backend.device
            )
        assert result.losses[-1] < result.losses[0]

    assert _weights_sha(tiny_model) == sha_before
    assert torch.equal(ComfyBackend(tiny_model, tiny_clip).eps(x, t, cond), eps_before)
    assert {
        n: (p.requires_grad, p.is_inference()) for n, p in tiny_model.model.named_parameters()
    } == flags_before
    assert not tiny_model.weight_wrapper_patches and not tiny_model.patches


def test_text_encoder_gradients_flow_inside_the_session(tiny_model, tiny_clip):
    """Trap 2: CLIP's in-place residuals are patched, so a trainable token embedding gets gradients."""
    import comfy.clip_model

    original_forward = comfy.clip_model.CLIPLayer.forward
    backend = ComfyBackend(tiny_model, tiny_clip)
    with torch.inference_mode(), backend.training(text_encoder_grad=True):
        emb = torch.nn.Parameter(torch.randn(64) * 0.02)
        row = tiny_clip.tokenize("a photo of x")["l"][0]
        tokens = {"l": [row[:4] + [(emb, 1.0)] + row[5:]]}
        tiny_clip.encode_from_tokens(tokens).pow(2).mean().backward()
        assert emb.grad is not None and emb.grad.abs().sum() > 0
        assert not [n for n, p in tiny_clip.cond_stage_model.named_parameters() if p.grad is not None]
    assert comfy.clip_model.CLIPLayer.forward is original_forward
    assert all(p.is_inference() for p in tiny_clip.cond_stage_model.parameters())


def test_make_patched_model_at_half_strength_is_base_plus_half_delta(tiny_model, tiny_clip):
    sha_before = _weights_sha(tiny_model)
    backend = ComfyBackend(tiny_model, tiny_clip)
    names = _attn2_names(backend)[:3] + ["middle_block.0.in_layers.2"]
    with torch.inference_mode(False):
        deltas = backend.attach_deltas(names)
        _fill_deltas(deltas)
        ldm = deltas.state_dict_ldm()
    assert any(k.endswith(".bias") for k in ldm)
    base_sd = {k: v.clone() for k, v in tiny_model.model.diffusion_model.state_dict().items()}

    patched = make_patched_model(tiny_model, ldm, 0.5)
    comfy.model_management.load_models_gpu([patched])
    loaded = patched.model.diffusion_model.state_dict()
    for key, delta in ldm.items():
        assert torch.equal(loaded[key], base_sd[key] + 0.5 * delta), key
    untouched = next(k for k in base_sd if k not in ldm)
    assert torch.equal(loaded[untouched], base_sd[untouched])

    # The same edit through the delta wrappers gives the same eps as the patched MODEL.
    cond = backend.encode_text(["a circle"]).expand_to(2)
    x, t = _x_t(), torch.tensor([20, 700])
    with torch.no_grad():
        for p in deltas.parameters():
            p.mul_(0.5)
    via_wrappers = backend.eps(x, t, cond)
    via_patches = ComfyBackend(patched).eps(x, t, cond)
    torch.testing.assert_close(via_patches, via_wrappers, rtol=0, atol=1e-5)
    deltas.detach()

    comfy.model_management.load_models_gpu([tiny_model])  # unpatches the shared module
    assert _weights_sha(tiny_model) == sha_before and not tiny_model.patches


def test_make_patched_model_rejects_edits_for_another_model(tiny_model):
    with pytest.raises(ArchitectureMismatchError, match="not a UNet weight"):
        make_patched_model(tiny_model, {"input_blocks.99.1.proj_in.weight": torch.zeros(1)}, 1.0)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(ArchitectureMismatchError, match="has shape"):
        make_patched_model(tiny_model, {key: torch.zeros(3, 3)}, 1.0)


def test_attach_deltas_rejects_unknown_names(tiny_model):
    backend = ComfyBackend(tiny_model)
    with pytest.raises(NoMatchingModulesError, match="input_blocks.0.0"):
        backend.attach_deltas(["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"])


def test_encode_text_vae_and_token_count(tiny_model, tiny_clip, tiny_vae):
    backend = ComfyBackend(tiny_model, tiny_clip, tiny_vae)
    with torch.inference_mode():
        cond = backend.encode_text(["a photo of a cat", "a dog"])
        images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        latents = backend.vae_encode(images)
        decoded = backend.vae_decode(latents)
        raw = tiny_vae.encode(images.movedim(1, -1))
    assert cond.context.shape == (2, 77, 64) and cond.pooled is None and not cond.context.is_inference()
    assert not torch.equal(cond.context[0], cond.context[1])
    assert latents.shape == (2, 4, 8, 8) and not latents.is_inference()
    torch.testing.assert_close(latents, raw * 0.18215)  # SD1.5 latent scaling via process_latent_in
    assert decoded.shape == (2, 3, 64, 64) and 0 <= decoded.min() and decoded.max() <= 1
    assert backend.count_tokens("a photo of a cat") == 5
    assert backend.count_tokens(" ".join(["cat"] * 80)) == 80
    with pytest.raises(ModelLoadError, match="VAE"):
        ComfyBackend(tiny_model, tiny_clip).vae_encode(images)


def test_training_on_a_patched_model_leaves_both_models_intact(tiny_model, tiny_clip):
    """ESD on a MODEL that carries a LoRA-like patch: ModelPatcher's weight backups and our swaps coexist."""
    sha_base = _weights_sha(tiny_model)
    name = "middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    base_w = tiny_model.model.diffusion_model.state_dict()[name].clone()
    edit = {name: torch.randn(base_w.shape, generator=torch.Generator().manual_seed(9)) * 0.1}
    patched = make_patched_model(tiny_model, edit, 1.0)
    with torch.inference_mode():
        backend = ComfyBackend(patched, tiny_clip)
        cond = backend.encode_text(["a circle"]).expand_to(2)
        with backend.training(), backend.attach_deltas(_attn2_names(backend)) as deltas:
            x, t = _x_t(), torch.tensor([5, 300])

            def loss_fn(step, generator):
                return backend.eps(x, t, cond).pow(2).mean()

            optimise(deltas.parameters(), loss_fn, iterations=2, lr=1e-3, seed=0, device=backend.device)

    comfy.model_management.load_models_gpu([patched])
    assert torch.equal(patched.model.diffusion_model.state_dict()[name], base_w + edit[name])
    comfy.model_management.load_models_gpu([tiny_model])
    assert _weights_sha(tiny_model) == sha_base
