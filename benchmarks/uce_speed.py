"""Closed-form erasure speed: ours against a faithful loop of the official UCE script, same edit, one run.

The official ``edit_model`` solves every cross-attention key/value projection on its own: for each projection it
re-encodes every preserved prompt with the text encoder, runs every projection on the anchor and preserved
vectors (to use one of them), sums outer products and inverts a ``d × d`` matrix. Ours encodes each prompt once,
reads each weight once and solves one ``d × d`` system shared by all projections (see
``concept_guard.core.methods.uce``). Both start from the loaded model and produce the same weights (the table
reports the largest difference).

    python benchmarks/uce_speed.py --model sd15-random        # full-size SD1.5 UNet + CLIP-L, random weights
    python benchmarks/uce_speed.py --model shapesworld
    python benchmarks/uce_speed.py --model sd15-random --device cuda
"""

from __future__ import annotations

import argparse
import json

import torch
from _common import build_backend, device_name, timed
from concept_guard.core.methods.uce import UCE_MODULES, UCEConfig, train

CONCEPT = "a circle"
#: Ten preserved concepts, as a user would list them.
PRESERVE = (
    "a square",
    "a star",
    "a triangle",
    "a heart",
    "a dog",
    "a tree",
    "a house",
    "a car",
    "a flower",
    "a mountain",
)


def _rows_from_last_word(backend, prompt: str) -> torch.Tensor:
    """The official script's slice: the prompt's last word and every token after it."""
    ids = backend.tokenizers[0](
        [prompt], padding="max_length", max_length=backend.tokenizers[0].model_max_length, return_tensors="pt"
    ).input_ids.to(backend.text_encoders[0].device)
    with torch.no_grad():
        emb = backend.text_encoders[0](ids)[0][0].to(backend.device)
    return emb, backend.count_tokens(prompt)


def reference_edit(backend, cfg: UCEConfig) -> dict[str, torch.Tensor]:
    """The official ``edit_model`` loop (technique "replace", with_to_k), on copies of the weights."""
    modules = dict(backend.unet.named_modules())
    names = [backend.keymap.to_diffusers(n) for n in UCE_MODULES.select(backend.unet_module_names())]
    projections = [modules[n] for n in names]
    old_emb, n_old = _rows_from_last_word(backend, CONCEPT)
    new_emb, n_new = _rows_from_last_word(backend, cfg.anchor)
    far = max(n_old, n_new)
    old = old_emb[n_old : len(old_emb) - max(0, far - n_old)]
    new = new_emb[n_new : len(new_emb) - max(0, far - n_new)]
    out = {}
    for i, layer in enumerate(projections):
        w = layer.weight.detach().float()
        mat1 = cfg.lamb * w
        mat2 = cfg.lamb * torch.eye(w.shape[1], device=w.device)
        with torch.no_grad():
            values = [p(new).detach().float() for p in projections]  # every projection, one used
        mat1 = mat1 + cfg.erase_scale * values[i].T @ old
        mat2 = mat2 + cfg.erase_scale * old.T @ old
        for prompt in cfg.preserve:  # re-encoded for every projection, as the script does
            emb, n = _rows_from_last_word(backend, prompt)
            ctx = emb[n:]
            with torch.no_grad():
                values = [p(ctx).detach().float() for p in projections]
            mat1 = mat1 + cfg.effective_preserve_scale * values[i].T @ ctx
            mat2 = mat2 + cfg.effective_preserve_scale * ctx.T @ ctx
        out[names[i]] = mat1 @ torch.inverse(mat2) - w
    return out


def objective(backend, cfg: UCEConfig, deltas: dict[str, torch.Tensor]) -> float:
    """UCE's objective (fp64) summed over the projections, for diffusers-named deltas: lower is a better solve."""
    from concept_guard.core.methods.uce import _pairs

    c, a, p = _pairs(backend, cfg)
    total = 0.0
    for name, delta in deltas.items():
        w = backend.unet_weight(backend.keymap.to_ldm(name)).double().cpu()
        new = w + delta.double().cpu()
        total += cfg.erase_scale * float(((c.cpu() @ new.T - a.cpu() @ w.T) ** 2).sum())
        total += cfg.effective_preserve_scale * float(((p.cpu() @ (new - w).T) ** 2).sum())
        total += cfg.lamb * float(((new - w) ** 2).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default="sd15-random", help="'sd15-random', 'shapesworld', or a pipeline folder/file"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    backend = build_backend(args.model, device)
    cfg = UCEConfig(concepts=CONCEPT, preserve=PRESERVE)
    ref, ref_deltas = timed(lambda: reference_edit(backend, cfg), device)
    ours, result = timed(lambda: train(cfg, backend), device)
    rece, _ = timed(
        lambda: train(UCEConfig(concepts=CONCEPT, preserve=PRESERVE, method="rece"), backend), device
    )
    diff = max(
        float((result.tensors[f"{backend.keymap.to_ldm(n)}.weight"] - d.cpu()).abs().max())
        for n, d in ref_deltas.items()
    )
    scale = max(float(d.abs().max()) for d in ref_deltas.values())
    table = {
        "device": device_name(device),
        "model": args.model,
        "projections": len(ref_deltas),
        "preserved": len(PRESERVE),
        "reference": ref,
        "ours": ours,
        "rece_3_rounds": rece,
        "speedup": round(ref["seconds"] / ours["seconds"], 2),
        "max_abs_diff": diff,
        "max_abs_delta": scale,
        "objective_reference": objective(backend, cfg, ref_deltas),
        "objective_ours": objective(
            backend,
            cfg,
            {backend.keymap.to_diffusers(k.removesuffix(".weight")): v for k, v in result.tensors.items()},
        ),
    }
    if args.json:
        print(json.dumps(table))
        return
    print(
        f"closed-form erasure on {table['device']}, model {args.model}: 1 concept, {len(PRESERVE)} preserved, "
        f"{table['projections']} projections"
    )
    print(f"{'loop':<16}{'seconds':>10}{'CPU s':>10}{'peak MiB':>10}")
    for name in ("reference", "ours", "rece_3_rounds"):
        r = table[name]
        print(f"{name:<16}{r['seconds']:>10.3f}{r['cpu_seconds']:>10.3f}{r['peak_mem_bytes'] / 2**20:>10.1f}")
    print(f"speedup {table['speedup']}x; largest weight difference {diff:.3g} (largest delta {scale:.3g})")
    print(
        f"UCE objective (fp64, lower is better): reference {table['objective_reference']:.6g}, "
        f"ours {table['objective_ours']:.6g}"
    )


if __name__ == "__main__":
    main()
