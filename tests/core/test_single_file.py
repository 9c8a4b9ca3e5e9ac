"""Single-file LDM checkpoints: offline loading equals the diffusers folder; config inference on real sizes;
checkpoints matching a shipped config load through diffusers' ``from_single_file`` to the same modules
and weights as shape inference."""

from __future__ import annotations

import json

import pytest
import torch
from concept_guard.core.backends import single_file
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.errors import ModelLoadError
from concept_guard.core.unet.keymap import (
    UNetKeyMap,
    diffusers_to_ldm_state_dict,
    ldm_to_diffusers_state_dict,
)
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from tiny_models import LATENT, REAL_CONFIGS, _vae_to_ldm, tiny_pipeline, to_ldm_checkpoint

PROMPTS = ["a photo of a cat", "a red circle"]


def _inputs(backend, batch=2):
    x = torch.randn(
        batch, backend.latent_channels, LATENT, LATENT, generator=torch.Generator().manual_seed(0)
    )
    return x, torch.tensor([999, 21][:batch])


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_unet_config_inferred_from_real_size_ldm_shapes(name):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_CONFIGS[name])
        ldm = diffusers_to_ldm_state_dict(unet.state_dict(), UNetKeyMap(unet.config))
        inferred = UNet2DConditionModel(**single_file.infer_unet_config(ldm))  # SDXL: pooled width 1280
    shapes = {k: v.shape for k, v in inferred.state_dict().items()}
    assert shapes == {k: v.shape for k, v in unet.state_dict().items()}
    heads = [a.heads for a in inferred.modules() if type(a).__name__ == "Attention"]
    assert heads == [a.heads for a in unet.modules() if type(a).__name__ == "Attention"]


def test_prediction_type_detection():
    unet = {
        "output_blocks.11.1.transformer_blocks.0.norm1.bias": torch.randn(
            320, generator=torch.Generator().manual_seed(0)
        )
    }
    assert single_file.detect_prediction_type(unet, {"v_pred": torch.tensor([])}, "sd1") == "v_prediction"
    assert single_file.detect_prediction_type(unet, {}, "sd1") == "epsilon"
    assert (
        single_file.detect_prediction_type({k: v * 0.2 for k, v in unet.items()}, {}, "sd2") == "v_prediction"
    )
    assert single_file.detect_prediction_type({k: v * 0.01 for k, v in unet.items()}, {}, "sd2") == "epsilon"


@pytest.mark.parametrize(
    ("kind", "prediction"), [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")]
)
def test_single_file_checkpoint_loads_like_the_folder(kind, prediction, tiny_dirs, tokenizer_dir, tmp_path):
    folder_backend = DiffusersBackend.load(tiny_dirs(kind, prediction))
    pipe = tiny_pipeline(kind, tokenizer_dir, prediction_type=prediction)
    state = to_ldm_checkpoint(pipe, kind)
    if prediction == "v_prediction":
        state["v_pred"] = torch.tensor([])  # the marker some tools write
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, path)
    backend = DiffusersBackend.load(path, tokenizer=tokenizer_dir)
    assert (backend.arch, backend.prediction_type) == (kind, prediction)
    assert backend.fingerprint == folder_backend.fingerprint
    cond = folder_backend.encode_text(PROMPTS)
    loaded = backend.encode_text(PROMPTS)
    assert torch.equal(loaded.context, cond.context)
    if kind == "sdxl":
        assert torch.equal(loaded.pooled, cond.pooled)
        side = 128 * backend.vae_scale_factor  # SDXL's native latent size (1024 px with the real VAE)
        assert loaded.time_ids[0].tolist() == [side, side, 0, 0, side, side]
    x, t = _inputs(backend)
    assert torch.equal(backend.eps(x, t, cond), folder_backend.eps(x, t, cond))
    assert torch.equal(backend.vae_decode(x[:1]), folder_backend.vae_decode(x[:1]))


