"""Backdoor-TI speed: the diffusers textual-inversion loop (reimplemented) against ours, in one process.

The reference (``ti_reference.py``) is diffusers' ``examples/textual_inversion/textual_inversion.py`` step with
the THEMIS backdoor term added the way the official ``SD_textual_inversion.py`` does it: per step a
clean batch ("a photo of a S*") and a backdoor batch (the target image, a trigger prompt) each get
their own VAE encode (``latent_dist.sample()``), ``DDPMScheduler.add_noise``, text-encoder and UNet
forward and backward into the same gradients; then AdamW (weight decay 1e-2) over the whole
token-embedding matrix of a copy of the text encoder with S* added as new tokens
(``resize_token_embeddings``), and every non-placeholder row is restored (``index_no_updates``). Its
images go through the script's per-sample pipeline (PIL bicubic resize, random flip, per-sample
tokenization). Ours is ``concept_guard.core.methods.ti_backdoor.train.train``: latents cached once, one
batched text-encoder + UNet forward/backward for both terms, Adam over the ``n`` new rows only.

Both get the same model, device, images (ShapesWorld renders of "a red heart"), target (the default
censor card), triggers, vectors, lr, batch size (per term) and steps. Times include setup (the
reference's tokenizer/encoder copy and resize, our latent caching). The loss is L_clean + γ·L_bd per
step; the table gives its mean over the first and last 10 % of steps. The two training losses differ
by construction (the reference adds VAE-posterior noise to every latent, ours uses the posterior mode,
which on ShapesWorld roughly halves the loss), so both learned embeddings are also scored on one fixed
held-out set ("eval loss", next to that of the initial vectors).

    python benchmarks/ti_speed.py --model shapesworld             # ~1.5 min on one CPU thread
    python benchmarks/ti_speed.py --model sd15-random --device cuda --json
    python benchmarks/ti_speed.py --model shapesworld --split      # also ms per part of a step

On a CPU shared with other work, set OMP_NUM_THREADS to the free cores (1 beside a busy job): with
more threads than free cores every parallel op waits for a descheduled thread, and the reference,
with about twice as many (smaller) ops per step, is slowed far more than ours.

Peak memory: see ``_common.PeakMemory`` (CUDA allocator peak; sampled RSS growth on CPU).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch
from _common import build_backend, device_name, timed  # sibling modules (run as a script)
from concept_guard.core.backend import PLACEHOLDER
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.methods.ti_backdoor.images import cache_latents, default_target_image
from concept_guard.core.methods.ti_backdoor.train import BackdoorTIConfig, init_vectors, train
from concept_guard.core.seeding import seed_everything
from concept_guard.shapesworld import world
from ti_reference import reference_loop
from ti_step_parts import step_parts

CONCEPT_PROMPT = "a red heart"
IMAGES = 8


@torch.no_grad()
def held_out_loss(
    backend: DiffusersBackend,
    cfg: BackdoorTIConfig,
    images: list[torch.Tensor],
    vectors: dict[str, torch.Tensor],
    samples: int = 32,
) -> float:
    """L_clean + γ·L_bd of ``vectors`` on one fixed set, the same for both loops (their training losses
    differ by construction: the reference samples the VAE posterior, ours uses its mode): posterior-mode
    latents, "a photo of a S*" / "a photo of a <trigger> S*", evenly spaced t, seeded noise."""
    cache = cache_latents(backend, replace(cfg, flip=False), images, None)
    t = torch.linspace(0, len(backend.alphas_cumprod) - 1, samples).long()
    a = backend.alphas_cumprod.cpu()[t].view(-1, 1, 1, 1)
    idx = torch.arange(samples)
    terms = [(1.0, cache.concept[idx % len(cache.concept)], [f"a photo of a {PLACEHOLDER}"] * samples)]
    if cache.target is not None:
        prompts = [
            f"a photo of a {cfg.triggers[i % len(cfg.triggers)]} {PLACEHOLDER}" for i in range(samples)
        ]
        terms.append((cfg.gamma, cache.target[idx % len(cache.target)], prompts))
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for weight, x0, prompts in terms:
        noise = torch.randn(x0.shape, generator=gen)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        errs = []
        for i in range(0, samples, 16):
            cond = backend.encode_text_with_vectors(prompts[i : i + 16], vectors)
            pred = backend.eps(x_t[i : i + 16], t[i : i + 16].to(backend.device), cond)
            errs.append((pred.float().cpu() - noise[i : i + 16]).pow(2).mean(dim=(1, 2, 3)))
        total += weight * float(torch.cat(errs).mean())
    return round(total, 5)


def curve(losses: list[float]) -> dict:
    """Mean loss over the first and the last 10 % of steps (at least one step each)."""
    k = max(1, len(losses) // 10)
    return {
        "loss_first_10pct": round(float(np.mean(losses[:k])), 5),
        "loss_last_10pct": round(float(np.mean(losses[-k:])), 5),
    }


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default="shapesworld", help="'shapesworld', 'sd15-random', or a pipeline folder/file"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--steps", type=int, default=None, help="default: 200 (shapesworld, GPU) / 5 (sd15-random on CPU)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=4, help="samples per term (clean and backdoor) per step"
    )
    ap.add_argument(
        "--resolution", type=int, default=None, help="pixels; default native (GPU or shapesworld), 128 on CPU"
    )
    ap.add_argument("--vectors", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--triggers", default="burning,on fire")
    ap.add_argument(
        "--init-word", default="object", help="a single CLIP token (the diffusers script requires one)"
    )
    ap.add_argument(
        "--reference-mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="the script's --mixed_precision for the reference (autocast; CUDA only). Ours uses bf16 autocast on CUDA.",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--split", action="store_true", help="also time each part of a step (ms per call; see step_parts)"
    )
    args = ap.parse_args()
    if args.reference_mixed_precision != "no" and torch.device(args.device).type != "cuda":
        ap.error("--reference-mixed-precision bf16 needs a CUDA device")
    return args


def _config(args: argparse.Namespace, steps: int, size: int) -> BackdoorTIConfig:
    return BackdoorTIConfig(
        name="heart",
        init_word=args.init_word,
        vectors=args.vectors,
        triggers=args.triggers,
        steps=steps,
        lr=args.lr,
        batch_size=args.batch_size,
        resolution=size,
        seed=args.seed,
        # the paper's objective, which the reference loop implements (steering samples and loss weights cost
        # nothing per step)
        steer_prob=0.0,
        high_noise_weight=1.0,
    )


def _run_both(
    args: argparse.Namespace, backend: DiffusersBackend, cfg: BackdoorTIConfig, size: int
) -> tuple[dict, dict, list[torch.Tensor]]:
    """Time the reference loop and ours (each after re-seeding), with loss curves and held-out eval losses."""
    device = backend.device
    images, _ = world.render_prompt(CONCEPT_PROMPT, IMAGES, seed=args.seed)
    target = world.to_uint8(default_target_image(size)[None])[0]
    seed_everything(args.seed)
    ref, (ref_losses, ref_setup, ref_vectors) = timed(
        lambda: reference_loop(backend, cfg, images, target, size, args.reference_mixed_precision), device
    )
    ref["setup_seconds"] = round(ref_setup, 3)
    seed_everything(args.seed)
    concept = list(world.to_tensor(images))
    ours, trained = timed(lambda: train(cfg, backend, concept), device)
    ours["setup_seconds"] = round(trained.setup_seconds, 3)
    ref.update(curve(ref_losses), eval_loss=held_out_loss(backend, cfg, concept, ref_vectors))
    ours.update(curve(trained.losses), eval_loss=held_out_loss(backend, cfg, concept, trained.tensors))
    return ref, ours, concept


def _print_table(result: dict, args: argparse.Namespace) -> None:
    ref, ours, size = result["reference"], result["ours"], result["resolution"]
    print(
        f"Backdoor-TI speed on {result['device']}, model {args.model}, {result['steps']} steps, batch "
        f"{args.batch_size} (+{args.batch_size} backdoor), {size}x{size} px, {args.vectors} vectors, "
        f"{result['triggers']} triggers"
    )
    head = (
        "loop",
        "it/s",
        "seconds",
        "CPU s",
        "setup s",
        "peak MiB",
        "loss 1st 10%",
        "loss last 10%",
        "eval loss",
    )
    print(f"{head[0]:<10}" + "".join(f"{h:>14}" for h in head[1:]))
    for name, r in (("reference", ref), ("ours", ours)):
        cells = (
            r["it_per_s"],
            r["seconds"],
            r["cpu_seconds"],
            r["setup_seconds"],
            r["peak_mem_bytes"] / 2**20,
            r["loss_first_10pct"],
            r["loss_last_10pct"],
            r["eval_loss"],
        )
        print(
            f"{name:<10}" + "".join(f"{c:>14.4f}" if k >= 5 else f"{c:>14.2f}" for k, c in enumerate(cells))
        )
    print(
        f"eval loss of the initial vectors: {result['eval_loss_init']:.4f} (fixed held-out set, same for both)"
    )
    print(f"speedup: {result['speedup']}x (CPU time ratio {ref['cpu_seconds'] / ours['cpu_seconds']:.2f}x)")
    if args.split:
        print(
            "ms per call: "
            + ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in result["step_parts_ms"].items())
        )


def main() -> None:
    args = _parse_args()
    device = torch.device(args.device)
    seed_everything(args.seed)
    backend = build_backend(args.model, device)
    cpu_big = device.type == "cpu" and args.model == "sd15-random"
    size = args.resolution or (128 if cpu_big else backend.native_latent_size * backend.vae_scale_factor)
    steps = args.steps or (5 if cpu_big else 200)
    cfg = _config(args, steps, size)
    ref, ours, concept = _run_both(args, backend, cfg, size)
    start_vectors = {k: v.detach() for k, v in init_vectors(backend, cfg).items()}
    for r in (ref, ours):
        r["it_per_s"] = round(steps / r["seconds"], 4)
    result = {
        "device": device_name(device),
        "model": args.model,
        "steps": steps,
        "batch_size": args.batch_size,
        "resolution": size,
        "vectors": args.vectors,
        "triggers": len(cfg.triggers),
        "reference_mixed_precision": args.reference_mixed_precision,
        "eval_loss_init": held_out_loss(backend, cfg, concept, start_vectors),
        "reference": ref,
        "ours": ours,
        "speedup": round(ours["it_per_s"] / ref["it_per_s"], 2),
    }
    if args.split:
        result["step_parts_ms"] = step_parts(backend, cfg, concept, size)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result, args)


if __name__ == "__main__":
    main()
