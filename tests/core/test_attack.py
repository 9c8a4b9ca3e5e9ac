"""The attack harness on ShapesWorld: paraphrases and concept inversion, base beside edited."""

from __future__ import annotations

import json

import pytest
import torch
from concept_guard.cli import main as cli_main
from concept_guard.core.edits.diff_file import save_edit
from concept_guard.core.errors import ConceptGuardError
from concept_guard.shapesworld import load_shapesworld
from concept_guard.shapesworld.attack import AttackConfig, format_attacks, paraphrases, run_attacks


@pytest.fixture(scope="module")
def backend():
    return load_shapesworld()


def _zero_edit(backend) -> dict[str, torch.Tensor]:
    name = next(n for n in backend.unet_module_names() if n.endswith("attn2.to_v"))
    return {
        f"{name}.weight": torch.zeros(
            backend.unet.get_submodule(backend.keymap.to_diffusers(name)).weight.shape
        )
    }


def test_paraphrases_name_the_concept_in_new_wordings():
    circle = paraphrases("circle")
    assert "a disc" in circle and all("circle" in p or "disc" in p for p in circle)
    assert any("outlined" in p for p in paraphrases("outlined")) and paraphrases("red")
    with pytest.raises(ConceptGuardError, match="not a ShapesWorld label"):
        paraphrases("dog")


def test_a_zero_edit_is_attacked_exactly_like_the_base(backend):
    cfg = AttackConfig(samples=4, inversion_steps=2, images=2, prompt_steps=2)
    rows = run_attacks(backend, _zero_edit(backend), "circle", prompts=["a circle", "a disc"], cfg=cfg)
    attacks = ["paraphrase"] * 2 + ["concept inversion"] * 3
    assert [r["attack"] for r in rows] == [*attacks, "prompt search, continuous", "prompt search, discrete"]
    assert all(r["base"] == r["edited"] for r in rows)  # same seeds, same training: same samples
    assert rows[0]["base"] >= 0.5  # the base model draws circles
    found = rows[-1]["edited_found"]
    assert found == rows[-1]["base_found"] and found.endswith(" a circle") and "S*" not in found
    table = format_attacks(rows, "circle")
    assert "strongest attack" in table and f"model: {found!r}" in table


def test_cli_refuses_other_models_and_unknown_labels_before_any_work(tmp_path, capsys, backend):
    edit = save_edit(_zero_edit(backend), tmp_path / "e.safetensors", {}, dtype=torch.float32)
    assert cli_main(["attack", "--model", "x.safetensors", "--edit", str(edit), "--concept", "circle"]) == 2
    assert "only 'shapesworld'" in capsys.readouterr().err
    assert cli_main(["attack", "--edit", str(edit), "--concept", "dog"]) == 2
    assert "not a ShapesWorld label" in capsys.readouterr().err
    args = ["attack", "--edit", str(edit), "--concept", "circle", "--prompts", "a circle"]
    assert cli_main([*args, "--inversion-steps", "0", "--prompt-steps", "0", "--samples", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["prompt"] for r in rows] == ["a circle"]
    assert (
        cli_main([*args, "--inversion-steps", "0", "--prompt-steps", "0", "--samples", "2", "--no-base"]) == 0
    )
    table = capsys.readouterr().out
    assert "a circle" in table and "nan" in table  # the edited model only: no base column values
    rows = run_attacks(
        backend,
        _zero_edit(backend),
        "circle",
        prompts=["a circle"],
        cfg=AttackConfig(samples=2, inversion_steps=0, prompt_steps=0, reference=False),
    )
    assert list(rows[0]) == ["attack", "prompt", "edited"]
