"""ESD speed: the official loop (reimplemented) against ours, in one process, same model and device.

The reference follows the official ``esd_sd.py`` (2025): two UNet copies (frozen + trained), and
for every iteration a fresh batch-1 DDIM trajectory (50 steps, CFG 3) run by the frozen UNet up
to a random step k, then the frozen ε(c) and ε(∅) and one trained forward/backward on the
``esd-x`` weights. Ours is ``concept_guard.core.methods.esd.train`` (trajectory bank sampled once
in large batches, targets precomputed, one student forward/backward per iteration). Both run the
same number of iterations; our time includes building the bank.

On CPU, a full-size UNet makes the reference slow (≈50 s per iteration at 16×16 on 2 cores), so
``--reference-iterations`` may time it on fewer iterations than ours. That is a fair rate: every
reference iteration is the same work (a fresh trajectory to a uniformly drawn step plus one update),
while ours pays its bank once, so timing ours on few iterations would understate it instead.

    python benchmarks/esd_speed.py --model shapesworld            # < 10 min on 2 CPU cores
    python benchmarks/esd_speed.py --model sd15-random --device cuda --json

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident-set growth
over the start of each run, sampled every 2 ms from /proc/self/statm.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from _common import build_backend, device_name, timed  # sibling module (run as a script)
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.methods.esd import ESDConfig, train
from concept_guard.core.sampling import ddim_scheduler
from concept_guard.core.seeding import seed_everything


def reference_loop(backend: DiffusersBackend, cfg: ESDConfig, latent_size: int, iterations: int) -> None:
    """``iterations`` steps of the official esd_sd.py loop on the backend's diffusers UNet (esd-x, Adam, batch 1)."""
    device = backend.device
    base_unet = backend.unet
    esd_unet = copy.deepcopy(base_unet)  # the reference holds two UNets
    params = [p for n, p in esd_unet.named_parameters() if "attn2" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    cond = backend.encode_text([cfg.concepts[0]]).context
    null = backend.encode_text([""]).context
    sched = ddim_scheduler(backend.alphas_cumprod, cfg.sampling_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(iterations):
        k = int(torch.randint(0, cfg.sampling_steps, (1,), generator=gen))
        x = torch.randn(1, backend.latent_channels, latent_size, latent_size, generator=gen).to(device)
        with torch.no_grad():
            for t in sched.timesteps[:k]:
                e = base_unet(
                    torch.cat([x, x]), t.to(device), encoder_hidden_states=torch.cat([null, cond])
                ).sample
                e_u, e_c = e.chunk(2)
                x = sched.step(e_u + cfg.guidance * (e_c - e_u), t, x).prev_sample
            t = sched.timesteps[k].to(device)
            e_c = base_unet(x, t, encoder_hidden_states=cond).sample
            e_0 = base_unet(x, t, encoder_hidden_states=null).sample
        pred = esd_unet(x, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), (e_c - cfg.eta * (e_c - e_0)).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    del esd_unet, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default="shapesworld", help="'shapesworld', 'sd15-random', or a pipeline folder/file"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iterations", type=int, default=200, help="ESD iterations of our loop (default 200)")
    ap.add_argument(
        "--reference-iterations",
        type=int,
        default=None,
        help="iterations to time the reference on (default: --iterations; 10 for sd15-random on CPU)",
    )
    ap.add_argument(
        "--latent-size", type=int, default=None, help="default: native (GPU or shapesworld), 16 on CPU"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    seed_everything(args.seed)
    backend = build_backend(args.model, device)
    native = backend.native_latent_size
    cpu_big = device.type == "cpu" and args.model == "sd15-random"
    latent = args.latent_size or (16 if cpu_big else native)
    iterations = args.iterations
    ref_iterations = args.reference_iterations or (min(10, iterations) if cpu_big else iterations)
    cfg = ESDConfig(
        concepts=("circle",) if args.model == "shapesworld" else ("a photo of a dog",),
        iterations=iterations,
        seed=args.seed,
        latent_size=latent,
    )
    ref, _ = timed(lambda: reference_loop(backend, cfg, latent, ref_iterations), device)
    ours, _ = timed(lambda: train(cfg, backend), device)
    for r, n in ((ref, ref_iterations), (ours, iterations)):
        r["iterations"] = n
        r["it_per_s"] = round(n / r["seconds"], 4)
    result = {
        "device": device_name(device),
        "model": args.model,
        "iterations": iterations,
        "latent_size": latent,
        "reference": ref,
        "ours": ours,
        "speedup": round(ours["it_per_s"] / ref["it_per_s"], 2),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"ESD speed on {result['device']}, model {args.model}, latent {latent}x{latent}")
    print(f"{'loop':<10} {'iters':>6} {'it/s':>10} {'seconds':>10} {'CPU s':>10} {'peak MiB':>10}")
    for name, r in (("reference", ref), ("ours", ours)):
        print(
            f"{name:<10} {r['iterations']:>6} {r['it_per_s']:>10.3f} {r['seconds']:>10.2f} {r['cpu_seconds']:>10.2f} "
            f"{r['peak_mem_bytes'] / 2**20:>10.1f}"
        )
    cpu_ratio = (ref["cpu_seconds"] / ref_iterations) / (ours["cpu_seconds"] / iterations)
    print(f"speedup (it/s): {result['speedup']}x (CPU seconds per iteration: {cpu_ratio:.2f}x)")


if __name__ == "__main__":
    main()
