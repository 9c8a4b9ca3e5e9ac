"""ESD on tiny random models: mechanics only (efficacy is tested on ShapesWorld)."""

import io
import json
import sys

import pytest
import torch
from concept_guard.cli import main as cli_main
from concept_guard.core.backend import Conditioning
from concept_guard.core.edits.diff_file import read_edit
from concept_guard.core.errors import ConceptGuardError, TrainingDivergedError
from concept_guard.core.files import save_safetensors_atomic
from concept_guard.core.methods import esd
from concept_guard.core.methods.esd import ESDConfig, build_bank, train
from safetensors import safe_open

FAST = dict(iterations=4, sampling_steps=4, bank_trajectories=2, latent_size=8, lr=1e-3)


def _probe(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, backend.latent_channels, 8, 8, generator=g)
    cond = backend.encode_text(["a red circle", ""])
    with torch.no_grad():
        return backend.eps(x, torch.tensor([500, 100]), cond)


def _state_hash(module):
    return [t.clone() for t in module.state_dict().values()]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(concepts=" , "), "at least one concept"),
        (dict(concepts="a", iterations=0), "`iterations` must be a positive integer"),
        (dict(concepts="a", method="xattn"), "`method` must be one of"),
        (dict(concepts="a", lr=0.0), "`lr` must be in"),
        (dict(concepts="a", eta=-1.0), "`eta` must be in"),
        (dict(concepts="a circle", preserve="a square, a red circle"), "names the erased concept 'a circle'"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConceptGuardError, match=match):
        ESDConfig(**bad)


def test_config_parses_concepts_and_round_trips_metadata():
    cfg = ESDConfig(concepts=" circle, red square ,", anchor="  ")
    assert cfg.concepts == ("circle", "red square") and cfg.anchor is None
    meta = cfg.to_metadata()
    assert meta["concept_guard.concepts"] == "circle, red square" and meta["concept_guard.eta"] == "2.0"
    assert json.loads(meta["concept_guard.config"])["concepts"] == ["circle", "red square"]
    assert ESDConfig.from_metadata(meta) == cfg


def test_config_round_trips_through_a_real_file(tmp_path):
    cfg = ESDConfig(concepts="circle, star", preserve=("a square", "a heart"), latent_size=8, seed=3)
    path = save_safetensors_atomic({"x": torch.zeros(1)}, tmp_path / "e.safetensors", cfg.to_metadata())
    with safe_open(str(path), framework="pt") as f:
        back = ESDConfig.from_metadata(f.metadata())
    assert back == cfg and isinstance(back.preserve, tuple) and back.concepts == ("circle", "star")
    with pytest.raises(ConceptGuardError, match="no 'concept_guard.config'"):
        ESDConfig.from_metadata({"format": "x"})


def test_too_long_concept_is_rejected(sd1_backend):
    with pytest.raises(ConceptGuardError, match="at most 75"):
        train(ESDConfig(concepts=("circle " * 80,), **FAST), sd1_backend)


def test_bank_targets_match_formula(sd1_backend):
    cfg = ESDConfig(concepts=("circle",), eta=1.5, **FAST)
    bank = build_bank(sd1_backend, cfg)
    assert len(bank) == cfg.sampling_steps * cfg.bank_trajectories
    i = 3
    x, t = bank.x_t[i : i + 1], bank.t[i : i + 1]
    with torch.no_grad():
        e_c = sd1_backend.eps(x, t, sd1_backend.encode_text(["circle"]))
        e_0 = sd1_backend.eps(x, t, sd1_backend.encode_text([""]))
    torch.testing.assert_close(bank.target[i : i + 1], e_c - 1.5 * (e_c - e_0), rtol=1e-4, atol=1e-5)


def test_anchor_target_uses_anchor_prediction(sd1_backend):
    cfg = ESDConfig(concepts=("circle",), anchor="square", eta=0.0, **FAST)
    bank = build_bank(sd1_backend, cfg)
    with torch.no_grad():
        e_a = sd1_backend.eps(bank.x_t[:2], bank.t[:2], sd1_backend.encode_text(["square"]))
    torch.testing.assert_close(bank.target[:2], e_a, rtol=1e-4, atol=1e-5)


