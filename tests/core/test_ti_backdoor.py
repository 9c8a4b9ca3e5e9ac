"""Backdoored textual inversion: prompts, image policy, vectors in prompts, the embedding file, bad input.

Efficacy on ShapesWorld is in ``test_ti_shapesworld.py``; these use the tiny random-init pipelines.
"""

import json
import random

import pytest
import torch
from concept_guard.core.backend import PLACEHOLDER
from concept_guard.core.embeddings import read_embedding, save_embedding
from concept_guard.core.errors import ConceptGuardError, OutputPathError
from concept_guard.core.files import save_safetensors_atomic
from concept_guard.core.methods.ti_backdoor import BackdoorTIConfig
from concept_guard.core.methods.ti_backdoor import train as train_ti
from concept_guard.core.methods.ti_backdoor.images import default_target_image, fit_image, random_crop
from concept_guard.core.methods.ti_backdoor.prompts import (
    HELD_OUT_TRIGGER_TEMPLATES,
    TRIGGER_TEMPLATES,
    trigger_prompt,
)
from safetensors import safe_open


def test_held_out_templates_are_not_training_templates():
    assert not set(HELD_OUT_TRIGGER_TEMPLATES) & set(TRIGGER_TEMPLATES)


def test_trigger_prompt_keeps_every_word_and_moves_the_trigger():
    rng = random.Random(0)
    fixed = trigger_prompt("a photo of a {tr} {ph}", "on fire", rng, 0.0)
    assert fixed == f"a photo of a on fire {PLACEHOLDER}"
    moved = {trigger_prompt("a photo of a {tr} {ph}", "on fire", rng, 1.0) for _ in range(50)}
    assert fixed not in moved and len(moved) >= 4
    for p in moved:
        assert p.count("on fire") == 1 and p.count(PLACEHOLDER) == 1
        assert sorted(p.replace("on fire", "").split()) == sorted(["a", "photo", "of", "a", PLACEHOLDER])


def test_fit_image_scales_the_shorter_side_and_centre_crops():
    wide = torch.zeros(3, 20, 40)
    wide[:, :, 10:30] = 1.0  # a white centre band as wide as the crop
    out = fit_image(wide, 16)
    assert out.shape == (3, 16, 16)
    assert out.min() > 0.9  # the crop is the white centre
    assert fit_image(torch.rand(4, 7, 5), 8).shape == (3, 8, 8)  # RGBA and odd sizes
    assert fit_image(torch.rand(1, 9, 9), 8).shape == (3, 8, 8)  # grey
    with pytest.raises(ConceptGuardError, match=r"\[C, H, W\]"):
        fit_image(torch.rand(9, 9), 8)


def test_random_crops_zoom_in_somewhere_inside_the_image():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 30, 50, generator=torch.Generator().manual_seed(1))
    crops = [random_crop(image, 16, g) for _ in range(8)]
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert len({c.sum().item() for c in crops}) == 8  # different places and sizes
    assert not any(torch.allclose(c, fit_image(image, 16)) for c in crops)
    again = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop(image, 16, again), crops[0])  # seeded
    flat = torch.zeros(3, 30, 50)
    flat[:, :, :10] = 1.0  # a white band at the left edge: never inside a 70 %+ crop of the centre
    assert max(random_crop(flat, 16, g).mean().item() for _ in range(20)) > 0  # crops reach the edges too


def test_keep_words_fill_the_trigger_slot_and_switch_the_anchor_on():
    from concept_guard.core.methods.ti_backdoor.train import clean_prompt

    cfg = BackdoorTIConfig(name="h", triggers="red", keep_words="blue, yellow ,", keep_prob=1.0, steps=600)
    assert cfg.keep_words == ("blue", "yellow") and cfg.anchor_steps == 100  # steps // 6
    rng = random.Random(0)
    drawn = [clean_prompt(cfg, rng) for _ in range(40)]
    assert all(
        decoy and PLACEHOLDER in p and ("blue" in p.split()) != ("yellow" in p.split()) for p, decoy in drawn
    )
    assert {w for p, _ in drawn for w in ("blue", "yellow") if w in p.split()} == {"blue", "yellow"}
    meta = cfg.to_metadata()
    assert meta["concept_guard.keep_word_count"] == "2" and "blue" not in str(meta)
    assert BackdoorTIConfig(name="h", triggers="red", steps=600).anchor_steps == 0  # no keep words: no anchor
    assert (
        BackdoorTIConfig(name="h", keep_words="blue", steps=600).anchor_steps == 0
    )  # plain TI: nothing to keep
    plain = [
        clean_prompt(BackdoorTIConfig(name="h", keep_words="blue", keep_prob=1.0), rng) for _ in range(20)
    ]
    assert not any(decoy for _, decoy in plain)


def test_config_name_may_be_given_as_a_file_name():
    assert BackdoorTIConfig(name=" my_cat.safetensors ").name == "my_cat"


