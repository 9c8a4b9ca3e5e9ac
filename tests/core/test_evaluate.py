"""Evaluation harness: prompt sets, rates, summary, preservation, the JSON contract and the `eval` CLI."""

from __future__ import annotations

import json

import pytest
from concept_guard.cli import main as cli_main
from concept_guard.core.errors import ConceptGuardError
from concept_guard.shapesworld import world
from concept_guard.shapesworld.evaluate import (
    PROMPT_SETS,
    EvalConfig,
    evaluate,
    preservation,
    rates_of,
    resolve_prompts,
    summarize,
)
from PIL import Image


def _entry(prompt: str, shape: str, colour: str, rate: float) -> dict:
    labels = {
        "shape": [shape] * 4,
        "colour": [colour] * 4,
        "background": ["white"] * 4,
        "style": ["filled"] * 4,
        "target": [False] * 4,
    }
    rates = rates_of(labels)
    if rate < 1:  # move part of the mass off the named shape
        other = next(s for s in world.SHAPES if s != shape)
        rates["shape"][shape], rates["shape"][other] = rate, 1 - rate
    return {"prompt": prompt, "rates": rates}


def test_prompt_sets_and_resolution():
    assert len(PROMPT_SETS["baseline"]) >= 12
    assert {"shapes", "colours", "styles", "synonyms", "compositional"} <= set(PROMPT_SETS)
    assert resolve_prompts(None, "shapes") == list(PROMPT_SETS["shapes"])
    assert resolve_prompts([" a red circle "], None) == ["a red circle"]
    with pytest.raises(ConceptGuardError, match="either `--prompts"):
        resolve_prompts(["a"], "shapes")
    with pytest.raises(ConceptGuardError, match="Unknown prompt set 'nope'"):
        resolve_prompts(None, "nope")
    with pytest.raises(ConceptGuardError, match="non-empty"):
        resolve_prompts(["  "], None)


def test_rates_are_fractions_over_every_label():
    rates = rates_of(
        {
            "shape": ["circle", "circle", "star", "heart"],
            "colour": ["red"] * 4,
            "background": ["gray"] * 4,
            "style": ["outlined"] * 4,
            "target": [True, False, False, False],
        }
    )
    assert rates["shape"] == {"circle": 0.5, "square": 0.0, "triangle": 0.0, "star": 0.25, "heart": 0.25}
    assert list(rates["colour"]) == list(world.COLOURS) and rates["target"] == 0.25


def test_summary_averages_named_labels_and_synonyms():
    entries = [
        _entry("a red circle", "circle", "red", 1.0),
        _entry("a crimson disc", "circle", "red", 0.5),
        _entry("a green star", "star", "blue", 1.0),
    ]
    s = summarize(entries)
    assert s["shape_match"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-4)
    assert s["colour_match"] == pytest.approx(2 / 3, abs=1e-4)  # the green star came out blue
    assert s["synonym_match"] == pytest.approx((0.5 + 1.0) / 2)  # disc -> circle 0.5, crimson -> red 1.0
    assert s["background_match"] is None and s["target_rate"] == 0.0


def test_preservation_table():
    base = {
        "prompts": [_entry("a red circle", "circle", "red", 1.0), _entry("a blue star", "star", "blue", 1.0)]
    }
    now = {
        "prompts": [_entry("a red circle", "circle", "red", 0.25), _entry("a blue star", "star", "blue", 1.0)]
    }
    rows = preservation(now, base, prompts=["a red circle"])
    assert {(r["head"], r["change"]) for r in rows} == {("shape", -0.75), ("colour", 0.0)}


def test_config_checks():
    with pytest.raises(ConceptGuardError, match=r"`samples` must be in \[1, 4096\], got 0"):
        EvalConfig(samples=0)


def test_evaluate_returns_the_json_contract(sd1_backend):
    cfg = EvalConfig(samples=3, steps=2, seed=4)
    report = evaluate(sd1_backend, ["a red circle", "a crimson disc"], cfg, model_name="tiny")
    assert set(report) == {"model", "edit", "embedding", "samples_per_prompt", "prompts", "summary"}
    assert report["samples_per_prompt"] == 3 and report["edit"] is None and report["embedding"] is None
    first = report["prompts"][0]
    assert first["prompt"] == "a red circle"
    assert set(first["rates"]) == {"shape", "colour", "background", "style", "target"}
    assert sum(first["rates"]["shape"].values()) == pytest.approx(1.0)
    json.dumps(report)  # serialisable as is
    again = evaluate(sd1_backend, ["a red circle", "a crimson disc"], cfg, model_name="tiny")
    assert again["prompts"] == report["prompts"]  # seeded


def test_eval_cli_json_and_grid(tiny_dirs, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    code = cli_main(
        [
            "eval",
            "--model",
            str(tiny_dirs("sd1")),
            "--prompts",
            "a red circle",
            "a blue star",
            "--samples",
            "2",
            "--steps",
            "2",
            "--json",
            "--grid",
            str(grid),
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["prompt"] for p in report["prompts"]] == ["a red circle", "a blue star"]
    assert report["samples_per_prompt"] == 2
    assert Image.open(grid).size[1] >= 2 * 16


def test_eval_cli_table_and_errors(tiny_dirs, capsys):
    assert (
        cli_main(
            [
                "eval",
                "--model",
                str(tiny_dirs("sd1")),
                "--prompts",
                "a red circle",
                "--samples",
                "1",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("prompt") and "summary:" in out
    assert cli_main(["eval", "--model", str(tiny_dirs("sd1")), "--samples", "1"]) == 2
    assert "--prompt-set NAME" in capsys.readouterr().err
