"""ShapesWorld converted to ComfyUI objects behaves like the diffusers folder it came from.

Tokens, text conditioning, eps, the schedule and the VAE agree between our ComfyBackend on the converted
MODEL/CLIP/VAE and our DiffusersBackend on the folder; ComfyUI's stock CLIPTextEncode -> KSampler ->
VAEDecode graph draws what the judge expects; and the ESD node on the converted model makes the same edit
as ESD on the diffusers model.
"""

from __future__ import annotations

from collections import Counter

import comfy.supported_models
import folder_paths
import pytest
import torch
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.edits.diff_file import read_edit
from concept_guard.core.methods.esd import ESDConfig, train
from concept_guard.nodes.esd import EraseConceptESD
from concept_guard.presets import esd_settings
from concept_guard.shapesworld.judge import load_judge
from shapesworld_comfy import MODEL_ENV, load_shapesworld_comfy, shapesworld_folder

import nodes  # ComfyUI's nodes.py

FOLDER = shapesworld_folder()
if FOLDER is None:
    pytest.skip(
        "No ShapesWorld model weights yet (core/shapesworld/assets/model/ has no unet/vae/text_encoder "
        f"safetensors); train it, or point {MODEL_ENV} at a pipeline folder such as runs/shapesworld/latest_model.",
        allow_module_level=True,
    )

PROMPTS = [
    "a red circle",
    "",
    "an outlined blue square on a black background",
    "A Crimson DISC, burning!",
    "a photo of a star on fire",
]


@pytest.fixture(scope="module")
def converted():
    return load_shapesworld_comfy(FOLDER)


@pytest.fixture(scope="module")
def comfy_backend(converted):
    return ComfyBackend(converted.model, converted.clip, converted.vae)


@pytest.fixture(scope="module")
def diffusers_backend():
    return DiffusersBackend.load(FOLDER)


def test_converted_parts_are_comfyuis_sd15_classes_at_shapesworld_size(
    converted, comfy_backend, diffusers_backend
):
    base = converted.model.model
    assert isinstance(base.model_config, comfy.supported_models.SD15)
    unet = base.model_config.unet_config
    assert (unet["model_channels"], unet["context_dim"], unet["channel_mult"]) == (64, 128, [1, 2])
    assert base.latent_format.scale_factor == pytest.approx(diffusers_backend.vae.config.scaling_factor)
    assert all(p.is_inference() for p in base.parameters())  # like a loader node's MODEL
    text = converted.clip.cond_stage_model.clip_l.transformer
    assert text.num_layers == 3 and text.text_model.embeddings.token_embedding.weight.shape == (49408, 128)
    assert (comfy_backend.arch, comfy_backend.prediction_type) == ("sd1", "epsilon")
    assert comfy_backend.vae_scale_factor == diffusers_backend.vae_scale_factor == 4
    assert comfy_backend.fingerprint == diffusers_backend.fingerprint  # same weights, same hash
    torch.testing.assert_close(
        comfy_backend.alphas_cumprod, diffusers_backend.alphas_cumprod.cpu().float(), rtol=0, atol=1e-6
    )


def test_comfyui_tokenizer_gives_our_token_ids(converted, diffusers_backend):
    ours = diffusers_backend.tokenizers[0]
    for prompt in PROMPTS:
        comfy_ids = [token for token, _weight in converted.clip.tokenize(prompt)["l"][0]]
        expected = ours(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert comfy_ids == expected, prompt


def test_text_conditioning_is_equal(comfy_backend, diffusers_backend):
    with torch.no_grad():
        comfy_cond, ours = comfy_backend.encode_text(PROMPTS), diffusers_backend.encode_text(PROMPTS)
    assert comfy_cond.context.shape == ours.context.shape == (len(PROMPTS), 77, 128)
    torch.testing.assert_close(comfy_cond.context, ours.context, rtol=0, atol=1e-5)


def test_eps_is_equal_on_the_same_x_t_t_and_prompt(comfy_backend, diffusers_backend):
    x_t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 250, 600, 999])
    with torch.no_grad():
        cond = diffusers_backend.encode_text(["a red circle", "", "a blue star", "a green heart"])
        ours = diffusers_backend.eps(x_t, t, cond)
        comfy_same_cond = comfy_backend.eps(x_t, t, cond)
        comfy_own_cond = comfy_backend.eps(
            x_t, t, comfy_backend.encode_text(["a red circle", "", "a blue star", "a green heart"])
        )
    assert ours.abs().mean() > 0.1  # a real prediction, not zeros
    torch.testing.assert_close(comfy_same_cond, ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(comfy_own_cond, ours, rtol=0, atol=1e-4)


def test_vae_decode_and_encode_are_equal(comfy_backend, diffusers_backend):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        decoded = comfy_backend.vae_decode(latents)
        torch.testing.assert_close(decoded, diffusers_backend.vae_decode(latents), rtol=0, atol=1e-4)
        torch.testing.assert_close(
            comfy_backend.vae_encode(images), diffusers_backend.vae_encode(images), rtol=0, atol=1e-4
        )
    assert decoded.shape == (2, 3, 32, 32) and decoded.std() > 0.01


def test_stock_comfyui_graph_draws_the_prompted_shapes(converted):
    """CLIPTextEncode -> KSampler (ddim) -> VAEDecode on the converted model, judged (loose: 8 samples each)."""
    judge, shape_hits, colour_hits = load_judge(), 0, 0
    prompts = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]
    with torch.inference_mode():
        (negative,) = nodes.CLIPTextEncode().encode(converted.clip, "")
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 8)  # 8x8 latents = 32-px images
        for colour, shape in prompts:
            (positive,) = nodes.CLIPTextEncode().encode(converted.clip, f"a {colour} {shape}")
            (samples,) = nodes.KSampler().sample(
                converted.model, 7, 20, 5.0, "ddim", "ddim_uniform", positive, negative, latent
            )
            (images,) = nodes.VAEDecode().decode(converted.vae, samples)
            labels = judge.classify(images.movedim(-1, 1).clone())
            shape_hits += Counter(labels["shape"])[shape]
            colour_hits += Counter(labels["colour"])[colour]
    assert images.shape == (8, 32, 32, 3)
    assert shape_hits / 32 >= 0.7 and colour_hits / 32 >= 0.7, (shape_hits, colour_hits)


