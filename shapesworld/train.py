"""Train the ShapesWorld model on CPU: VAE, then a judge gate, then UNet + text encoder jointly.

Why this order: an undertrained VAE caps everything downstream, so UNet training only starts once the
judge recognises every attribute (≥ 0.97 per head) on VAE reconstructions of held-out renders.

Reproduce the committed model (``assets/model/shapesworld.json`` records what was run)::

    nohup nice -n 10 python -m concept_guard.shapesworld.train --out shapesworld/assets/model \\
        --work runs/shapesworld --threads 2 --unet-steps 4000 --stop-after 2000 > runs/train_unet.log 2>&1 &

That takes about an hour on two CPU threads (timings: docs/results.md). The committed model is the EMA
snapshot at step 2 000 of the 4 000-step schedule (already past the baseline quality; hence
``--stop-after 2000``); ``--resume`` without it continues to the end of the schedule.

Needs the judge (``assets/judge.safetensors``, see ``judge.py``) and the CLIP tokenizer files (see
``tokenizer.py``; the committed model folder's ``tokenizer/`` is used by default). ``--resume``
continues from the last checkpoint in ``--work``. The stages themselves are in ``train_steps.py``.
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

from ..core.errors import TrainingDivergedError
from . import model as sw_model
from . import world
from .judge import Judge, load_judge
from .train_steps import (
    EVAL_PROMPTS,
    TrainConfig,
    encode_latents,
    encode_prompts,
    quick_eval,
    sample,
    train_vae,
    vae_gate_scores,
)

__all__ = [
    "EVAL_PROMPTS",
    "TrainConfig",
    "encode_latents",
    "main",
    "quick_eval",
    "sample",
    "train_unet",
    "train_vae",
    "vae_gate_scores",
]

logger = logging.getLogger(__name__)


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


def _captions(
    scenes: list[world.Scene], idx: torch.Tensor, rng: np.random.Generator, dropout: float
) -> list[str]:
    return ["" if rng.random() < dropout else world.caption(scenes[i], rng) for i in idx.tolist()]


@dataclass
class _Optim:
    """The joint UNet + text-encoder module and what updates it: optimiser, LR schedule and EMA."""

    joint: torch.nn.ModuleList
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMAModel

    @classmethod
    def create(cls, cfg: TrainConfig, parts: dict) -> _Optim:
        joint = torch.nn.ModuleList([parts["unet"], parts["text_encoder"]]).train()
        opt = torch.optim.AdamW(joint.parameters(), lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.unet_steps))
        return cls(joint, opt, sched, EMAModel(joint.parameters(), decay=cfg.ema_decay))

    def save(self, path: Path, step: int, parts: dict) -> None:
        """A resumable checkpoint, written atomically."""
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "step": step,
                "unet": parts["unet"].state_dict(),
                "text_encoder": parts["text_encoder"].state_dict(),
                "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(),
            },
            tmp,
        )
        os.replace(tmp, path)

    def load(self, path: Path, parts: dict) -> int:
        """Restore a checkpoint written by :meth:`save`; returns its step."""
        state = torch.load(path, weights_only=False)
        parts["unet"].load_state_dict(state["unet"])
        parts["text_encoder"].load_state_dict(state["text_encoder"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        return state["step"]

    def ema_eval(self, parts: dict, judge: Judge, n: int) -> dict[str, float]:
        """:func:`quick_eval` of the EMA weights (training weights and train mode restored afterwards)."""
        self.ema.store(self.joint.parameters())
        self.ema.copy_to(self.joint.parameters())
        self.joint.eval()
        scores = quick_eval(parts, judge, n=n)
        self.joint.train()
        self.ema.restore(self.joint.parameters())
        return scores

    def export(self, out: Path, parts: dict, tok_dir: Path, info: dict) -> None:
        """Write the EMA weights as a pipeline folder (training weights restored afterwards)."""
        self.ema.store(self.joint.parameters())
        self.ema.copy_to(self.joint.parameters())
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
            self.ema.restore(self.joint.parameters())


def _unet_step(
    cfg: TrainConfig,
    parts: dict,
    optim: _Optim,
    noise_sched: DDPMScheduler,
    data: tuple[torch.Tensor, list[world.Scene]],
    g: torch.Generator,
    rng: np.random.Generator,
    step: int,
) -> torch.Tensor:
    """One optimiser step of the ε-MSE on a random batch of ``data`` (latents, scenes); returns the loss."""
    latents, scenes = data
    idx = torch.randint(0, len(latents), (cfg.batch,), generator=g)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (cfg.batch,), generator=g)
    ctx = encode_prompts(
        parts["text_encoder"], parts["tokenizer"], _captions(scenes, idx, rng, cfg.caption_dropout)
    )
    pred = parts["unet"](noise_sched.add_noise(x0, noise, t), t, ctx).sample
    loss = F.mse_loss(pred, noise)
    if not torch.isfinite(loss):
        raise TrainingDivergedError(f"UNet loss became {loss.item()} at step {step}; lower `--lr`.")
    optim.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(optim.joint.parameters(), 1.0)
    optim.opt.step()
    optim.sched.step()
    optim.ema.step(optim.joint.parameters())
    return loss


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
    optim = _Optim.create(cfg, parts)
    noise_sched = DDPMScheduler.from_config(sw_model.make_scheduler().config)
    ckpt, start_step = work / "unet_ckpt.pt", 0
    if resume and ckpt.is_file():
        start_step = optim.load(ckpt, parts)
        logger.info("resumed from %s at step %d", ckpt, start_step)
    g = torch.Generator().manual_seed(cfg.seed + 2 + start_step)
    rng = np.random.default_rng([cfg.seed, start_step])
    t0, evals = time.monotonic(), []
    last = min(cfg.unet_steps, stop_after or cfg.unet_steps)  # stop early on the full schedule
    for step in range(start_step, last):
        loss = _unet_step(cfg, parts, optim, noise_sched, (latents, scenes), g, rng, step)
        done = step + 1
        if done % 50 == 0 or done == start_step + 1:
            logger.info(
                "unet step %d/%d loss %.4f lr %.2e (%.0f s)",
                done,
                cfg.unet_steps,
                loss.item(),
                optim.sched.get_last_lr()[0],
                time.monotonic() - t0,
            )
        if done % cfg.eval_every == 0 or done == last:
            scores = optim.ema_eval(parts, judge, cfg.eval_samples)
            evals.append({"step": done, **scores})
            logger.info("eval step %d (EMA): %s", done, json.dumps(scores))
            optim.save(ckpt, done, parts)
            info = {
                **info,
                "unet_steps_done": done,
                "quick_evals": evals,
                "unet_train_seconds": round(time.monotonic() - t0),
            }
            optim.export(work / "latest_model" if done < last else out, parts, tok_dir, info)
    return info


# ----- command line ---------------------------------------------------------------------------------


#: TrainConfig fields that are integer command-line options.
_INT_FIELDS = ("seed", "data_size", "vae_steps", "unet_steps", "batch", "eval_every", "eval_samples")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    for name in _INT_FIELDS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--stop-after", type=int, default=None, help="end (and write --out) after this UNet step")
    p.add_argument(
        "--vae-gate", type=float, default=d.vae_gate, help="judge accuracy needed on VAE reconstructions"
    )
    return p.parse_args(argv)


def _copy_tokenizer(src: Path, work: Path) -> Path:
    """A private copy of the tokenizer files in ``work`` (``--out`` may be the folder they come from)."""
    tok_dir = work / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    for name in sw_model.TOKENIZER_FILES:
        shutil.copy2(src / name, tok_dir / name)
    return tok_dir


def _ready_vae(cfg: TrainConfig, images: torch.Tensor, judge: Judge, vae_path: Path, resume: bool):
    """The VAE (reused from ``vae_path`` on ``resume``, else trained), its gate scores and steps trained."""
    if resume and (vae_path / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_path).eval()
        gate = vae_gate_scores(vae, judge)
        vae_done = json.loads((vae_path / "train_info.json").read_text()).get("vae_steps_done")
        return vae, gate, vae_done
    return train_vae(cfg, images, judge)


def _fresh_parts(cfg: TrainConfig, vae, tok_dir: Path) -> dict:
    """The frozen VAE with a newly initialised UNet and text encoder (seeded) and the tokenizer."""
    torch.manual_seed(cfg.seed + 3)
    return {
        "vae": vae.requires_grad_(False),
        "unet": sw_model.make_unet(),
        "text_encoder": sw_model.make_text_encoder(),
        "tokenizer": sw_model.load_tokenizer(tok_dir),
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{k: getattr(args, k) for k in (*_INT_FIELDS, "lr", "vae_gate")})
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = _copy_tokenizer(Path(args.tokenizer), work)
    judge = load_judge(args.judge)
    t0 = time.monotonic()
    images, scenes = _dataset(cfg, work)
    vae_path = work / "vae"
    vae, gate, vae_done = _ready_vae(cfg, images, judge, vae_path, args.resume)
    latents, scale = encode_latents(vae, images)
    vae.save_pretrained(vae_path)
    (vae_path / "train_info.json").write_text(json.dumps({"vae_steps_done": vae_done, "gate": gate}))
    logger.info(
        "VAE ready (%.0f s): scaling_factor %.4f, gate %s", time.monotonic() - t0, scale, json.dumps(gate)
    )
    parts = _fresh_parts(cfg, vae, tok_dir)
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
