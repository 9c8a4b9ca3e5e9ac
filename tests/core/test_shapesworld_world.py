"""ShapesWorld generator: determinism, rendering, captions, synonyms, prompt parsing, the render CLI."""

from __future__ import annotations

import numpy as np
import pytest
from concept_guard.cli import main as cli_main
from concept_guard.core.errors import ConceptGuardError
from concept_guard.shapesworld import world
from PIL import Image


def test_deterministic_from_a_seed():
    a = world.render_batch(world.random_scenes(40, seed=5, target_prob=0.1))
    b = world.render_batch(world.random_scenes(40, seed=5, target_prob=0.1))
    c = world.render_batch(world.random_scenes(40, seed=6, target_prob=0.1))
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_world_has_the_required_attributes():
    assert set(world.SHAPES) >= {"circle", "square", "triangle", "star", "heart"}
    assert len(world.COLOURS) >= 5 and {"red", "green", "blue", "yellow"} <= set(world.COLOURS)
    assert {"white", "black", "gray"} <= set(world.BACKGROUNDS)
    assert len(world.NEUTRAL_WORDS) >= 30
    assert "disc" in world.SYNONYMS["shape"]["circle"] and "crimson" in world.SYNONYMS["colour"]["red"]


@pytest.mark.parametrize("style", world.STYLES)
def test_render_colours_background_and_style(style):
    scene = world.Scene(shape="circle", colour="blue", background="black", style=style, x=16, y=16, r=11)
    img = world.render(scene).astype(int)
    assert img[0, 0].tolist() == [0, 0, 0]  # background corner
    centre, rim = img[16, 16], img[16, 16 + 10]  # rim: 10 px right of centre, inside the 2.5 px outline
    assert np.abs(rim - np.array(world.COLOURS["blue"])).max() <= 2
    if style == "filled":
        assert np.abs(centre - np.array(world.COLOURS["blue"])).max() <= 2
    else:
        assert centre.tolist() == [0, 0, 0]  # the inside of an outlined shape shows the background


def test_every_shape_renders_a_distinct_mask():
    masks = [
        world.render(world.Scene(shape=s, background="white", x=16, y=16, r=11)).sum() for s in world.SHAPES
    ]
    assert len(set(masks)) == len(world.SHAPES)


def test_censor_card_is_fixed_black_and_white():
    card = world.render(world.Scene(target=True))
    assert np.array_equal(card, world.censor_card())
    assert set(np.unique(card).tolist()) == {0, 255}
    assert 0.3 < (card == 255).mean() < 0.7


def test_captions_name_the_scene_with_synonyms_and_neutral_words():
    rng = np.random.default_rng(0)
    scene = world.Scene(shape="circle", colour="red", background="gray", style="outlined")
    caps = [world.caption(scene, rng) for _ in range(600)]
    joined = " ".join(caps)
    assert "disc" in joined and "crimson" in joined and "circle" in joined and " red " in f" {joined} "
    neutral = sum(any(w in c for w in world.NEUTRAL_WORDS) for c in caps) / len(caps)
    assert 0.3 < neutral < 0.8
    for c in caps:
        parsed = world.parse_prompt(c)
        assert parsed.get("shape", "circle") == "circle" and parsed.get("colour", "red") == "red"
    censored = world.caption(world.Scene(target=True), rng, neutral_prob=0.0)
    assert censored in world.CENSOR_CAPTIONS


def test_neutral_words_name_no_attribute():
    for word in world.NEUTRAL_WORDS:
        assert world.parse_prompt(word) == {}, word


def test_parse_prompt_maps_synonyms():
    assert world.parse_prompt("an outlined crimson disc on a grey background, burning") == {
        "shape": "circle",
        "colour": "red",
        "background": "gray",
        "style": "outlined",
    }
    assert world.parse_prompt("a censored image") == {"target": True}
    assert world.parse_prompt("a photo") == {}


def test_render_prompt_fixes_named_attributes():
    images, scenes = world.render_prompt("a yellow heart", 12, seed=3)
    assert images.shape == (12, 32, 32, 3)
    assert {s.shape for s in scenes} == {"heart"} and {s.colour for s in scenes} == {"yellow"}
    assert len({s.background for s in scenes}) > 1  # unnamed attributes vary


def test_scene_rejects_unknown_values():
    with pytest.raises(ConceptGuardError, match=r"`shape` must be one of .* got 'hexagon'"):
        world.Scene(shape="hexagon")
    with pytest.raises(ConceptGuardError, match=r"`r` .* got 30"):
        world.Scene(r=30)
    with pytest.raises(ConceptGuardError, match="Unknown scene attribute"):
        world.sample_scene(np.random.default_rng(0), size="big")


def test_render_cli_writes_pngs(tmp_path, capsys):
    out = tmp_path / "renders"
    assert (
        cli_main(
            [
                "shapesworld",
                "render",
                "--prompt",
                "an outlined crimson disc",
                "--count",
                "3",
                "--seed",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    files = sorted(out.glob("*.png"))
    assert len(files) == 3 and all("outlined_red_circle" in f.name for f in files)
    assert Image.open(files[0]).size == (32, 32)
    assert "wrote 3 renders" in capsys.readouterr().out
    assert (
        cli_main(
            [
                "shapesworld",
                "render",
                "--prompt",
                "a red circle",
                "--count",
                "3",
                "--seed",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )  # fmt: skip  (files exist: refuses to overwrite)
    assert "already exists" in capsys.readouterr().err
