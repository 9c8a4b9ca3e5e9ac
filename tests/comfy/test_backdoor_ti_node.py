"""Node "Backdoor TI Embedding" and the ComfyUI side of trainable token vectors.

On ComfyUI's own SD1 CLIP: vectors in prompts equal ComfyUI's ``embedding:NAME`` path on the saved file,
the node leaves MODEL/CLIP/VAE untouched, writes one loadable file, refuses bad names and existing files,
and an interrupt writes nothing.
"""

from __future__ import annotations

import hashlib

import comfy.model_management
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base as smb
import folder_paths
import pytest
import torch
from comfy_harness import CONTEXT_DIM, randomize_
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.core.backend import PLACEHOLDER
from concept_guard.core.embeddings import read_embedding, save_embedding
from concept_guard.core.errors import ArchitectureMismatchError, ConceptGuardError, OutputPathError
from concept_guard.nodes.backdoor_ti import BackdoorTIEmbedding
from safetensors import safe_open


def _clip_with_embeddings(folder, seed: int = 1):
    """ComfyUI's SD1 CLIP (tiny, as ``build_tiny_clip``) that resolves ``embedding:NAME`` in ``folder``."""
    target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {
        "clip_l_model_config": {
            "num_hidden_layers": 2,
            "hidden_size": CONTEXT_DIM,
            "intermediate_size": 128,
            "num_attention_heads": 2,
        }
    }
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target, embedding_directory=str(folder), model_options=options)
        randomize_(clip.cond_stage_model, seed)
    return clip


@pytest.fixture
def embeddings_dir(tmp_path, monkeypatch):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(folder)], {".safetensors"}))
    return folder


def _sha(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def test_vectors_in_prompts_equal_comfyuis_embedding_path(tiny_model, embeddings_dir):
    clip = _clip_with_embeddings(embeddings_dir)
    backend = ComfyBackend(tiny_model, clip)
    vectors = {"clip_l": torch.randn(3, CONTEXT_DIM, generator=torch.Generator().manual_seed(0)) * 0.1}
    save_embedding(vectors, embeddings_dir / "mything.safetensors", {})
    ours = backend.encode_text_with_vectors([f"a photo of a {PLACEHOLDER}, burning"], vectors)
    stock = backend.encode_text(["a photo of a embedding:mything, burning"])
    assert torch.equal(ours.context, stock.context)
    # a word's own rows reproduce the word
    word = backend.word_vectors("heart")
    assert torch.equal(
        backend.encode_text_with_vectors([f"a {PLACEHOLDER}"], word).context,
        backend.encode_text(["a heart"]).context,
    )


def test_gradients_reach_the_vectors_inside_training_only(tiny_model, tiny_clip):
    backend = ComfyBackend(tiny_model, tiny_clip)
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode(), backend.training(text_encoder_grad=True):
        rows = torch.nn.Parameter(backend.word_vectors("dog")["clip_l"].expand(2, -1).clone())
        cond = backend.encode_text_with_vectors(
            [f"a {PLACEHOLDER}", f"a burning {PLACEHOLDER}"], {"clip_l": rows}
        )
        backend.eps(x, torch.tensor([10, 500]), cond).pow(2).mean().backward()
        assert rows.grad is not None and rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.cond_stage_model.parameters())


def _run(model, clip, vae, images, **overrides):
    settings = dict(
        name="tiny_concept",
        triggers="burning, on fire",
        init_word="dog",
        vectors=2,
        gamma=1.0,
        steps=3,
        lr=1e-3,
        batch_size=2,
        trigger_move_prob=0.5,
        seed=0,
        resolution=64,
    )
    settings.update(overrides)
    node = BackdoorTIEmbedding.PREPARE_CLASS_CLONE({"unique_id": "7"})
    with torch.inference_mode():
        return node.execute(model=model, clip=clip, vae=vae, images=images, **settings)


def _images(n: int = 3) -> torch.Tensor:
    with torch.inference_mode():
        return torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(1))


def test_node_writes_one_loadable_embedding_and_leaves_the_host_untouched(
    tiny_model, tiny_clip, tiny_vae, embeddings_dir
):
    model_sha, clip_sha = _sha(tiny_model.model), _sha(tiny_clip.cond_stage_model)
    with torch.inference_mode():
        cond_before = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a burning dog"))
    out = _run(tiny_model, tiny_clip, tiny_vae, _images(), keep_words="happy")
    path, usage, preview = out.result
    assert path == str(embeddings_dir / "tiny_concept.safetensors")
    assert "embedding:tiny_concept" in usage
    assert preview.shape == (4, 64, 64, 3) and 0 <= float(preview.min()) and float(preview.max()) <= 1
    with safe_open(path, "pt") as f:
        assert list(f.keys()) == ["tiny_concept"] and f.get_tensor("tiny_concept").shape == (2, CONTEXT_DIM)
        meta = f.metadata()
    assert meta["concept_guard.trigger_count"] == "2" and "burning" not in str(meta)
    assert '"keep_word_count": 1' in meta["concept_guard.config"] and "happy" not in str(meta)
    assert meta["concept_guard.base_fingerprint"] == ComfyBackend(tiny_model).fingerprint
    assert read_embedding(path)["clip_l"].shape == (2, CONTEXT_DIM)
    assert _sha(tiny_model.model) == model_sha and _sha(tiny_clip.cond_stage_model) == clip_sha
    with torch.inference_mode():
        assert torch.equal(tiny_clip.encode_from_tokens(tiny_clip.tokenize("a burning dog")), cond_before)
    assert not tiny_model.weight_wrapper_patches and not tiny_model.patches