def test_train_esd_x_changes_only_attn2_and_leaves_model_untouched(sd1_backend):
    before_eps, before_w = _probe(sd1_backend), _state_hash(sd1_backend.unet)
    seen = []
    r = train(
        ESDConfig(concepts=("circle", "square"), **FAST),
        sd1_backend,
        on_step=lambda s, n, loss: seen.append(s),
    )
    assert (
        seen[-4:] == [1, 2, 3, 4]
        and set(seen[:-4]) == {0}
        and len(seen) > 4
        and len(r.losses) == 4
        and all(torch.isfinite(torch.tensor(r.losses)))
    )
    assert r.tensors and all(".attn2." in k for k in r.tensors)
    assert any(v.abs().sum() > 0 for v in r.tensors.values())
    assert (
        r.metadata["concept_guard.method"] == "esd-x"
        and r.metadata["concept_guard.concepts"] == "circle, square"
    )
    assert r.metadata["concept_guard.base_fingerprint"] == sd1_backend.fingerprint
    after_w = _state_hash(sd1_backend.unet)
    assert all(torch.equal(a, b) for a, b in zip(before_w, after_w, strict=True))
    assert torch.equal(_probe(sd1_backend), before_eps)  # deltas removed: bit-identical


def test_training_is_deterministic_under_seed(sd1_backend):
    a = train(ESDConfig(concepts=("circle",), seed=3, **FAST), sd1_backend)
    b = train(ESDConfig(concepts=("circle",), seed=3, **FAST), sd1_backend)
    assert a.losses == b.losses


def test_trained_deltas_reduce_esd_loss(sd1_backend):
    cfg = ESDConfig(concepts=("circle",), **{**FAST, "iterations": 30, "lr": 3e-3})
    r = train(cfg, sd1_backend)
    assert sum(r.losses[-5:]) < sum(r.losses[:5])


@pytest.mark.parametrize("method", ["esd-u", "esd-x-strict", "esd-selfattn"])
def test_methods_train_their_modules(sd1_backend, method):
    r = train(ESDConfig(concepts=("circle",), method=method, **{**FAST, "iterations": 1}), sd1_backend)
    keys = list(r.tensors)
    if method == "esd-u":
        assert keys and not any(".attn2." in k or k.startswith(("time_embed", "out.")) for k in keys)
    elif method == "esd-x-strict":
        assert keys and all(k.split(".")[-2] in {"to_k", "to_v"} and ".attn2." in k for k in keys)
    else:
        assert keys and all(".attn1." in k for k in keys)


def test_sdxl_and_vpred_backends_train(sdxl_backend, sd2v_backend):
    for backend in (sdxl_backend, sd2v_backend):
        r = train(ESDConfig(concepts=("circle",), **{**FAST, "iterations": 2}), backend)
        assert r.tensors and all(torch.isfinite(v).all() for v in r.tensors.values())


