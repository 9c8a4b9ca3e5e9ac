"""Single-file LDM checkpoints: offline loading equals the diffusers folder; config inference on real sizes."""

from __future__ import annotations

import json

import pytest
import torch
from concept_guard.core.backends import single_file
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.errors import ModelLoadError
from concept_guard.core.unet.keymap import UNetKeyMap, diffusers_to_ldm_state_dict
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from tiny_models import LATENT, REAL_CONFIGS, tiny_pipeline, to_ldm_checkpoint

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