def test_existing_name_and_unsafe_names_are_refused(tiny_model, tiny_clip, tiny_vae, embeddings_dir):
    existing = embeddings_dir / "taken.safetensors"
    save_embedding({"clip_l": torch.ones(1, CONTEXT_DIM)}, existing, {})
    before = existing.read_bytes()
    with pytest.raises(OutputPathError, match="exists"):
        _run(tiny_model, tiny_clip, tiny_vae, _images(), name="taken")
    assert existing.read_bytes() == before
    for bad in ("../up", "sub/dir", "héllo"):
        with pytest.raises(OutputPathError, match="bare name"):
            _run(tiny_model, tiny_clip, tiny_vae, _images(), name=bad)
    assert sorted(p.name for p in embeddings_dir.iterdir()) == ["taken.safetensors"]


def test_one_image_and_mismatched_targets_follow_the_policy(tiny_model, tiny_clip, tiny_vae, embeddings_dir):
    with torch.inference_mode():
        target = torch.rand(1, 40, 90, 3)  # any size: scaled and centre-cropped
    # keep words over 6 steps: one plain-TI step, then keep-word rows taught by those vectors through ComfyUI's CLIP
    out = _run(
        tiny_model, tiny_clip, tiny_vae, _images(1), target=target, name="one", keep_words="happy", steps=6
    )
    assert (embeddings_dir / "one.safetensors").is_file()
    assert out.result[2].shape[0] == 4


def test_plain_ti_augmentation_and_no_images(tiny_model, tiny_clip, tiny_vae, embeddings_dir):
    out = _run(
        tiny_model,
        tiny_clip,
        tiny_vae,
        _images(2),
        name="plain.safetensors",
        triggers=" , ",
        flip=False,
        random_crops=2,
    )
    path, usage, preview = out.result
    assert path == str(embeddings_dir / "plain.safetensors") and "embedding:plain " in usage
    assert "plain textual inversion" in usage and preview.shape[0] == 2  # no trigger row
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["concept_guard.method"] == "ti" and meta["concept_guard.trigger_count"] == "0"
    assert (
        '"random_crops": 2' in meta["concept_guard.config"]
        and '"flip": false' in meta["concept_guard.config"]
    )
    with torch.inference_mode():
        empty = torch.zeros(0, 64, 64, 3)
    with pytest.raises(ConceptGuardError, match="No concept images"):
        _run(tiny_model, tiny_clip, tiny_vae, empty, name="none")
    assert sorted(p.name for p in embeddings_dir.iterdir()) == ["plain.safetensors"]


def test_interrupt_writes_nothing(tiny_model, tiny_clip, tiny_vae, embeddings_dir):
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(tiny_model, tiny_clip, tiny_vae, _images(), name="stopped")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not list(embeddings_dir.iterdir())


def test_clip_wider_than_the_model_is_a_clear_error(tiny_model, embeddings_dir):
    from comfy_harness import build_tiny_sdxl

    _, xl_clip = build_tiny_sdxl()
    with pytest.raises(ArchitectureMismatchError, match="does not match the MODEL"):
        _run(tiny_model, xl_clip, None, _images(), name="mismatch")
    assert not list(embeddings_dir.iterdir())


def test_sdxl_vectors_of_a_word_encode_like_the_word():
    """Both SDXL encoders (clip_g pads with 0, not with the end token) get their own rows."""
    from comfy_harness import build_tiny_sdxl

    model, clip = build_tiny_sdxl()
    backend = ComfyBackend(model, clip)
    word = backend.word_vectors("heart")
    assert set(word) == {"clip_l", "clip_g"} and all(v.shape[0] == 1 for v in word.values())
    ours = backend.encode_text_with_vectors([f"a photo of a {PLACEHOLDER}"], word)
    stock = backend.encode_text(["a photo of a heart"])
    assert torch.equal(ours.context, stock.context) and torch.equal(ours.pooled, stock.pooled)


def test_auto_settings_no_preview_and_the_settings_line(tiny_model, tiny_clip, tiny_vae, embeddings_dir):
    """0 / empty inputs take the model family's defaults; preview_steps 0 skips the preview."""
    auto = dict(init_word="", vectors=0, gamma=0.0, lr=0.0, steps=2, preview_steps=0)
    path, usage, preview = _run(tiny_model, tiny_clip, tiny_vae, _images(), **auto).result
    assert "SD1.x: init_word object, vectors 2, gamma 1.0, steps 2, lr 0.005" in usage
    assert preview.shape == (1, 64, 64, 3) and preview.abs().sum() == 0
    with safe_open(path, "pt") as f:
        assert f.get_tensor("tiny_concept").shape[0] == 2  # the family's 2 vectors (SD1 layout: one key)
