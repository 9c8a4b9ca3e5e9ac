"""SafeGen on tiny random models: mechanics only (efficacy is measured on ShapesWorld)."""

import json

import pytest
import torch
from concept_guard.cli import main as cli_main
from concept_guard.core.edits.diff_file import read_edit
from concept_guard.core.errors import ConceptGuardError, NoMatchingModulesError, TrainingDivergedError
from concept_guard.core.methods import safegen
from concept_guard.core.methods.safegen import SafeGenConfig, mosaic_target, pixelate, prepare_images, train
from PIL import Image
from safetensors import safe_open

FAST = dict(steps=3, batch_size=2, mosaic_block=16, benign_samples=2, resolution=64, lr=1e-3)


def _images(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _probe(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, backend.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        return backend.eps(x, torch.tensor([500, 100]), backend.encode_text(["a red circle", ""]))


def test_pixelate_averages_cells_edges_and_mask():
    x = _images(2, 20)
    y = pixelate(x, 8)
    assert torch.allclose(y[0, :, :8, :8], x[0, :, :8, :8].mean((1, 2))[:, None, None])
    assert torch.allclose(y[1, :, 16:, 16:], x[1, :, 16:, 16:].mean((1, 2))[:, None, None])  # 4×4 edge cell
    mask = torch.zeros(20, 20)
    mask[:8, :8] = 1
    z = pixelate(x, 8, mask)
    assert torch.equal(z[:, :, 10:, 10:], x[:, :, 10:, 10:]) and torch.allclose(
        z[:, :, :8, :8], y[:, :, :8, :8]
    )
    with pytest.raises(ConceptGuardError, match="mask is \\(4, 4\\) pixels but the images are \\(20, 20\\)"):
        pixelate(x, 8, torch.ones(4, 4))
    with pytest.raises(ConceptGuardError, match="`mosaic_block` must be >= 1"):
        pixelate(x, 0)


def test_exact_target_denoises_to_the_mosaic():
    """With the "exact" target, one DDIM x0-prediction from x_t^s lands on the mosaic's latent."""
    g = torch.Generator().manual_seed(1)
    z_s, z_m, eps = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    ac = torch.tensor([0.9, 0.5, 0.05])
    x_t = ac.sqrt().view(-1, 1, 1, 1) * z_s + (1 - ac).sqrt().view(-1, 1, 1, 1) * eps
    target = mosaic_target(SafeGenConfig(target="exact"), z_s, z_m, eps, ac)
    x0 = (x_t - (1 - ac).sqrt().view(-1, 1, 1, 1) * target) / ac.sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(x0, z_m, atol=1e-4)
    assert torch.allclose(mosaic_target(SafeGenConfig(target="paper"), z_s, z_m, eps, ac), z_s - z_m + eps)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(steps=0), "`steps` must be a positive integer"),
        (dict(mosaic_block=0), "`mosaic_block` must be a positive integer"),
        (dict(target="blur"), "`target` must be one of"),
        (dict(preserve_target="x"), "`preserve_target` must be one of"),
        (dict(lr=2.0), "`lr` must be in"),
        (dict(max_timestep=0), "`max_timestep` must be in"),
        (dict(weight_mosaic=-1.0), "`weight_mosaic` and `weight_preserve`"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConceptGuardError, match=match):
        SafeGenConfig(**bad)


def test_config_round_trips_metadata():
    cfg = SafeGenConfig(benign_prompts="a dog, a cat", mosaic_block=8, target="exact")
    assert cfg.benign_prompts == ("a dog", "a cat") and SafeGenConfig(benign_prompts="").benign_prompts == (
        "",
    )
    assert SafeGenConfig.from_metadata(cfg.to_metadata()) == cfg


def test_prepare_images_resizes_mixed_sizes_and_checks_masks():
    images = [torch.rand(3, 48, 64), torch.rand(3, 64, 64)]
    x, m = prepare_images(images, None, 32, 8)
    assert x.shape == m.shape == (2, 3, 32, 32)
    with pytest.raises(ConceptGuardError, match="No images of the concept"):
        prepare_images([], None, 32, 8)
    with pytest.raises(
        ConceptGuardError, match="Mask 0 is \\(10, 10\\) pixels but its image is \\(48, 64\\)"
    ):
        prepare_images(images, torch.ones(10, 10), 32, 8)
    with pytest.raises(ConceptGuardError, match="3 masks for 2 images"):
        prepare_images(images, torch.ones(3, 48, 64), 32, 8)
    with pytest.raises(ConceptGuardError, match="expected \\[3, H, W\\]"):
        prepare_images([torch.rand(1, 8, 8)], None, 32, 8)


def test_train_touches_only_attn1_and_leaves_the_host_bit_identical(sd1_backend):
    before = _probe(sd1_backend)
    weights = [t.clone() for t in sd1_backend.unet.state_dict().values()]
    seen = []
    r = train(SafeGenConfig(**FAST), sd1_backend, _images(), on_step=lambda s, n, loss: seen.append(s))
    assert seen[-3:] == [1, 2, 3] and set(seen[:-3]) == {0} and len(seen) > 3  # setup ticks, then steps
    assert r.tensors and all(".attn1." in k for k in r.tensors)
    assert {k.split(".attn1.")[1].rsplit(".", 1)[0] for k in r.tensors} == {
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
    }
    assert any(v.abs().sum() > 0 for v in r.tensors.values())
    assert r.metadata["concept_guard.method"] == "safegen" and r.metadata["concept_guard.images"] == "3"
    assert all(
        torch.equal(a, b) for a, b in zip(weights, sd1_backend.unet.state_dict().values(), strict=True)
    )
    assert torch.equal(_probe(sd1_backend), before)


def test_training_is_deterministic_and_learns(sd1_backend):
    cfg = SafeGenConfig(**{**FAST, "steps": 25, "lr": 3e-3, "target": "exact", "max_timestep": 500})
    benign = _images(4, seed=5)
    a = train(cfg, sd1_backend, _images(), benign_images=benign)
    b = train(cfg, sd1_backend, _images(), benign_images=benign)
    assert a.losses == b.losses
    assert sum(a.losses[-5:]) < sum(a.losses[:5])


@pytest.mark.parametrize("preserve_target", ["teacher", "noise"])
def test_sdxl_and_vpred_backends_train(sdxl_backend, sd2v_backend, preserve_target):
    for backend in (sdxl_backend, sd2v_backend):
        r = train(
            SafeGenConfig(**{**FAST, "steps": 1, "preserve_target": preserve_target}), backend, _images(2)
        )
        assert r.tensors and all(torch.isfinite(v).all() for v in r.tensors.values())


def test_nan_loss_stops_and_detaches(sd1_backend, monkeypatch):
    before = _probe(sd1_backend)
    real = safegen.safegen_loss
    monkeypatch.setattr(safegen, "safegen_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(TrainingDivergedError, match="nothing was written"):
        train(SafeGenConfig(**FAST), sd1_backend, _images())
    assert torch.equal(_probe(sd1_backend), before)


def test_a_unet_without_self_attention_is_refused(sd1_backend, monkeypatch):
    names = [n for n in sd1_backend.unet_module_names() if ".attn1." not in n]
    monkeypatch.setattr(sd1_backend, "unet_module_names", lambda: names)
    with pytest.raises(NoMatchingModulesError, match="No UNet module matched"):
        train(SafeGenConfig(**FAST), sd1_backend, _images())


def _write_images(folder, n=3, size=64):
    folder.mkdir()
    for i, im in enumerate(_images(n, size)):
        Image.fromarray((im.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i}.png")
    return folder


def test_cli_writes_an_attn1_edit(tiny_dirs, tmp_path, capsys):
    images = _write_images(tmp_path / "imgs")
    out = tmp_path / "sg.safetensors"
    argv = ["safegen", "--model", str(tiny_dirs("sd1")), "--images", str(images), "--out", str(out)]
    argv += ["--steps", "2", "--batch-size", "2", "--mosaic-block", "16", "--resolution", "64", "--json"]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["out"] == str(out)
    deltas, meta = read_edit(out)
    assert deltas and all(".attn1." in k for k in deltas) and meta["concept_guard.method"] == "safegen"
    assert cli_main(argv) == 2  # exists: refused before any work
    assert "already exists" in capsys.readouterr().err
    lora = tmp_path / "sg_lora.safetensors"  # `convert` turns it into a kohya LoRA on the same attn1 modules
    convert = ["convert", "--edit", str(out), "--to", "lora", "--rank", "4", "--out", str(lora)]
    assert cli_main([*convert, "--model", str(tiny_dirs("sd1"))]) == 0
    with safe_open(str(lora), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("attn1" in k for k in keys) and any(k.endswith("lora_down.weight") for k in keys)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--images", "MISSING"], "is not a folder"),
        (["--images", "IMGS", "--mosaic-block", "0"], "`mosaic_block` must be a positive integer"),
        (["--images", "IMGS", "--target", "blur"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tiny_dirs, tmp_path, capsys, extra, match):
    images = _write_images(tmp_path / "imgs")
    extra = [str(images) if e == "IMGS" else str(tmp_path / e) if e == "MISSING" else e for e in extra]
    out = tmp_path / "sg.safetensors"
    argv = ["safegen", "--model", str(tiny_dirs("sd1")), "--out", str(out), *extra]
    try:
        code = cli_main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert match in err and len([line for line in err.splitlines() if "error" in line]) == 1, err