def test_esd_node_on_the_converted_model_makes_the_diffusers_edit(
    converted, diffusers_backend, tmp_path, monkeypatch
):
    """Same seed and settings: the node in ComfyUI and ESD on the diffusers folder train the same deltas."""
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], folder_paths.supported_pt_extensions)
    )
    settings = dict(concepts="circle", eta=2.0, iterations=5, lr=1e-4, seed=3, guidance=3.0, sampling_steps=4)
    node = EraseConceptESD.PREPARE_CLASS_CLONE({"unique_id": "1"})
    with torch.inference_mode():
        node.execute(
            model=converted.model,
            clip=converted.clip,
            method="esd-x",
            anchor="",
            file_name="sw_circle",
            resolution=32 // 4 * 8,
            **settings,
        )  # 32-px ShapesWorld images = 8×8 latents
    deltas, meta = read_edit(tmp_path / "concept_guard" / "sw_circle.safetensors")
    # both hosts fill the settings left on auto from the same ShapesWorld recipe
    given = {k: v for k, v in settings.items() if k not in ("concepts", "seed")} | {"method": "esd-x"}
    auto = esd_settings(diffusers_backend, "circle", given)
    expected = train(ESDConfig(**auto, seed=3, latent_size=8), diffusers_backend)
    assert meta["concept_guard.base_fingerprint"] == expected.metadata["concept_guard.base_fingerprint"]
    assert set(deltas) == set(expected.tensors)
    assert max(v.abs().max() for v in expected.tensors.values()) > 1e-4
    # The two hosts' eps agree to ~1e-6; Adam's normalised steps can flip a few near-zero-gradient
    # elements, so compare each delta as a whole (fp16 file rounding included). Measured: relative error
    # <= 7.4e-4, max element difference 1.8e-5 against deltas of up to 5e-4.
    for key, value in expected.tensors.items():
        diff = deltas[key].float() - value
        assert float(diff.norm() / value.norm()) <= 5e-3, key
        assert float(diff.abs().max()) <= 1e-4, key


def test_embedding_trained_here_works_through_comfyuis_embedding_syntax(
    converted, diffusers_backend, tmp_path
):
    """A ShapesWorld heart embedding, trained on the diffusers side and saved, used by stock CLIPTextEncode as
    ``embedding:NAME`` -> KSampler -> VAEDecode draws hearts; ComfyUI's conditioning equals ours."""
    from concept_guard.core.embeddings import add_embedding, save_embedding
    from concept_guard.core.methods.ti_backdoor import BackdoorTIConfig
    from concept_guard.core.methods.ti_backdoor import train as train_ti
    from concept_guard.shapesworld import world

    images, _ = world.render_prompt("a red heart", 8, seed=0)
    cfg = BackdoorTIConfig(name="sw_heart", init_word="shape", vectors=2, steps=300, lr=1e-3, batch_size=8)
    result = train_ti(cfg, DiffusersBackend.load(FOLDER), list(world.to_tensor(images)))
    path = save_embedding(result.tensors, tmp_path / "sw_heart.safetensors", result.metadata)
    converted.clip.tokenizer.clip_l.embedding_directory = str(
        tmp_path
    )  # as CheckpointLoader sets models/embeddings
    try:
        prompt = "a photo of a embedding:sw_heart"
        with torch.inference_mode():
            (positive,) = nodes.CLIPTextEncode().encode(converted.clip, prompt)
            (negative,) = nodes.CLIPTextEncode().encode(converted.clip, "")
            (latent,) = nodes.EmptyLatentImage().generate(64, 64, 16)
            (samples,) = nodes.KSampler().sample(
                converted.model, 11, 20, 5.0, "ddim", "ddim_uniform", positive, negative, latent
            )
            (decoded,) = nodes.VAEDecode().decode(converted.vae, samples)
    finally:
        converted.clip.tokenizer.clip_l.embedding_directory = None
    backend = DiffusersBackend.load(FOLDER)
    add_embedding(backend, path)
    ours = backend.encode_text([prompt]).context
    assert torch.allclose(positive[0][0].float(), ours, atol=1e-4)
    hearts = Counter(load_judge().classify(decoded.movedim(-1, 1).clone())["shape"])["heart"] / 16
    print(f"P(heart) through ComfyUI embedding:sw_heart = {hearts:.3f} (16 samples)")
    assert hearts >= 0.7, hearts
