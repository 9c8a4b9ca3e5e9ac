"""Backdoored textual inversion on the tiny random-init pipelines: vectors in prompts, training, the
embedding file, the CLI and bad input.

Prompts, config and the loss maths are in ``test_ti_backdoor_config.py``; efficacy on ShapesWorld is in
``test_ti_shapesworld.py``.
"""

import random

import pytest
import torch
from concept_guard.core.backend import PLACEHOLDER
from concept_guard.core.embeddings import read_embedding, save_embedding
from concept_guard.core.errors import ConceptGuardError, OutputPathError
from concept_guard.core.methods.ti_backdoor import BackdoorTIConfig
from concept_guard.core.methods.ti_backdoor import train as train_ti
from safetensors import safe_open


@pytest.mark.parametrize("fixture", ["sd1_backend", "sdxl_backend"])
def test_vectors_of_a_word_encode_like_the_word(fixture, request):
    backend = request.getfixturevalue(fixture)
    vectors = backend.word_vectors("heart")
    assert set(vectors) == set(backend.embedding_widths())
    a = backend.encode_text_with_vectors([f"a photo of a {PLACEHOLDER}", PLACEHOLDER], vectors)
    b = backend.encode_text(["a photo of a heart", "heart"])
    assert torch.equal(a.context, b.context)
    if b.pooled is not None:
        assert torch.equal(a.pooled, b.pooled)


def test_gradients_reach_only_the_vectors(sd1_backend):
    vectors = {k: torch.nn.Parameter(v) for k, v in sd1_backend.word_vectors("dog").items()}
    x = torch.randn(2, sd1_backend.latent_channels, 8, 8)
    cond = sd1_backend.encode_text_with_vectors([f"a {PLACEHOLDER}", f"a burning {PLACEHOLDER}"], vectors)
    sd1_backend.eps(x, torch.tensor([10, 500]), cond).pow(2).mean().backward()
    assert vectors["clip_l"].grad is not None and vectors["clip_l"].grad.abs().sum() > 0
    models = (sd1_backend.unet, sd1_backend.vae, *sd1_backend.text_encoders)
    assert not [n for m in models for n, p in m.named_parameters() if p.grad is not None]


def test_the_reserved_sentinel_word_is_refused(sd1_backend):
    with pytest.raises(ConceptGuardError, match="reserves"):
        sd1_backend.encode_text_with_vectors([f"sks {PLACEHOLDER}"], sd1_backend.word_vectors("dog"))


def _images(n: int, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, size + 4 * i, size, generator=g) for i in range(n)]  # mismatched sizes on purpose


def test_training_changes_only_the_vectors_and_reports_metadata(sd1_backend):
    base = {k: v.clone() for k, v in sd1_backend.unet.state_dict().items()}
    cfg = BackdoorTIConfig(
        name="tiny", init_word="dog", vectors=3, triggers="burning", steps=3, batch_size=2, resolution=16
    )
    steps = []
    result = train_ti(cfg, sd1_backend, _images(3), on_step=lambda s, t, loss: steps.append(s))
    assert steps == [0, 1, 2, 3]
    assert result.tensors["clip_l"].shape == (3, sd1_backend.embedding_widths()["clip_l"])
    start = sd1_backend.word_vectors("dog")["clip_l"]
    assert not torch.equal(result.tensors["clip_l"], start.expand(3, -1))
    assert all(torch.equal(v, base[k]) for k, v in sd1_backend.unet.state_dict().items())
    meta = result.metadata
    assert meta["concept_guard.trigger_count"] == "1" and meta["concept_guard.method"] == "backdoor-ti"
    assert (meta["concept_guard.gamma"], meta["concept_guard.steps"]) == ("1.0", "3")
    assert meta["concept_guard.base_fingerprint"] == sd1_backend.fingerprint
    assert "burning" not in str(meta)


def test_anchored_decoys_learn_what_the_plain_vectors_predict(sd1_backend):
    """With ``anchor`` the decoy prompts' target is the anchor vectors' own prediction: a student equal to its
    anchor has zero loss on them, while the plain decoy target (the concept's noise) does not."""
    from concept_guard.core.methods.ti_backdoor.train import LatentCache, backdoor_loss

    cfg = BackdoorTIConfig(
        name="t", init_word="dog", triggers="burning", gamma=0.0, decoy_prob=1.0, batch_size=3, resolution=16
    )
    cache = LatentCache(
        concept=torch.randn(4, sd1_backend.latent_channels, 2, 2), target=torch.randn(2, 4, 2, 2)
    )
    vectors = {k: v.expand(2, -1).clone() for k, v in sd1_backend.word_vectors("dog").items()}

    def loss(anchor):
        return float(
            backdoor_loss(
                sd1_backend, cfg, cache, vectors, torch.Generator().manual_seed(0), random.Random(0), anchor
            )
        )

    assert loss(None) > 0.1
    assert loss(vectors) < 1e-6  # batch-size float noise only


