"""Model-aware defaults: each family gets its official scripts' values; the bundled ShapesWorld its recipe."""

from __future__ import annotations

import pytest
from concept_guard.core.methods.esd import ESDConfig
from concept_guard.presets import ESD_DEFAULTS, describe, esd_settings, model_family
from concept_guard.shapesworld import load_shapesworld, shapesworld_fingerprint
from concept_guard.shapesworld.recipes import DEMO_ESD, shapesworld_recipe


@pytest.fixture(scope="module")
def shapesworld():
    return load_shapesworld()


def test_the_bundled_model_is_recognised_by_its_weights(shapesworld, sd1_backend, sdxl_backend):
    assert shapesworld.fingerprint == shapesworld_fingerprint()
    assert model_family(shapesworld) == "shapesworld"
    assert (model_family(sd1_backend), model_family(sdxl_backend)) == ("sd1", "sdxl")


def test_shapesworld_auto_settings_are_the_measured_recipe(shapesworld):
    settings = esd_settings(shapesworld, "circle", {"method": None, "eta": None, "preserve": ""})
    assert ESDConfig(**settings) == ESDConfig(**shapesworld_recipe("circle"), **DEMO_ESD)
    assert "ShapesWorld" in describe(shapesworld, settings, ("method", "iterations"))


def test_given_values_win_over_auto(shapesworld):
    settings = esd_settings(shapesworld, "circle", {"iterations": 7, "preserve": "a square, a star"})
    assert settings["iterations"] == 7 and settings["preserve"] == "a square, a star"
    assert ESDConfig(**settings).preserve == ("a square", "a star")


def test_sd_families_get_the_official_scripts_values(sd1_backend, sdxl_backend):
    sd1 = ESDConfig(**esd_settings(sd1_backend, "a dog", {}))
    sdxl = ESDConfig(**esd_settings(sdxl_backend, "a dog", {}))
    assert (sd1.method, sd1.eta, sd1.iterations, sd1.lr, sd1.guidance) == ("esd-x", 2.0, 200, 5e-5, 3.0)
    assert (sdxl.eta, sdxl.lr, sdxl.guidance) == (1.0, 2e-4, 2.0)
    assert sd1.concepts == ("a dog",) and not sd1.preserve  # no recipe prompts outside ShapesWorld
    assert set(ESD_DEFAULTS) == {"sd1", "sd2", "sdxl", "shapesworld"}


def test_closed_form_auto_on_shapesworld_erases_the_models_own_wordings(shapesworld):
    from concept_guard.core.methods.uce import UCEConfig
    from concept_guard.presets import uce_settings
    from concept_guard.shapesworld import world

    cfg = UCEConfig(**uce_settings(shapesworld, "circle", {}))
    assert set(shapesworld_recipe("circle")["erase_from"]) < set(cfg.erase_from)
    assert any("disc" in p for p in cfg.erase_from)  # the synonym, in the model's own captions
    assert all(world.parse_prompt(p)["shape"] == "circle" for p in cfg.erase_from)
    assert all(world.parse_prompt(p)["shape"] != "circle" for p in cfg.preserve if p)
    # a colour has no recipe: auto leaves the prompts to the user instead of failing
    assert UCEConfig(**uce_settings(shapesworld, "red", {})).erase_from == ()
