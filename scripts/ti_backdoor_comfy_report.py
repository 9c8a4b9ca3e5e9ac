"""A backdoored ShapesWorld embedding used through stock ComfyUI nodes.

ShapesWorld is converted into ComfyUI MODEL / CLIP / VAE with the ComfyUI suite's converter
(``tests/comfy/shapesworld_comfy.py``, ComfyUI's own classes); the CLIP's embedding directory is set to the
embedding's folder, as ``CheckpointLoaderSimple`` sets it to ``models/embeddings``. Every prompt of
``core.demo.backdoor_prompt_sets`` then goes through ``CLIPTextEncode`` (``embedding:NAME`` resolved by
ComfyUI itself) -> ``KSampler`` (ddim, ddim_uniform, 20 steps, CFG 5, empty negative) -> ``VAEDecode``, and the
ShapesWorld judge labels the images. Prompt ``i`` of a set is sampled with seed ``--seed + i`` (one seed per
KSampler batch, as in a graph).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ti_backdoor_report.py --save s0/sw_backdoor.safetensors
    COMFYUI_PATH=../shared/vendor/ComfyUI OMP_NUM_THREADS=1 .venv/bin/python \\
        scripts/ti_backdoor_comfy_report.py --embedding s0/sw_backdoor.safetensors
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--embedding", required=True, help="the embedding file; its stem is NAME in embedding:NAME"
    )
    ap.add_argument("--triggers", default="red", help="the triggers it was trained with (comma-separated)")
    ap.add_argument("--concept-shape", default="heart")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()
    path = Path(args.embedding).resolve()
    if not path.is_file():
        ap.error(f"--embedding {args.embedding!r}: no such file")
    torch.set_num_threads(1)
    sys.path[:0] = [str(REPO_ROOT / "benchmarks"), str(REPO_ROOT / "tests" / "comfy")]
    import _comfy

    _comfy.setup("cpu")
    import comfy.utils
    from concept_guard.core.backends.diffusers_backend import DiffusersBackend
    from concept_guard.core.embeddings import add_embedding
    from concept_guard.core.methods.ti_backdoor.prompts import parse_triggers
    from concept_guard.shapesworld.judge import load_judge
    from concept_guard.shapesworld.recipes import backdoor_prompt_sets
    from shapesworld_comfy import load_shapesworld_comfy, shapesworld_folder

    import nodes  # ComfyUI's nodes.py

    comfy.utils.set_progress_bar_enabled(False)  # KSampler's per-prompt bars
    sw = load_shapesworld_comfy(shapesworld_folder())
    sw.clip.tokenizer.clip_l.embedding_directory = str(path.parent)
    judge, name = load_judge(), path.stem
    sets = backdoor_prompt_sets(name, parse_triggers(args.triggers), args.concept_shape)
    check = sets["utility"][0]  # ComfyUI must really find the file: its conditioning equals ours
    ours = DiffusersBackend.load(sw.folder)
    add_embedding(ours, path)
    with torch.inference_mode():
        (theirs,) = nodes.CLIPTextEncode().encode(sw.clip, check)
    if not torch.allclose(theirs[0][0].float(), ours.encode_text([check]).context, atol=1e-4):
        sys.exit(f"ComfyUI's conditioning of {check!r} differs from the embedding's: was the file found?")
    print(f"{'set':<32}{'P(' + args.concept_shape + ')':>10}{'P(target)':>11}  per prompt (shape, target)")
    with torch.inference_mode():
        (negative,) = nodes.CLIPTextEncode().encode(sw.clip, "")
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, args.samples)  # 8x8 latents = 32-px images
        for title, prompts in sets.items():
            rows = []
            for i, prompt in enumerate(prompts):
                (positive,) = nodes.CLIPTextEncode().encode(sw.clip, prompt)
                (samples,) = nodes.KSampler().sample(
                    sw.model, args.seed + i, 20, 5.0, "ddim", "ddim_uniform", positive, negative, latent
                )
                (images,) = nodes.VAEDecode().decode(sw.vae, samples)
                labels = judge.classify(images.movedim(-1, 1).clone())
                shape = Counter(labels["shape"])[args.concept_shape] / args.samples
                rows.append(
                    (prompt.replace(f"embedding:{name}", "S*"), shape, sum(labels["target"]) / args.samples)
                )
            shape_mean, target_mean = (sum(r[k] for r in rows) / len(rows) for k in (1, 2))
            detail = "; ".join(f"{p}: {s:.2f}, {t:.2f}" for p, s, t in rows)
            print(f"{title:<32}{shape_mean:>10.2f}{target_mean:>11.2f}  {detail}", flush=True)


if __name__ == "__main__":
    main()