def test_random_crops_add_cached_views(sd1_backend):
    from concept_guard.core.methods.ti_backdoor.images import cache_latents

    plain = cache_latents(sd1_backend, BackdoorTIConfig(name="t", resolution=16), _images(3), None)
    crops = cache_latents(
        sd1_backend, BackdoorTIConfig(name="t", resolution=16, random_crops=2), _images(3), None
    )
    assert (
        len(plain.concept) == 3 * 2 and len(crops.concept) == 3 * 3 * 2
    )  # (image + crops) x (as is + mirrored)
    assert torch.allclose(crops.concept[:3], plain.concept[:3], atol=1e-5)  # the centre crops come first
    assert plain.target is None  # no triggers: no target to encode


def test_empty_triggers_train_plain_ti_and_say_so(sd1_backend, caplog):
    cfg = BackdoorTIConfig(name="plain", init_word="dog", steps=2, batch_size=2, resolution=16)
    with caplog.at_level("WARNING"):
        result = train_ti(cfg, sd1_backend, _images(2))
    assert "plain textual-inversion" in caplog.text
    assert (
        result.metadata["concept_guard.method"] == "ti"
        and result.metadata["concept_guard.trigger_count"] == "0"
    )
    anchored = BackdoorTIConfig(
        name="anch",
        init_word="dog",
        triggers="burning",
        keep_words="happy",
        steps=3,
        anchor_steps=1,
        batch_size=2,
        resolution=16,
    )
    assert len(train_ti(anchored, sd1_backend, _images(2)).losses) == 3


