"""Closed-form erasure (UCE/RECE) on tiny random models: the solve and its mechanics (efficacy: ShapesWorld)."""

import json

import pytest
import torch
from concept_guard.cli import main as cli_main
from concept_guard.core.edits.diff_file import attach_edit, read_edit
from concept_guard.core.errors import ConceptGuardError
from concept_guard.core.methods.uce import UCE_MODULES, UCEConfig, erase_map, train


def _rows(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_erase_map_solves_the_uce_objective():
    """M minimises s_e‖Mc−a‖² + s_p‖Mp−p‖² + λ‖M−I‖² (per output: W M is the UCE solution for every W)."""
    c, a, p = _rows(5, 12, 0), _rows(5, 12, 1), _rows(4, 12, 2)
    m = erase_map(c, a, p, erase_scale=2.0, preserve_scale=0.5, lamb=0.3)
    eye = torch.eye(12, dtype=torch.float64)
    m_var = m.clone().requires_grad_(True)
    loss = 2.0 * ((c @ m_var.T - a) ** 2).sum() + 0.5 * ((p @ m_var.T - p) ** 2).sum()
    loss = loss + 0.3 * ((m_var - eye) ** 2).sum()
    loss.backward()
    assert m_var.grad.abs().max() < 1e-8  # a stationary point of a convex objective: the minimum
    # and nothing to erase leaves the weights as they are
    empty = c[:0]
    assert torch.allclose(erase_map(empty, empty, p, erase_scale=1, preserve_scale=1, lamb=0.5), eye)


def test_small_lamb_maps_erased_rows_onto_their_targets_and_keeps_preserved_ones():
    c, a, p = _rows(3, 16, 3), _rows(3, 16, 4), _rows(5, 16, 5)
    m = erase_map(c, a, p, erase_scale=1.0, preserve_scale=1.0, lamb=1e-6)
    assert torch.allclose(c @ m.T, a, atol=1e-4) and torch.allclose(p @ m.T, p, atol=1e-4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(concepts=" , "), "at least one concept"),
        (dict(concepts="circle", method="esd-x"), "`method` must be one of"),
        (dict(concepts="circle", lamb=0.0), "`lamb` must be in"),
        (dict(concepts="circle", rounds=-1), "`rounds` must be"),
        (dict(concepts="circle", eta=-1.0), "`eta` must be in"),
        (dict(concepts="circle", preserve="a square, a red circle"), "names the erased concept 'circle'"),
        (dict(concepts="van gogh", preserve="a painting by Van Gogh"), "names the erased concept"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConceptGuardError, match=match):
        UCEConfig(**bad)


def test_preserve_may_share_letters_but_not_the_concept():
    UCEConfig(concepts="cat", preserve="a caterpillar, a category")  # no whole-word match: accepted


def _key_outputs(backend, prompt):
    """What the first cross-attention's to_k makes of a prompt's last word and the tokens after it."""
    name = UCE_MODULES.select(backend.unet_module_names())[0]
    w = backend.unet_weight(name).double()
    ctx = backend.encode_text([prompt]).context[0].double()
    return ctx[backend.count_tokens(prompt) :] @ w.T, name


def test_uce_edits_only_kv_projections_leaves_the_base_and_erases(sd1_backend):
    before = {k: v.clone() for k, v in sd1_backend.unet.state_dict().items()}
    cfg = UCEConfig(concepts="circle", preserve="a square, a star", lamb=1e-3)
    result = train(cfg, sd1_backend)
    assert result.tensors and all(
        k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in result.tensors
    )
    assert len(result.tensors) == len(UCE_MODULES.select(sd1_backend.unet_module_names()))
    after = sd1_backend.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # only read
    circle, name = _key_outputs(sd1_backend, "circle")
    empty, _ = _key_outputs(sd1_backend, "")
    square, _ = _key_outputs(sd1_backend, "a square")
    with attach_edit(sd1_backend, result.tensors):
        w_edit = sd1_backend.unet_weight(name).double()  # the attached delta is not in the base weight…
        assert torch.allclose(w_edit, sd1_backend.unet_weight(name).double())
    delta = result.tensors[f"{name}.weight"].double()
    ctx = sd1_backend.encode_text(["circle", "a square"]).context.double()
    new_circle = ctx[0, sd1_backend.count_tokens("circle") :] @ (w_edit + delta).T
    new_square = ctx[1, sd1_backend.count_tokens("a square") :] @ (w_edit + delta).T
    n = new_circle.shape[0]
    moved = (circle - empty[:n]).norm()
    assert (new_circle - empty[:n]).norm() < 0.5 * moved  # circle now reads close to the empty prompt
    assert (new_square - square).norm() < 0.5 * moved  # the preserved prompt reads as before
    meta = result.metadata
    assert meta["concept_guard.method"] == "uce" and UCEConfig.from_metadata(meta) == cfg
    assert meta["concept_guard.base_fingerprint"] == sd1_backend.fingerprint


def test_rece_adds_rounds_and_shrinks_what_brings_the_concept_back(sd1_backend):
    uce = train(UCEConfig(concepts="circle", preserve="a square"), sd1_backend)
    rece = train(UCEConfig(concepts="circle", preserve="a square", method="rece", rounds=2), sd1_backend)
    assert len(uce.losses) == 1 and len(rece.losses) == 3
    assert not torch.allclose(uce.tensors[next(iter(uce.tensors))], rece.tensors[next(iter(uce.tensors))])
    assert all(torch.isfinite(t).all() for t in rece.tensors.values())


def test_solve_is_deterministic_and_works_on_sdxl_and_vpred(sd1_backend, sdxl_backend, sd2v_backend):
    a = train(UCEConfig(concepts="circle"), sd1_backend).tensors
    b = train(UCEConfig(concepts="circle"), sd1_backend).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    for backend in (sdxl_backend, sd2v_backend):
        result = train(UCEConfig(concepts="circle", preserve="a square", method="rece", rounds=1), backend)
        assert result.tensors and all(torch.isfinite(t).all() for t in result.tensors.values())


def test_a_unet_without_cross_attention_is_refused_in_one_line():
    from concept_guard.core.errors import NoMatchingModulesError

    names = ["input_blocks.1.1.transformer_blocks.0.attn1.to_k", "out.2"]
    with pytest.raises(NoMatchingModulesError, match="No UNet module matched include=.*attn2.to_k"):
        UCE_MODULES.select(names)


def test_too_long_prompt_is_rejected(sd1_backend):
    with pytest.raises(ConceptGuardError, match="at most 75"):
        train(UCEConfig(concepts="circle", preserve=("square " * 80,)), sd1_backend)


def test_cli_erase_uce_writes_a_loadable_kv_edit(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "no_circle.safetensors"
    args = ["erase", "--model", str(tiny_dirs("sd1")), "--concept", "circle", "--method", "rece"]
    args += ["--preserve", "a square", "--rounds", "2", "--out", str(out), "--json"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["solve_seconds"] < 60 and summary["residual"] >= 0
    assert set(summary["concept_score"]) == {"erased", "kept"}
    deltas, meta = read_edit(out)
    assert meta["concept_guard.method"] == "rece" and all(
        k.endswith(("to_k.weight", "to_v.weight")) for k in deltas
    )
    assert UCEConfig.from_metadata(meta).rounds == 2
    assert cli_main(args) == 2  # an existing file is kept
    assert "pass `--overwrite`" in capsys.readouterr().err


def test_cli_refuses_a_preserve_list_naming_the_concept_before_loading(tmp_path, capsys):
    args = ["erase", "--model", "not-loaded", "--concept", "circle", "--method", "uce"]
    args += ["--preserve", "a blue circle", "--out", str(tmp_path / "e.safetensors")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "names the erased concept" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e.safetensors").exists()