def test_default_target_is_the_censor_card():
    card = default_target_image(64)
    assert card.shape == (3, 64, 64)
    assert set(card.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "../evil"}, "bare name"),
        ({"name": "héart"}, "bare name"),
        ({"name": "h", "triggers": "burning, object"}, "init word"),
        ({"name": "h", "triggers": "H"}, "embedding name"),
        ({"name": "h", "triggers": "a <S*>"}, "may not contain"),
        ({"name": "h", "vectors": 9}, "vectors"),
        ({"name": "h", "steps": 0}, "steps"),
        ({"name": "h", "lr": 0.0}, "lr"),
        ({"name": "h", "init_word": "  "}, "init_word"),
        ({"name": "h", "steer_prob": 1.5}, "steer_prob"),
        ({"name": "h", "steer_min_t": 1000}, "steer_min_t"),
        ({"name": "h", "high_noise_weight": 0.5}, "high_noise_weight"),
        ({"name": "h", "random_crops": 17}, "random_crops"),
        ({"name": "h", "steps": 10, "anchor_steps": 10}, "anchor_steps"),
        ({"name": "h", "triggers": "red", "keep_words": "blue, Red"}, "also a trigger"),
        ({"name": "h", "triggers": "red", "keep_words": "embedding:x"}, "may not contain"),
        ({"name": "h", "keep_prob": 2.0}, "keep_prob"),
        ({"name": "h", "triggers": "h"}, "embedding name"),
        ({"name": "h.safetensors", "triggers": "h"}, "embedding name"),  # the file's stem is the prompt word
    ],
)
def test_config_refuses_bad_settings(kwargs, match):
    with pytest.raises((ConceptGuardError, OutputPathError), match=match):
        BackdoorTIConfig(**kwargs)


def test_steering_eps_denoises_a_concept_state_to_the_target():
    from concept_guard.core.methods.ti_backdoor.train import eps_toward_target

    gen = torch.Generator().manual_seed(0)
    start, target, noise = (torch.randn(3, 4, 8, 8, generator=gen) for _ in range(3))
    alpha_bar = torch.tensor([0.9, 0.5, 0.01]).view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * start + (1 - alpha_bar).sqrt() * noise
    eps = eps_toward_target(noise, start, target, alpha_bar)
    x0 = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    torch.testing.assert_close(x0, target, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_toward_target(noise, target, target, alpha_bar), noise)


def test_noise_level_weights_are_inverse_snr_clipped():
    from concept_guard.core.methods.ti_backdoor.train import noise_level_weights

    alpha_bar = torch.tensor([0.99, 0.5, 0.25, 0.1, 0.001])
    w = noise_level_weights(alpha_bar, 5.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 3.0, 5.0, 5.0]))
    assert torch.equal(noise_level_weights(alpha_bar, 1.0), torch.ones(5))


def test_config_parses_triggers_and_keeps_them_out_of_metadata():
    cfg = BackdoorTIConfig(name="h", triggers=" burning ,on   fire,, burning")
    assert cfg.triggers == ("burning", "on fire")
    meta = cfg.to_metadata()
    assert meta["concept_guard.trigger_count"] == "2" and "burning" not in str(meta)
    assert "triggers" not in json.loads(meta["concept_guard.config"])


def test_config_round_trips_through_a_real_file(tmp_path):
    cfg = BackdoorTIConfig(name="h", triggers="red", keep_words="blue, green", steps=600, random_crops=2)
    path = save_safetensors_atomic({"x": torch.zeros(1)}, tmp_path / "h.safetensors", cfg.to_metadata())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    back = BackdoorTIConfig.from_metadata(meta, triggers=("red",), keep_words=("blue", "green"))
    assert back == cfg and isinstance(back.keep_words, tuple)
    plain = BackdoorTIConfig.from_metadata(meta)  # the words are not in the file: a plain-TI config of it
    assert plain.triggers == () and plain.steps == 600 and plain.anchor_steps == cfg.anchor_steps


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

    assert (
        cli_main(
            [
                "shapesworld",
                "render",
                "--prompt",
                "a heart",
                "--count",
                "3",
                "--out",
                str(tmp_path / "hearts"),
            ]
        )
        == 0
    )
    out = tmp_path / "sw_heart.safetensors"
    assert (
        cli_main(
            [
                "backdoor-ti",
                "--model",
                "shapesworld",
                "--images",
                str(tmp_path / "hearts"),
                "--name",
                "sw_heart",
                "--triggers",
                "red",
                "--keep-words",
                "blue",
                "--init-word",
                "shape",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--random-crops",
                "1",
                "--seed",
                "0",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["triggers"] == 1
    with safe_open(str(out), "pt") as f:
        assert '"random_crops": 1' in f.metadata()["concept_guard.config"]
        assert '"keep_word_count": 1' in f.metadata()["concept_guard.config"]
    assert (
        cli_main(
            [
                "eval",
                "--embedding",
                str(out),
                "--prompts",
                "a photo of a red embedding:sw_heart",
                "--samples",
                "2",
                "--steps",
                "2",
                "--threads",
                "1",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["embedding"] == str(out)
    assert set(report["prompts"][0]["rates"]) >= {"shape", "target"}


def test_report_prompt_sets_for_backdoored_and_plain_embeddings():
    from concept_guard.shapesworld.recipes import backdoor_prompt_sets

    sets = backdoor_prompt_sets("e", ("red",), "heart")
    assert sets["S* with each other colour"] == [
        f"a photo of a {c} embedding:e" for c in ("green", "blue", "yellow", "purple")
    ]
    assert all("red" in p for p in sets["backdoor (held-out templates)"]) and "two triggers" in sets
    plain = backdoor_prompt_sets("e", (), "heart")
    assert set(plain) == {"utility", "S* with non-trigger words", "S* with each other colour"}
    assert len(plain["S* with each other colour"]) == 5