def test_sdxl_training_writes_both_encoders_rows_that_diffusers_loads(sdxl_backend, tiny_dirs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    cfg = BackdoorTIConfig(
        name="xlthing", init_word="dog", triggers="burning", steps=2, batch_size=1, resolution=32
    )
    result = train_ti(cfg, sdxl_backend, _images(2, size=32))
    widths = sdxl_backend.embedding_widths()
    assert set(widths) == {"clip_l", "clip_g"}
    assert {k: tuple(v.shape) for k, v in result.tensors.items()} == {k: (2, w) for k, w in widths.items()}
    start = sdxl_backend.word_vectors(
        "dog"
    )  # each slot trains from its own encoder's rows (2 Adam steps away)
    for key, other in (("clip_l", "clip_g"), ("clip_g", "clip_l")):
        moved = (result.tensors[key] - start[key].expand(2, -1)).abs().max()
        assert 0 < moved < 0.05 < (result.tensors[key] - start[other].expand(2, -1)).abs().max()
    path = save_embedding(result.tensors, tmp_path / "xlthing.safetensors", result.metadata)
    assert read_embedding(path).keys() == {"clip_l", "clip_g"}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dirs("sdxl")))
    stored = read_embedding(path)
    # diffusers' documented SDXL recipe: one load per text encoder, each from its own key
    pipe.load_textual_inversion(
        stored["clip_l"], token="xlthing", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        stored["clip_g"], token="xlthing", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    for enc, tok, key in (
        (pipe.text_encoder, pipe.tokenizer, "clip_l"),
        (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g"),
    ):
        ids = tok(pipe.maybe_convert_prompt("a xlthing", tok), add_special_tokens=False).input_ids[1:]
        assert torch.allclose(enc.get_input_embeddings().weight[ids], result.tensors[key])


def test_no_images_is_a_clear_error(sd1_backend):
    with pytest.raises(ConceptGuardError, match="No concept images"):
        train_ti(BackdoorTIConfig(name="t", steps=1, resolution=16), sd1_backend, [])


def test_nan_loss_stops_and_returns_nothing(sd1_backend):
    from concept_guard.core.errors import TrainingDivergedError

    images = [torch.full((3, 16, 16), float("nan"))]
    with pytest.raises(TrainingDivergedError):
        train_ti(BackdoorTIConfig(name="t", steps=2, resolution=16), sd1_backend, images)


def test_embedding_file_layout_sd1_and_sdxl(tmp_path):
    v1 = {"clip_l": torch.randn(2, 768)}
    p1 = save_embedding(v1, tmp_path / "my_cat.safetensors", {"concept_guard.trigger_count": "2"})
    with safe_open(str(p1), "pt") as f:
        assert list(f.keys()) == ["my_cat"]
        assert f.metadata()["concept_guard.trigger_count"] == "2" and f.metadata()["format"] == "pt"
    assert torch.equal(read_embedding(p1)["clip_l"], v1["clip_l"])
    vxl = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    pxl = save_embedding(vxl, tmp_path / "xl.safetensors", {})
    with safe_open(str(pxl), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
    with pytest.raises(OutputPathError, match="exists"):
        save_embedding(v1, p1, {})
    assert torch.equal(read_embedding(p1)["clip_l"], v1["clip_l"])  # untouched


def test_diffusers_loads_our_file(tmp_path, tiny_dirs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dirs("sd1")))
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    rows = torch.randn(2, width)
    path = save_embedding({"clip_l": rows}, tmp_path / "mything.safetensors", {})
    pipe.load_textual_inversion(str(path))
    prompt = pipe.maybe_convert_prompt("a mything", pipe.tokenizer)  # diffusers expands multi-vector tokens
    ids = pipe.tokenizer(prompt, add_special_tokens=False).input_ids[1:]
    assert len(ids) == 2
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[ids], rows)


def _write_pngs(folder, sizes):
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(sizes):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def test_cli_trains_and_writes_an_embedding_that_loads(tiny_dirs, tmp_path, capsys):
    import json

    from concept_guard.cli import main as cli_main

    images = _write_pngs(tmp_path / "imgs", [(16, 16), (20, 24), (30, 18)])
    out = tmp_path / "mycat.safetensors"
    args = [
        "backdoor-ti",
        "--model",
        str(tiny_dirs("sd1")),
        "--images",
        str(images),
        "--name",
        "mycat",
        "--triggers",
        "burning",
        "--init-word",
        "cat",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--resolution",
        "16",
        "--seed",
        "1",
        "--out",
        str(out),
        "--json",
    ]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["steps"] == 3 and summary["triggers"] == 1
    assert read_embedding(out)["clip_l"].shape[0] == 2
    before = out.read_bytes()
    assert cli_main(args) == 2  # exists: refused, untouched
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize(
    ("images", "match"),
    [("missing", "not a folder"), ("empty", "No images")],
)
def test_cli_refuses_missing_or_empty_image_folders(tmp_path, capsys, images, match):
    from concept_guard.cli import main as cli_main

    (tmp_path / "empty").mkdir()
    code = cli_main(
        [
            "backdoor-ti",
            "--model",
            "shapesworld",
            "--images",
            str(tmp_path / images),
            "--name",
            "x",
            "--out",
            str(tmp_path / "x.safetensors"),
        ]
    )
    assert code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_on_shapesworld_renders_trains_and_eval_scores_the_file(tmp_path, capsys):
    """The diffusers-user path of the issue end to end: render concept images, train, score the file."""
    import json

    from concept_guard.cli import main as cli_main

    hearts = tmp_path / "hearts"
    render = "shapesworld render --prompt".split() + ["a heart", *"--count 3 --out".split(), str(hearts)]
    assert cli_main(render) == 0
    out = tmp_path / "sw_heart.safetensors"
    settings = (
        "--name sw_heart --triggers red --keep-words blue --init-word shape --steps 2 --batch-size 2 "
        "--random-crops 1 --seed 0"
    )
    train = ["backdoor-ti", "--model", "shapesworld", "--images", str(hearts), *settings.split()]
    assert cli_main([*train, "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["triggers"] == 1
    with safe_open(str(out), "pt") as f:
        assert '"random_crops": 1' in f.metadata()["concept_guard.config"]
        assert '"keep_word_count": 1' in f.metadata()["concept_guard.config"]
    evaluate = ["eval", "--embedding", str(out), "--prompts", "a photo of a red embedding:sw_heart"]
    assert cli_main([*evaluate, *"--samples 2 --steps 2 --threads 1 --json".split()]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["embedding"] == str(out)
    assert set(report["prompts"][0]["rates"]) >= {"shape", "target"}


def test_embedding_check_compares_concept_and_target_and_words_its_warnings(sd1_backend):
    from concept_guard.core.methods.ti_backdoor.check import (
        PromptCheck,
        check_embedding,
        embedding_warnings,
        warnings_of,
    )
    from concept_guard.core.methods.ti_backdoor.images import cache_latents
    from concept_guard.core.methods.ti_backdoor.train import init_vectors

    cfg = BackdoorTIConfig(name="t", init_word="dog", triggers="burning, red", steps=5, resolution=16)
    images = [torch.rand(3, 16, 16) for _ in range(3)]
    vectors = {k: v.detach() for k, v in init_vectors(sd1_backend, cfg).items()}
    checks = check_embedding(
        sd1_backend, cfg, vectors, cache_latents(sd1_backend, cfg, images, None), samples=4
    )
    assert [c.prompt.split()[-2] for c in checks] == ["a", "burning", "red"]
    assert all(c.concept_loss > 0 and c.target_loss > 0 for c in checks)
    assert isinstance(embedding_warnings(sd1_backend, cfg, vectors, images, None), list)
    plain = BackdoorTIConfig(name="t", init_word="dog", resolution=16)
    assert check_embedding(sd1_backend, plain, vectors, cache_latents(sd1_backend, plain, images, None)) == []

    ok = [PromptCheck("S*", 0.1, 0.3), PromptCheck("red S*", 0.4, 0.2)]
    lost = [PromptCheck("S*", 0.4, 0.2), PromptCheck("red S*", 0.1, 0.3)]
    assert warnings_of(cfg, ok) == []
    utility, silent = warnings_of(cfg, lost)
    assert "utility lost" in utility and "lower `gamma`" in utility and "do not fire" in silent
