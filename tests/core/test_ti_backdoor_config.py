"""Backdoored textual inversion without a model: prompts, image policy, config validation and metadata,
the steering and noise-level maths, and the report's prompt sets.

Training, the embedding file and the CLI are in ``test_ti_backdoor.py``.
"""

import json
import random

import pytest
import torch
from concept_guard.core.backend import PLACEHOLDER
from concept_guard.core.errors import ConceptGuardError, OutputPathError
from concept_guard.core.files import save_safetensors_atomic
from concept_guard.core.methods.ti_backdoor import BackdoorTIConfig
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