def test_single_file_ckpt_format_and_errors(tiny_dirs, tokenizer_dir, tmp_path, monkeypatch):
    state = to_ldm_checkpoint(tiny_pipeline("sd1", tokenizer_dir), "sd1")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, ckpt)
    assert (
        DiffusersBackend.load(ckpt, tokenizer=tokenizer_dir).fingerprint
        == DiffusersBackend.load(tiny_dirs("sd1")).fingerprint
    )
    monkeypatch.setattr(single_file, "DEFAULT_TOKENIZER_REPO", "concept-guard/no-such-tokenizer")
    with pytest.raises(
        ModelLoadError, match=r"No CLIP tokenizer found.*not in the Hugging Face cache.*vocab\.json"
    ):
        DiffusersBackend.load(ckpt)
    with pytest.raises(
        ModelLoadError, match=r"No CLIP tokenizer found in .*expected vocab\.json and merges\.txt"
    ):
        DiffusersBackend.load(ckpt, tokenizer=tmp_path)
    small = tmp_path / "small_vocab"  # a different (smaller) vocabulary than the text encoder's
    small.mkdir()
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    (small / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if v < 40}))
    (small / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(
        ModelLoadError, match=r"tokenizer has 40 tokens but the checkpoint's text encoder has \d+"
    ):
        DiffusersBackend.load(ckpt, tokenizer=small)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, lora)
    with pytest.raises(ModelLoadError, match=r"no UNet weights \(model\.diffusion_model\.\*\)"):
        DiffusersBackend.load(lora)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="Could not read checkpoint"):
        DiffusersBackend.load(broken)


# -- shipped configs: diffusers' from_single_file for standard shapes, shape inference for the rest ----------


def _attention(model):
    return [(a.heads, a.upcast_attention) for a in model.modules() if type(a).__name__ == "Attention"]


def _shared(converted):
    """Which checkpoint tensor each key holds (views, e.g. the VAE's 1x1-conv attention, by their base)."""
    return {k: id(v if v._base is None else v._base) for k, v in converted.items()}


@pytest.mark.parametrize(("arch", "published"), [("sd1", "sd15"), ("sd2", "sd21"), ("sdxl", "sdxl")])
def test_full_size_standard_checkpoints_route_to_the_shipped_config_with_todays_modules(
    arch, published, monkeypatch
):
    """Meta tensors (no memory): a full-size checkpoint of each family matches its shipped config, which
    builds the published UNet/VAE and exactly the modules shape inference builds today; diffusers'
    converter puts every checkpoint tensor where our keymap does."""
    folder = single_file.SHIPPED_CONFIGS[arch]
    configs = {
        c: cls.load_config(folder, subfolder=c)
        for c, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL))
    }
    with torch.device("meta"):
        unet, vae = (
            UNet2DConditionModel.from_config(configs["unet"]),
            AutoencoderKL.from_config(configs["vae"]),
        )
        assert str(unet) == str(UNet2DConditionModel(**REAL_CONFIGS[published]))
    full = diffusers_to_ldm_state_dict(
        unet.state_dict(), UNetKeyMap(unet.config), prefix=single_file.UNET_PREFIX
    )
    full.update(_vae_to_ldm(vae))
    full[single_file.SDXL_OPENCLIP + "text_projection"] = torch.empty(1280, 1280, device="meta")
    assert single_file.shipped_config(full, arch, "unet") == folder
    assert single_file.shipped_config(full, arch, "vae") == folder

    monkeypatch.setattr(single_file, "SHIPPED_CONFIGS", {})  # today's route: shape inference
    inferred_unet = single_file._load_unet(full, arch, "epsilon", torch.float32)
    inferred_vae = single_file._load_vae(full, arch, torch.float32)
    with torch.device("meta"):  # what from_single_file builds: the shipped config plus the same overrides
        overrides = {"sample_size": inferred_unet.config.sample_size, "upcast_attention": arch == "sd2"}
        routed = UNet2DConditionModel.from_config({**configs["unet"], **overrides})
    assert (str(inferred_unet), _attention(inferred_unet)) == (str(routed), _attention(routed))
    assert str(inferred_vae) == str(vae) and inferred_vae.config.scaling_factor == vae.config.scaling_factor
    unet_sd = single_file._sub(full, single_file.UNET_PREFIX)
    shapes = {k: v.shape for k, v in routed.state_dict().items()}
    ours = ldm_to_diffusers_state_dict(unet_sd, UNetKeyMap(inferred_unet.config), shapes)
    assert _shared(convert_ldm_unet_checkpoint(full, configs["unet"])) == _shared(ours)
    vae_ours = convert_ldm_vae_checkpoint(full, dict(inferred_vae.config))
    assert _shared(convert_ldm_vae_checkpoint(full, configs["vae"])) == _shared(vae_ours)


