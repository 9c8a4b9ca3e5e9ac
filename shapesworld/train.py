"""Train the ShapesWorld model on CPU: VAE, then a judge gate, then UNet + text encoder jointly.

Why this order: an undertrained VAE caps everything downstream, so UNet training only starts once the
judge recognises every attribute (≥ 0.97 per head) on VAE reconstructions of held-out renders.

Reproduce the committed model (``assets/model/shapesworld.json`` records what was run)::

    nohup nice -n 10 python -m concept_guard.shapesworld.train --out core/shapesworld/assets/model \\
        --work runs/shapesworld --threads 2 --unet-steps 4000 --stop-after 2000 > runs/train_unet.log 2>&1 &

Measured on our shared 2-core machine (other jobs running): rendering 40 000 images 196 s, VAE 1 000
steps 905 s (1 thread), UNet + text encoder ~1.4 s/step with 2 threads (2 000 steps in 46 min). The
committed model is the EMA snapshot at step 2 000 of the 4 000-step schedule (already past the baseline
bar; hence ``--stop-after 2000``); ``--resume`` without it continues to the end of the schedule.

Needs the judge (``assets/judge.safetensors``, see ``judge.py``) and the CLIP tokenizer files (see
``tokenizer.py``; the committed model folder's ``tokenizer/`` is used by default). ``--resume``
continues from the last checkpoint in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from ..core.errors import ConceptGuardError, TrainingDivergedError
from . import model as sw_model
from . import world
from .judge import Judge, load_judge

logger = logging.getLogger(__name__)

EVAL_PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a purple heart",
    "a crimson disc",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines the trained model (saved next to it)."""

    seed: int = 0
    data_size: int = 40000
    target_share: float = 0.03
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_gate: float = 0.97
    unet_steps: int = 6000
    batch: int = 64
    lr: float = 7e-4
    warmup: int = 200
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    eval_every: int = 500
    eval_samples: int = 16

    def __post_init__(self) -> None:
        for name in ("data_size", "vae_steps", "unet_steps", "batch", "eval_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConceptGuardError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        for name in ("target_share", "caption_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConceptGuardError(f"`{name}` must be in [0, 1), got {getattr(self, name)}.")


def _dataset(cfg: TrainConfig, work: Path) -> tuple[torch.Tensor, list[world.Scene]]:
    """Training renders (cached in ``work``) and their scenes (regenerated from the seed)."""
    scenes = world.random_scenes(cfg.data_size, cfg.seed, target_prob=cfg.target_share)
    cache = work / "images.npy"
    if cache.is_file():
        images = np.load(cache)
    else:
        start = time.monotonic()
        images = world.render_batch(scenes)
        np.save(cache, images)
        logger.info("rendered %d training images in %.0f s", len(images), time.monotonic() - start)
    return world.to_tensor(images), scenes


def _lr_lambda(warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return fn


def _train_vae_steps(vae, opt, images: torch.Tensor, steps: int, g: torch.Generator, batch: int) -> float:
    vae.train()
    loss_val = float("nan")
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = loss.item()
        if step % 100 == 0:
            logger.info("vae step %d/%d loss %.4f", step, steps, loss_val)
    vae.eval()
    return loss_val


@torch.no_grad()
def vae_gate_scores(vae, judge: Judge, n: int = 1000, seed: int = 777) -> dict[str, float]:
    """Judge accuracy on VAE reconstructions of fresh renders (the UNet-training gate)."""
    from .judge import accuracy, labelled_set

    images, labels = labelled_set(n, seed, target_share=0.1)
    rec = torch.cat([vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample for x in images.split(250)])
    return accuracy(judge, ((rec + 1) / 2).clamp(0, 1), labels)


def train_vae(cfg: TrainConfig, images: torch.Tensor, judge: Judge):
    """Train the VAE until the judge gate passes (up to 3 extensions of half the steps)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    vae = sw_model.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start, steps, done = time.monotonic(), cfg.vae_steps, 0
    for attempt in range(4):
        loss = _train_vae_steps(vae, opt, images, steps, g, cfg.vae_batch)
        done += steps
        scores = vae_gate_scores(vae, judge)
        logger.info(
            "VAE %d steps loss %.4f gate %s (%.0f s)",
            done,
            loss,
            json.dumps(scores),
            time.monotonic() - start,
        )
        if min(scores.values()) >= cfg.vae_gate:
            return vae, scores, done
        steps = cfg.vae_steps // 2
        for group in opt.param_groups:
            group["lr"] *= 0.5
        logger.info("VAE gate not met (attempt %d); training %d more steps", attempt + 1, steps)
    raise TrainingDivergedError(
        f"VAE reconstructions stay below the judge gate {cfg.vae_gate}: {scores}. "
        "Train longer (`--vae-steps`) or widen the VAE."
    )


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Posterior modes and the scaling factor that makes them ~unit variance."""
    modes = torch.cat([vae.encode(x * 2 - 1).latent_dist.mode() for x in images.split(500)])
    scale = float(1.0 / modes.std())
    vae.register_to_config(scaling_factor=scale)
    return modes * scale, scale


def _captions(
    scenes: list[world.Scene], idx: torch.Tensor, rng: np.random.Generator, dropout: float
) -> list[str]:
    return ["" if rng.random() < dropout else world.caption(scenes[i], rng) for i in idx.tolist()]


def _encode(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def sample(
    parts: dict, prompts: list[str], *, seed: int, steps: int = 20, guidance: float = 5.0
) -> torch.Tensor:
    """DDIM + CFG samples ``[len(prompts), 3, 32, 32]`` in [0, 1] from the raw parts (for training evals)."""
    unet, te, tok, vae = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["vae"]
    sched = sw_model.make_scheduler()
    sched.set_timesteps(steps)
    cond = _encode(te, tok, list(prompts))
    uncond = _encode(te, tok, [""]).expand_as(cond)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 4, 8, 8, generator=g)
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
        e_u, e_c = eps.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return ((vae.decode(x / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)


def quick_eval(
    parts: dict, judge: Judge, prompts=EVAL_PROMPTS, n: int = 16, seed: int = 1
) -> dict[str, float]:
    """Fraction of samples whose judged shape/colour match each prompt's (averaged)."""
    rates = {"shape": [], "colour": []}
    for p in prompts:
        want = world.parse_prompt(p)
        got = judge.classify(sample(parts, [p] * n, seed=seed))
        for h in rates:
            rates[h].append(float(np.mean([lab == want[h] for lab in got[h]])))
    return {h: round(float(np.mean(v)), 3) for h, v in rates.items()}


def _save_checkpoint(path: Path, step: int, unet, te, ema: EMAModel, opt, sched) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "step": step,
            "unet": unet.state_dict(),
            "text_encoder": te.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
        },
        tmp,
    )
    os.replace(tmp, path)


def _export(
    out: Path, parts: dict, ema: EMAModel, joint: torch.nn.ModuleList, tok_dir: Path, info: dict
) -> None:
    """Write the EMA weights as a pipeline folder (training weights restored afterwards)."""
    ema.store(joint.parameters())
    ema.copy_to(joint.parameters())
    try:
        sw_model.save_pipeline(
            out,
            vae=parts["vae"],
            unet=parts["unet"],
            text_encoder=parts["text_encoder"],
            tokenizer_dir=tok_dir,
            info=info,
            overwrite=True,
        )
    finally:
        ema.restore(joint.parameters())


def train_unet(
    cfg: TrainConfig,
    parts: dict,
    latents: torch.Tensor,
    scenes: list[world.Scene],
    judge: Judge,
    work: Path,
    tok_dir: Path,
    out: Path,
    info: dict,
    *,
    resume: bool,
    stop_after: int | None = None,
) -> dict:
    """Joint UNet + text-encoder training with EMA; checkpoints and a quick judge eval every ``eval_every``."""
    unet, te, tok = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    joint = torch.nn.ModuleList([unet, te]).train()
    opt = torch.optim.AdamW(joint.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.unet_steps))
    ema = EMAModel(joint.parameters(), decay=cfg.ema_decay)
    noise_sched = DDPMScheduler.from_config(sw_model.make_scheduler().config)
    ckpt, start_step = work / "unet_ckpt.pt", 0
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["text_encoder"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_step = state["step"]
        logger.info("resumed from %s at step %d", ckpt, start_step)
    g = torch.Generator().manual_seed(cfg.seed + 2 + start_step)
    rng = np.random.default_rng([cfg.seed, start_step])
    t0, evals = time.monotonic(), []
    last = min(cfg.unet_steps, stop_after or cfg.unet_steps)  # stop early on the full schedule
    for step in range(start_step, last):
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.batch,), generator=g)
        ctx = _encode(te, tok, _captions(scenes, idx, rng, cfg.caption_dropout))
        pred = unet(noise_sched.add_noise(x0, noise, t), t, ctx).sample
        loss = F.mse_loss(pred, noise)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"UNet loss became {loss.item()} at step {step}; lower `--lr`.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(joint.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(joint.parameters())
        done = step + 1
        if done % 50 == 0 or done == start_step + 1:
            logger.info(
                "unet step %d/%d loss %.4f lr %.2e (%.0f s)",
                done,
                cfg.unet_steps,
                loss.item(),
                sched.get_last_lr()[0],
                time.monotonic() - t0,
            )
        if done % cfg.eval_every == 0 or done == last:
            ema.store(joint.parameters())
            ema.copy_to(joint.parameters())
            joint.eval()
            scores = quick_eval(parts, judge, n=cfg.eval_samples)
            joint.train()
            ema.restore(joint.parameters())
            evals.append({"step": done, **scores})
            logger.info("eval step %d (EMA): %s", done, json.dumps(scores))
            _save_checkpoint(ckpt, done, unet, te, ema, opt, sched)
            info = {
                **info,
                "unet_steps_done": done,
                "quick_evals": evals,
                "unet_train_seconds": round(time.monotonic() - t0),
            }
            _export(work / "latest_model" if done < last else out, parts, ema, joint, tok_dir, info)
    return info


