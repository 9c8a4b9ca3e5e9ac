"""The ESD node on the ShapesWorld demo model inside ComfyUI (what `shapesworld_erase.json` runs), phase by
phase: the earlier loop (one prompt's trajectories per batch while building the bank, gradient checkpointing on)
beside ours (prompts batched up to ``BANK_GROUP_PIXELS`` latent pixels, no checkpointing for UNets under
``MIN_CHECKPOINT_BYTES``), same auto settings, one process:

    COMFYUI_PATH=../shared/vendor/ComfyUI python benchmarks/esd_comfy_demo.py --threads 2

Prints a table of seconds per phase (bank, training, scoring, total) and the final loss of each run.
"""

from __future__ import annotations

import argparse
import time

import _comfy  # sibling modules (benchmarks run as scripts)
import torch


def run(earlier: bool) -> dict[str, float]:
    from concept_guard.comfy_backend import memory
    from concept_guard.core.methods import esd
    from concept_guard.nodes import _io
    from concept_guard.nodes.esd import EraseConceptESD
    from concept_guard.nodes.shapesworld import LoadShapesWorld

    saved = esd.BANK_GROUP_PIXELS, memory.MIN_CHECKPOINT_BYTES, _io._send
    marks: list[tuple[float, str]] = []
    if earlier:
        esd.BANK_GROUP_PIXELS, memory.MIN_CHECKPOINT_BYTES = 1, 0
    _io._send = lambda event: (
        marks.append((time.perf_counter(), event.get("phase", ""))) if "phase" in event else None
    )
    try:
        with torch.inference_mode():
            model, clip, _ = LoadShapesWorld.execute().result
            start = time.perf_counter()
            node = EraseConceptESD.PREPARE_CLASS_CLONE({"unique_id": "1"})
            settings = dict(method="auto", anchor="", eta=0.0, iterations=0, lr=0.0, seed=0, file_name="")
            report = node.execute(model=model, clip=clip, concepts="circle", previews=0, **settings).result[2]
            end = time.perf_counter()
    finally:
        esd.BANK_GROUP_PIXELS, memory.MIN_CHECKPOINT_BYTES, _io._send = saved
    when = {phase.split(" ")[0]: t for t, phase in marks}
    loss = next(line for line in report.splitlines() if line.startswith("final loss"))
    return {
        "bank": when["training"] - start,
        "training": when["scoring"] - when["training"],
        "scoring": end - when["scoring"],
        "total": end - start,
        "final loss": float(loss.split()[-1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    _comfy.setup("cpu")
    rows = {"earlier loop": run(earlier=True), "ours": run(earlier=False)}
    print("| loop | bank s | training s | scoring s | total s | final loss |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['bank']:.1f} | {r['training']:.1f} | {r['scoring']:.1f} | {r['total']:.1f} | "
            f"{r['final loss']:.4g} |"
        )


if __name__ == "__main__":
    main()
