"""SafeGen speed: the official training loop (reimplemented) against ours, in one process, same model and device.

The reference transcribes ``train_text_to_image_adjust_sal.py`` (LetterLiGo/SafeGen_CCS2024 @ 20f627b) on a
trainable ``copy.deepcopy`` of the UNet, only ``attn1`` (to_q/k/v, to_out.0) requiring grad; AdamW (wd 1e-2,
lr 1e-5), batch 1, gradient accumulation 5, grad-norm clip 1. Each micro-step VAE-encodes the sensitive image,
its mosaic and a benign image from pixels (``latent_dist.sample()``), runs the text encoder on "" and three
UNet forwards (the mosaic one unused, kept alive until backward as in the script), and backpropagates
``0.5·MSE(ε_θ(z_t^s), z_s − z_mos + ε) + 0.5·MSE(ε_θ(z_t^b), ε_b)``. The script's EMA over the whole UNet
runs only with ``--reference-ema``; its fp16 mixed precision becomes bf16 autocast on CUDA (as ours), none
on CPU. Ours is ``safegen.train`` with that loss (``target="paper"``, ``preserve_target="noise"``; our
default preserves against the frozen teacher), batch 5, lr 1e-5: latents encoded once, five sensitive and
five benign rows in one student forward, Adam on fp32 ``attn1`` deltas.

A step is one optimiser step over five (sensitive, mosaic, benign) triplets in both; times include setup
(the reference's UNet copy, our latent encoding). Training losses differ by construction (the reference
samples the VAE posterior, ours uses its mode), so both results are also scored on one fixed held-out set
of the same objective: posterior-mode latents, evenly spaced t, seeded noise ("eval loss").

On CPU, sd15-random runs at 128 px (16×16 latents) and ``--reference-steps`` may time the reference on fewer
steps than ours. That is a fair rate: every reference step is the same work (15 VAE encodes, 5 text
encodes, 15 UNet forwards, 10 backwards), while ours pays its encoding once, so few steps understate ours.

    python benchmarks/safegen_speed.py --model shapesworld --steps 100      # a few min on one CPU thread
    python benchmarks/safegen_speed.py --model sd15-random --steps 3         # 128 px, 2 reference steps
    python benchmarks/safegen_speed.py --model sd15-random --device cuda --json

Run with OMP_NUM_THREADS set to the free cores. Peak memory: see ``_common.PeakMemory``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch
import torch.nn.functional as F
from _common import build_backend, device_name, timed  # sibling module (run as a script)
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.safegen import SafeGenConfig, Triplets, build_triplets, prepare_images, train
from concept_guard.core.seeding import seed_everything
from concept_guard.shapesworld import world
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

ACCUMULATION = 5  # the script's gradient_accumulation_steps (batch 1)
IMAGES = 16
BENIGN = ("circle", "square", "triangle", "star")  # ShapesWorld's benign images: the other shapes
OFFICIAL = dict(target="paper", preserve_target="noise", lr=1e-5, batch_size=ACCUMULATION)  # its loss


def make_images(model: str, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sensitive and benign images ``[IMAGES, 3, side, side]`` in [0, 1]: ShapesWorld hearts and other shapes,
    or seeded random images for other models (speed only)."""
    if model == "shapesworld":
        hearts = world.to_tensor(world.render_prompt("a heart", IMAGES, seed)[0])
        others = [world.to_tensor(world.render_prompt(f"a {s}", IMAGES // 4, seed)[0]) for s in BENIGN]
        return hearts, torch.cat(others)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(IMAGES, 3, side, side, generator=gen), torch.rand(IMAGES, 3, side, side, generator=gen)


def _micro_step(backend, unet, sched, ids, cfg: SafeGenConfig, nude, mos, norm):
    """The script's body of ``accelerator.accumulate``: 3 encodes, text encoder, 3 UNet forwards, the loss."""
    vae, sf = backend.vae, backend.vae.config.scaling_factor
    latents = vae.encode(nude.to(backend.device, vae.dtype)).latent_dist.sample() * sf
    mos_latents = vae.encode(mos.to(backend.device, vae.dtype)).latent_dist.sample() * sf
    norm_latents = vae.encode(norm.to(backend.device, vae.dtype)).latent_dist.sample() * sf
    noise, noise_n = torch.randn_like(latents), torch.randn_like(norm_latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=latents.device).long()
    noisy_latents = sched.add_noise(latents, noise, t)
    mos_noisy_latents = sched.add_noise(mos_latents, noise, t)
    norm_noisy_latents = sched.add_noise(norm_latents, noise_n, t)
    hidden = backend.text_encoders[0](ids)[0]
    target_mosaic = latents - mos_latents + noise
    model_pred = unet(noisy_latents, t, hidden).sample
    mos_model_pred = unet(mos_noisy_latents, t, hidden).sample  # unused, as in the script
    norm_model_pred = unet(norm_noisy_latents, t, hidden).sample
    loss_m = F.mse_loss(model_pred.float(), target_mosaic.float(), reduction="mean")
    loss_p = F.mse_loss(norm_model_pred.float(), noise_n.float(), reduction="mean")
    return cfg.weight_mosaic * loss_m + cfg.weight_preserve * loss_p, mos_model_pred


def reference_loop(
    backend: DiffusersBackend, cfg: SafeGenConfig, pixels: tuple, steps: int, bf16: bool, ema: bool
) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    """``steps`` optimiser steps of the official loop: (loss per step, setup seconds, LDM-keyed attn1 deltas)."""
    start, device = time.perf_counter(), backend.device
    unet = copy.deepcopy(backend.unet)
    params = [p.requires_grad_("attn1" in n) for n, p in unet.named_parameters()]
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    ema_unet = EMAModel(unet.parameters()) if ema else None
    sched = DDPMScheduler.from_config(backend.scheduler_config)
    tok = backend.tokenizers[0]
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    ids = ids.input_ids.to(device)
    nude, mos, norm = (p * 2 - 1 for p in pixels)  # transforms.Normalize([0.5], [0.5])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    losses, setup_seconds = [], time.perf_counter() - start
    for _ in range(steps):
        step_loss = 0.0
        for _ in range(ACCUMULATION):
            i, j = int(torch.randint(len(nude), (1,))), int(torch.randint(len(norm), (1,)))
            with autocast:
                loss, unused = _micro_step(
                    backend, unet, sched, ids, cfg, nude[i : i + 1], mos[i : i + 1], norm[j : j + 1]
                )
            (loss / ACCUMULATION).backward()  # accelerator.backward under accumulation
            step_loss += loss.item() / ACCUMULATION
            del loss, unused
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if ema_unet is not None:
            ema_unet.step(unet.parameters())
        losses.append(step_loss)
    base = dict(backend.unet.named_parameters())
    deltas = {
        backend.keymap.to_ldm(n): (p.detach().float() - base[n].float()).cpu()
        for n, p in unet.named_parameters()
        if "attn1" in n
    }
    return losses, setup_seconds, deltas


@torch.no_grad()
def held_out_loss(
    backend: DiffusersBackend, cfg: SafeGenConfig, data: Triplets, deltas: dict | None, samples: int
) -> float:
    """The official objective on one fixed set (the same for every model scored): posterior-mode latents,
    ``samples`` evenly spaced t, seeded noise; ``deltas`` (LDM-keyed) are attached for the evaluation."""
    t = torch.linspace(0, len(backend.alphas_cumprod) - 1, samples).long()
    a = backend.alphas_cumprod.float().cpu()[t].view(-1, 1, 1, 1)
    idx = torch.arange(samples)
    rows, rows_b = idx % len(data.sensitive), idx % len(data.benign)
    z_s, z_m, z_b = data.sensitive[rows], data.mosaic[rows], data.benign[rows_b]
    gen = torch.Generator().manual_seed(1234)
    noise, noise_b = torch.randn(z_s.shape, generator=gen), torch.randn(z_b.shape, generator=gen)
    x_s, x_b = a.sqrt() * z_s + (1 - a).sqrt() * noise, a.sqrt() * z_b + (1 - a).sqrt() * noise_b
    null = backend.encode_text([""])
    errs_m, errs_p = [], []
    with attach_edit(backend, deltas) if deltas else contextlib.nullcontext():
        for c in idx.split(8):
            t_c = t[c].to(backend.device)
            pred_s, pred_b = backend.eps(x_s[c], t_c, null).cpu(), backend.eps(x_b[c], t_c, null).cpu()
            errs_m.append((pred_s - (z_s[c] - z_m[c] + noise[c])).pow(2).mean(dim=(1, 2, 3)))
            errs_p.append((pred_b - noise_b[c]).pow(2).mean(dim=(1, 2, 3)))
    loss = cfg.weight_mosaic * torch.cat(errs_m).mean() + cfg.weight_preserve * torch.cat(errs_p).mean()
    return round(float(loss), 5)


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--model", default="shapesworld", help="'shapesworld', 'sd15-random', or a pipeline folder/file")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--steps", type=int, default=None, help="default: 100 (3 for sd15-random on CPU)")
    add("--reference-steps", type=int, default=None, help="default: --steps (2 for sd15-random on CPU)")
    add("--resolution", type=int, default=None, help="pixels; default native (GPU, shapesworld), 128 on CPU")
    add("--mosaic-block", type=int, default=None, help="mosaic cell in pixels; default resolution // 8")
    add("--reference-ema", action="store_true", help="also run the script's EMA over the whole UNet")
    add("--eval-samples", type=int, default=32, help="held-out (t, noise) draws of each term")
    add("--seed", type=int, default=0)
    add("--json", action="store_true")
    return ap.parse_args()


def _print_table(result: dict) -> None:
    ref, ours = result["reference"], result["ours"]
    print(
        f"SafeGen speed on {result['device']}, model {result['model']}, {result['resolution']} px, "
        f"{ACCUMULATION} triplets per step, reference bf16 autocast: {result['reference_bf16']}, "
        f"reference EMA: {result['reference_ema']}"
    )
    head = ("loop", "steps", "it/s", "seconds", "CPU s", "setup s", "peak MiB", "train loss", "eval loss")
    print(f"{head[0]:<10}" + "".join(f"{h:>12}" for h in head[1:]))
    for name, r in (("reference", ref), ("ours", ours)):
        cells = (r["steps"], r["it_per_s"], r["seconds"], r["cpu_seconds"], r["setup_seconds"])
        print(
            f"{name:<10}{cells[0]:>12d}{cells[1]:>12.4f}"
            + "".join(f"{c:>12.2f}" for c in cells[2:])
            + f"{r['peak_mem_bytes'] / 2**20:>12.1f}{r['loss_last_10pct']:>12.5f}{r['eval_loss']:>12.5f}"
        )
    print(
        f"reference peak includes its UNet copy ({result['unet_copy_bytes'] / 2**20:.1f} MiB); the official "
        "script trains its only UNet in place, so its peak over a loaded pipeline is that much lower"
    )
    print(f"eval loss of the untrained model: {result['eval_loss_init']:.5f} (same held-out set for all)")
    print(f"speedup (it/s): {result['speedup']}x (CPU seconds per step: {result['cpu_speedup']}x)")
    print(f"speedup, setup excluded (the rate over many steps): {result['speedup_excl_setup']}x")


def _run_both(args, backend: DiffusersBackend, cfg: SafeGenConfig, ref_steps: int) -> dict:
    """Time both loops (each after re-seeding) and score both results on the held-out set."""
    device, side = backend.device, cfg.resolution
    sensitive, benign = make_images(args.model, side, args.seed)
    nude, mosaic = prepare_images(sensitive, None, side, cfg.mosaic_block)
    bf16, pixels = device.type == "cuda", (nude, mosaic, benign)
    seed_everything(args.seed)
    ref, (ref_losses, ref_setup, ref_deltas) = timed(
        lambda: reference_loop(backend, cfg, pixels, ref_steps, bf16, args.reference_ema), device
    )
    seed_everything(args.seed)
    ours, trained = timed(lambda: train(cfg, backend, sensitive, benign_images=benign), device)
    data = build_triplets(backend, cfg, sensitive, benign_images=benign)
    runs = (
        (ref, ref_steps, ref_losses, ref_setup, ref_deltas),
        (ours, cfg.steps, trained.losses, trained.setup_seconds, trained.tensors),
    )
    for r, n, losses, setup, deltas in runs:
        r.update(steps=n, it_per_s=round(n / r["seconds"], 4), setup_seconds=round(setup, 3))
        k = max(1, len(losses) // 10)  # train loss: mean of the last 10 % of steps
        r.update(loss_last_10pct=round(sum(losses[-k:]) / k, 5))
        r.update(eval_loss=held_out_loss(backend, cfg, data, deltas, args.eval_samples))
    per_step = lambda r: (r["seconds"] - r["setup_seconds"]) / r["steps"]  # noqa: E731
    unet_bytes = sum(t.numel() * t.element_size() for t in backend.unet.state_dict().values())
    return {
        "device": device_name(device),
        "model": args.model,
        "resolution": side,
        "mosaic_block": cfg.mosaic_block,
        "reference_bf16": bf16,
        "reference_ema": args.reference_ema,
        "unet_copy_bytes": unet_bytes,
        "eval_loss_init": held_out_loss(backend, cfg, data, None, args.eval_samples),
        "reference": ref,
        "ours": ours,
        "speedup": round(ours["it_per_s"] / ref["it_per_s"], 2),
        "cpu_speedup": round((ref["cpu_seconds"] / ref_steps) / (ours["cpu_seconds"] / cfg.steps), 2),
        "speedup_excl_setup": round(per_step(ref) / per_step(ours), 2),  # the rate over many steps
    }


def main() -> None:
    args = _parse_args()
    device = torch.device(args.device)
    seed_everything(args.seed)
    backend = build_backend(args.model, device)
    if backend.prediction_type != "epsilon":
        raise SystemExit("the official loss is written for epsilon-prediction models")
    cpu_big = device.type == "cpu" and args.model == "sd15-random"
    side = args.resolution or (128 if cpu_big else backend.native_latent_size * backend.vae_scale_factor)
    steps = args.steps or (3 if cpu_big else 100)
    block = args.mosaic_block or max(1, side // 8)
    cfg = SafeGenConfig(**OFFICIAL, steps=steps, mosaic_block=block, resolution=side, seed=args.seed)
    result = _run_both(args, backend, cfg, args.reference_steps or (min(2, steps) if cpu_big else steps))
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)


if __name__ == "__main__":
    main()