def _config_folder(pipe, folder):
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    return folder


@pytest.mark.parametrize(
    ("kind", "prediction", "dtype"),
    [
        ("sd1", "epsilon", torch.float32),
        ("sd1", "epsilon", torch.float16),
        ("sd2", "v_prediction", torch.float32),
    ],
)
def test_shipped_config_route_loads_the_same_weights_as_shape_inference(
    kind, prediction, dtype, tokenizer_dir, tmp_path, monkeypatch
):
    """Real weights: a tiny checkpoint plus a config folder for its architecture, written here, loads through
    diffusers' from_single_file(config=..., local_files_only=True) to state dicts equal to shape inference's."""
    pipe = tiny_pipeline(kind, tokenizer_dir, prediction_type=prediction)
    path = tmp_path / f"{kind}.safetensors"
    state = to_ldm_checkpoint(pipe, kind)
    if prediction == "v_prediction":
        state["v_pred"] = torch.tensor([])
    save_file(state, path)
    routed = []
    real = single_file._from_single_file
    monkeypatch.setattr(
        single_file, "_from_single_file", lambda c, *a, **k: routed.append(c) or real(c, *a, **k)
    )
    monkeypatch.setattr(single_file, "SHIPPED_CONFIGS", {})
    inferred, _ = single_file.load_single_file(path, dtype, tokenizer=tokenizer_dir)
    assert routed == []
    monkeypatch.setattr(single_file, "SHIPPED_CONFIGS", {kind: _config_folder(pipe, tmp_path / "configs")})
    monkeypatch.setattr(single_file, "FROM_SINGLE_FILE", False)  # no accelerate: shape inference all the same
    single_file.load_single_file(path, dtype, tokenizer=tokenizer_dir)
    assert routed == []
    monkeypatch.setattr(single_file, "FROM_SINGLE_FILE", True)  # the route taken when accelerate is installed
    loaded, detected = single_file.load_single_file(path, dtype, tokenizer=tokenizer_dir)
    assert routed == ["unet", "vae"] and detected == prediction
    for a, b in ((loaded.unet, inferred.unet), (loaded.vae, inferred.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(
            torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa
        )
        assert str(a) == str(b) and _attention(a) == _attention(b)
    assert loaded.unet.config.sample_size == inferred.unet.config.sample_size
    if dtype == torch.float32:
        backend, reference = DiffusersBackend(loaded), DiffusersBackend(inferred)
        x, t = _inputs(backend)
        cond = reference.encode_text(PROMPTS)
        assert torch.equal(backend.eps(x, t, cond), reference.eps(x, t, cond))
        assert torch.equal(backend.vae_decode(x[:1]), reference.vae_decode(x[:1]))


def test_non_standard_unet_keeps_shape_inference(tokenizer_dir, tmp_path, monkeypatch):
    """The tiny SDXL UNet (per-level layers_per_block) fits no config diffusers' converter can express:
    with a config folder for exactly it, the UNet still loads by shape inference, the VAE by diffusers."""
    pipe = tiny_pipeline("sdxl", tokenizer_dir)
    full = to_ldm_checkpoint(pipe, "sdxl")
    monkeypatch.setattr(single_file, "SHIPPED_CONFIGS", {"sdxl": _config_folder(pipe, tmp_path / "configs")})
    assert single_file.shipped_config(full, "sdxl", "unet") is None
    assert single_file.shipped_config(full, "sdxl", "vae") == tmp_path / "configs"
    assert single_file.shipped_config(full, "sd1", "unet") is None  # no folder for this family
    monkeypatch.undo()  # the shipped configs: the tiny models fit none
    for kind in ("sd1", "sd2", "sdxl"):
        tiny = full if kind == "sdxl" else to_ldm_checkpoint(tiny_pipeline(kind, tokenizer_dir), kind)
        assert [single_file.shipped_config(tiny, kind, c) for c in ("unet", "vae")] == [None, None]