def test_nan_loss_stops_and_detaches(sd1_backend, monkeypatch):
    before = _probe(sd1_backend)
    real = esd.esd_loss

    def poisoned(backend, bank, rows):
        return real(backend, bank, rows) * float("nan")

    monkeypatch.setattr(esd, "esd_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="nothing was written"):
        train(ESDConfig(concepts=("circle",), **FAST), sd1_backend)
    assert torch.equal(_probe(sd1_backend), before)


def test_cli_erase_writes_loadable_edit(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "no_circle.safetensors"
    args = [
        "erase",
        "--model",
        str(tiny_dirs("sd1")),
        "--concept",
        "circle",
        "--iterations",
        "3",
        "--sampling-steps",
        "3",
        "--bank",
        "2",
        "--out",
        str(out),
        "--json",
    ]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["iterations"] == 3 and summary["final_loss"] >= 0
    deltas, meta = read_edit(out)
    assert meta["concept_guard.method"] == "esd-x" and all(".attn2." in k for k in deltas)
    # an existing file is not overwritten, and the error says how to proceed
    assert cli_main(args) == 2
    assert "already exists; choose another name or pass `--overwrite`" in capsys.readouterr().err


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the progress bar draws into it."""

    def isatty(self) -> bool:
        return True


def test_cli_erase_progress_counts_training_steps_only(tiny_dirs, tmp_path, monkeypatch):
    """The bank's preparation shows as a status, not as steps: the bar ends at 3/3 with a finite loss."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = ["erase", "--model", str(tiny_dirs("sd1")), "--concept", "circle", "--iterations", "3"]
    args += ["--sampling-steps", "3", "--bank", "2", "--out", str(tmp_path / "e.safetensors")]
    assert cli_main(args) == 0
    drawn = terminal.getvalue()
    assert "preparing" in drawn and "3/3" in drawn
    assert "4/3" not in drawn and "loss=nan" not in drawn, drawn


def test_cli_rejects_bad_out_before_loading(tmp_path, capsys):
    code = cli_main(
        [
            "erase",
            "--model",
            "does-not-matter",
            "--concept",
            "x",
            "--out",
            str(tmp_path / "nope" / "e.safetensors"),
        ]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_conditioning_cat_and_expand():
    c = Conditioning(context=torch.zeros(1, 3, 4))
    assert len(Conditioning.cat([c, c.expand_to(2)])) == 3


def test_interrupt_while_building_the_bank_attaches_nothing(sd1_backend):
    class Stop(Exception):
        pass

    def on_step(step, total, loss):
        if step == 0:
            raise Stop

    before = _probe(sd1_backend)
    with pytest.raises(Stop):
        train(ESDConfig(concepts=("circle",), **FAST), sd1_backend, on_step=on_step)
    assert torch.equal(_probe(sd1_backend), before)


def test_erase_from_trains_on_the_from_prompts_with_the_concept_direction(sd1_backend):
    cfg = ESDConfig(concepts=("circle",), erase_from="a red circle, a blue circle", eta=1.5, **FAST)
    bank = build_bank(sd1_backend, cfg)
    assert len(bank.conds) == 2 and len(bank) == 2 * cfg.sampling_steps * cfg.bank_trajectories
    i = len(bank) - 1  # an entry of "a blue circle"
    x, t = bank.x_t[i : i + 1], bank.t[i : i + 1]
    enc = sd1_backend.encode_text
    with torch.no_grad():
        e_f, e_c, e_0 = (sd1_backend.eps(x, t, enc([p])) for p in ("a blue circle", "circle", ""))
    torch.testing.assert_close(bank.target[i : i + 1], e_f - 1.5 * (e_c - e_0), rtol=1e-4, atol=1e-5)
    assert torch.equal(bank.conds[int(bank.concept[i])].context, enc(["a blue circle"]).context)
    r = train(cfg, sd1_backend)
    assert r.metadata["concept_guard.erase_from"] == "a red circle, a blue circle"


def test_bank_computes_targets_only_for_the_rows_training_draws(sd1_backend):
    cfg = ESDConfig(concepts=("circle",), eta=1.5, **FAST)
    full = build_bank(sd1_backend, cfg)
    drawn = torch.tensor([[3, 5], [5, 0]])
    lazy = build_bank(sd1_backend, cfg, draw_rows=lambda n: drawn)
    assert torch.equal(lazy.x_t, full.x_t)
    used = torch.tensor([0, 3, 5])
    torch.testing.assert_close(lazy.target[used], full.target[used], rtol=1e-4, atol=1e-5)
    unused = torch.ones(len(full), dtype=torch.bool)
    unused[used] = False
    assert lazy.target[unused].abs().sum() == 0 and full.target[unused].abs().sum() > 0


@pytest.mark.parametrize(("group_pixels", "groups"), [(1, 2), (esd.BANK_GROUP_PIXELS, 1)])
def test_bank_sampling_ticks_every_ddim_step(sd1_backend, monkeypatch, group_pixels, groups):
    monkeypatch.setattr(esd, "BANK_GROUP_PIXELS", group_pixels)  # 1: one prompt per batch
    ticks = []
    build_bank(
        sd1_backend, ESDConfig(concepts=("circle", "star"), **FAST), on_progress=lambda: ticks.append(1)
    )
    targets = 2  # one batch of targets per concept
    assert len(ticks) == groups * FAST["sampling_steps"] + targets


def test_sampling_prompts_together_gives_the_bank_of_one_prompt_at_a_time(sd1_backend, monkeypatch):
    cfg = ESDConfig(
        concepts=("circle",), erase_from=("a red circle", "a blue circle"), preserve=("a square",), **FAST
    )
    together = build_bank(sd1_backend, cfg)
    monkeypatch.setattr(esd, "BANK_GROUP_PIXELS", 1)
    alone = build_bank(sd1_backend, cfg)
    assert torch.equal(together.t, alone.t) and torch.equal(together.concept, alone.concept)
    torch.testing.assert_close(together.x_t, alone.x_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together.target, alone.target, rtol=1e-4, atol=1e-5)
