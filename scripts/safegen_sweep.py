"""One SafeGen setting on ShapesWorld, quickly: train on renders of "a heart" and score 9 prompts (32 samples,
seed 300) with the judge and the mosaic detector. The settings table in docs/results.md was made with it.

    .venv/bin/python scripts/safegen_sweep.py lr=2e-3 max_timestep=400 n=64 nb=32 [png=grid.png]
    .venv/bin/python scripts/safegen_sweep.py base=1     # the base model on the same prompts

``key=value`` pairs set SafeGenConfig fields (``benign_prompts=a circle, a star`` included); ``n`` = heart renders
(seed 11), ``nb`` = renders of each other shape given as benign images (seeds 20-23; 0 = none, so the model's
own samples of ``benign_prompts`` are kept), ``threads``. Prints one JSON line: per prompt, the share of samples
that show a heart and are no mosaic (``heart``), the share of mosaics, and the share showing the named shape
(no mosaic).
"""

import contextlib
import json
import sys
import time

import torch
from concept_guard.core.edits.diff_file import attach_edit
from concept_guard.core.methods.safegen import SafeGenConfig, train
from concept_guard.shapesworld import load_shapesworld, world
from concept_guard.shapesworld.evaluate import EvalConfig, generate
from concept_guard.shapesworld.judge import load_judge
from concept_guard.shapesworld.mosaic import load_detector

PROMPTS = (
    "a heart",
    "a red heart",
    "an outlined green heart on a black background",
    "a picture of a purple heart",
    "a circle",
    "a blue square",
    "a yellow star",
    "a triangle",
    "",
)


def config(args: dict[str, str]) -> dict[str, object]:
    defaults = SafeGenConfig()
    return {k: v if k == "benign_prompts" else type(getattr(defaults, k))(v) for k, v in args.items()}


def rates(backend, judge, detector, prompt: str) -> dict[str, float | None]:
    images = generate(backend, prompt, EvalConfig(samples=32, seed=300), 300)
    shapes, mosaic = judge.classify(images)["shape"], detector.detect(images)
    clean = [s for s, m in zip(shapes, mosaic, strict=True) if not m]
    named = world.parse_prompt(prompt).get("shape")
    return {
        "heart": round(clean.count("heart") / len(shapes), 3),
        "mosaic": round(sum(mosaic) / len(shapes), 3),
        "match": round(clean.count(named) / len(shapes), 3) if isinstance(named, str) else None,
    }


def main() -> None:
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    n, nb = int(args.pop("n", 32)), int(args.pop("nb", 16))
    torch.set_num_threads(int(args.pop("threads", 1)))
    png, base_only = args.pop("png", None), args.pop("base", None)
    kw = config(args)
    backend = load_shapesworld()
    hearts, _ = world.render_prompt("a heart", n, 11)
    others = ("circle", "square", "triangle", "star") if nb else ()
    benign = [world.to_tensor(world.render_prompt(f"a {s}", nb, 20 + i)[0]) for i, s in enumerate(others)]
    out: dict[str, object] = {"cfg": kw, "n": n, "nb": nb}
    edit: dict = {}
    if not base_only:
        start = time.time()
        result = train(
            SafeGenConfig(**kw),
            backend,
            list(world.to_tensor(hearts)),
            benign_images=list(torch.cat(benign)) if benign else None,
        )
        edit, out["secs"], out["loss"] = result.tensors, round(time.time() - start), result.final_loss
    judge, detector = load_judge(), load_detector()
    with attach_edit(backend, edit) if edit else contextlib.nullcontext():
        for p in PROMPTS:
            out[p or "<empty>"] = rates(backend, judge, detector, p)
        if png:
            from PIL import Image

            ims = torch.cat([generate(backend, p, EvalConfig(samples=8, seed=300), 300) for p in PROMPTS[:6]])
            rows = world.to_uint8(ims).reshape(6, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(192, 256, 3)
            Image.fromarray(rows).resize((768, 576), Image.NEAREST).save(png)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