def main(argv: list[str] | None = None) -> None:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description="Train the ShapesWorld pipeline (VAE -> gate -> UNet + text encoder)."
    )
    p.add_argument("--out", required=True, help="pipeline folder to write (replaced atomically)")
    p.add_argument("--work", default="runs/shapesworld", help="cache/checkpoint folder")
    p.add_argument("--judge", default=None, help="judge file (default: the committed one)")
    p.add_argument("--tokenizer", default=str(sw_model.MODEL_DIR / "tokenizer"), help="CLIP tokenizer files")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="reuse the trained VAE and the last UNet checkpoint")
    for name in ("seed", "data_size", "vae_steps", "unet_steps", "batch", "eval_every", "eval_samples"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--stop-after", type=int, default=None, help="end (and write --out) after this UNet step")
    p.add_argument(
        "--vae-gate", type=float, default=d.vae_gate, help="judge accuracy needed on VAE reconstructions"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        **{
            k: getattr(args, k)
            for k in (
                "seed",
                "data_size",
                "vae_steps",
                "unet_steps",
                "batch",
                "eval_every",
                "eval_samples",
                "lr",
                "vae_gate",
            )
        }
    )
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"  # a private copy: --out may be the folder the files come from
    tok_dir.mkdir(exist_ok=True)
    for name in sw_model.TOKENIZER_FILES:
        shutil.copy2(Path(args.tokenizer) / name, tok_dir / name)
    judge = load_judge(args.judge)
    t0 = time.monotonic()
    images, scenes = _dataset(cfg, work)
    vae_path = work / "vae"
    if args.resume and (vae_path / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_path).eval()
        gate = vae_gate_scores(vae, judge)
        vae_done = json.loads((vae_path / "train_info.json").read_text()).get("vae_steps_done")
    else:
        vae, gate, vae_done = train_vae(cfg, images, judge)
    latents, scale = encode_latents(vae, images)
    vae.save_pretrained(vae_path)
    (vae_path / "train_info.json").write_text(json.dumps({"vae_steps_done": vae_done, "gate": gate}))
    logger.info(
        "VAE ready (%.0f s): scaling_factor %.4f, gate %s", time.monotonic() - t0, scale, json.dumps(gate)
    )
    torch.manual_seed(cfg.seed + 3)
    parts = {
        "vae": vae.requires_grad_(False),
        "unet": sw_model.make_unet(),
        "text_encoder": sw_model.make_text_encoder(),
        "tokenizer": sw_model.load_tokenizer(tok_dir),
    }
    info = {
        "config": asdict(cfg),
        "vae_steps_done": vae_done,
        "vae_gate": gate,
        "scaling_factor": scale,
        "threads": args.threads,
        "command": "python -m concept_guard.shapesworld.train "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    info = train_unet(
        cfg,
        parts,
        latents,
        scenes,
        judge,
        work,
        tok_dir,
        out,
        info,
        resume=args.resume,
        stop_after=args.stop_after,
    )
    logger.info(
        "done in %.0f s; model at %s (%.2f MB)", time.monotonic() - t0, out, sw_model.folder_bytes(out) / 1e6
    )


if __name__ == "__main__":
    main()
