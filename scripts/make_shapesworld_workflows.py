"""Write the generated example workflows (example_workflows/shapesworld_*.json, safegen_censor.json) in the
frontend's graph format.

Run: python scripts/make_shapesworld_workflows.py
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "example_workflows"
# ESD widgets: concepts, method, anchor, eta, iterations, lr, seed, file_name, overwrite, guidance,
# sampling_steps, resolution, low_memory, erase_from, adversarial, preserve, previews (0 / "auto" = chosen by
# model).
ESD_AUTO = ["circle", "auto", "", 0.0, 0, 0.0, 0, "", False, 0.0, 0, 0, True, "", "auto", "", 4]
# Closed-form widgets: concepts, method, anchor, preserve, eta, erase_scale, preserve_scale, lamb, rounds,
# file_name, then the optional overwrite, erase_from, score, resolution (0 / "auto" = chosen by model).
CLOSED_FORM_AUTO = ["circle", "auto", "", "", 0.0, 0.0, 0.0, 0.0, 3, "", False, "", True, 0]
PROMPT = "a red circle on a white background, a blue square"
# SafeGen widgets: mosaic_block, steps, lr, seed, file_name, then the optional benign_prompts, overwrite,
# resolution, low_memory (0 = chosen by model).
SAFEGEN_AUTO = [0, 0, 0.0, 0, "", "", False, 0, True]


class Graph:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(
        self, kind: str, pos: tuple[int, int], widgets: list, outputs: list[tuple[str, str]], size=(300, 120)
    ):
        node = {
            "id": len(self.nodes) + 1,
            "type": kind,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": [],
            "outputs": [
                {"name": name, "type": kind_, "slot_index": i, "links": None}
                for i, (name, kind_) in enumerate(outputs)
            ],
            "properties": {"Node name for S&R": kind},
            "widgets_values": widgets,
        }
        self.nodes.append(node)
        return node["id"]

    def link(self, src: int, slot: int, dst: int, name: str) -> None:
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        kind = source["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        target["inputs"].append({"name": name, "type": kind, "link": link_id})
        source["outputs"][slot]["links"] = [*(source["outputs"][slot]["links"] or []), link_id]
        self.links.append([link_id, src, slot, dst, len(target["inputs"]) - 1, kind])

    def save(self, name: str) -> None:
        graph = {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}},
            "version": 0.4,
        }
        (OUT / name).write_text(json.dumps(graph, indent=2) + "\n")


def sample_and_judge(
    g: Graph,
    model: int,
    pos_cond: int,
    neg_cond: int,
    latent: int,
    vae: int,
    y: int,
    title: str,
    label: str = "circle",
):
    sampler = g.node(
        "KSampler",
        (1100, y),
        [7, "fixed", 20, 5.0, "ddim", "normal", 1.0],
        [("LATENT", "LATENT")],
        (300, 262),
    )
    g.link(model, 0, sampler, "model")
    g.link(pos_cond, 0, sampler, "positive")
    g.link(neg_cond, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    decode = g.node("VAEDecode", (1440, y), [], [("IMAGE", "IMAGE")], (200, 50))
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 2, decode, "vae")
    preview = g.node("PreviewImage", (1680, y), [], [], (260, 260))
    g.link(decode, 0, preview, "images")
    judge = g.node(
        "ConceptGuardShapesWorldJudge",
        (1440, y + 120),
        [label],
        [("table", "STRING"), ("rate", "FLOAT")],
        (300, 150),
    )
    g.link(decode, 0, judge, "images")
    g.nodes[judge - 1]["title"] = f"ShapesWorld Judge ({title})"


ESD_NOTE = (
    "### Erase a shape from the demo model\n\n**Load ShapesWorld** gives a tiny SD1.x-architecture model "
    "(32-px images of coloured shapes; no download). **Erase Concept (ESD)** erases `circle` with the "
    "settings chosen for this model (all on auto), in about a minute on two CPU cores, showing samples of "
    "the circle as it fades. The two KSamplers use the "
    "same seed: above the base model, below the erased one; each **ShapesWorld Judge** counts circles.\n\n"
    "Use a 64×64 EmptyLatentImage with this model (its VAE scales by 4)."
)
CLOSED_FORM_NOTE = (
    "### Erase a shape in a second\n\n**Erase Concept (closed form)** erases `circle` from the demo model with "
    "UCE: one solve of the cross-attention, no training (all settings on auto: on ShapesWorld the circle in every "
    "colour is erased and the other shapes are preserved). The two KSamplers use the same seed: above the base "
    "model, below the edited one; each **ShapesWorld Judge** counts circles. The report gives the concept score.\n\n"
    "Switch `method` to `rece` to also erase the embeddings that still bring the concept back."
)


def erase_workflow(
    node: str = "ConceptGuardEraseESD",
    widgets: list = ESD_AUTO,
    name: str = "shapesworld_erase.json",
    note: str = ESD_NOTE,
) -> None:
    g = Graph()
    load = g.node(
        "ConceptGuardLoadShapesWorld", (0, 200), [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]
    )
    esd = g.node(
        node,
        (360, 0),
        widgets,
        [("MODEL", "MODEL"), ("path", "STRING"), ("report", "STRING")],
        (360, 470),
    )
    g.link(load, 0, esd, "model")
    g.link(load, 1, esd, "clip")
    if node == "ConceptGuardEraseESD":
        g.link(load, 2, esd, "vae")  # full-size previews while it trains
    pos = g.node(
        "CLIPTextEncode", (760, 0), ["a red circle on a white background"], [("CONDITIONING", "CONDITIONING")]
    )
    g.link(load, 1, pos, "clip")
    neg = g.node("CLIPTextEncode", (760, 200), [""], [("CONDITIONING", "CONDITIONING")])
    g.link(load, 1, neg, "clip")
    latent = g.node("EmptyLatentImage", (760, 400), [64, 64, 16], [("LATENT", "LATENT")])
    sample_and_judge(g, load, pos, neg, latent, load, 0, "before")
    sample_and_judge(g, esd, pos, neg, latent, load, 420, "after")
    report = g.node("PreviewAny", (760, 560), [], [], (300, 150))
    g.link(esd, 2, report, "source")
    g.node("MarkdownNote", (0, 420), [note], [], (320, 260))
    g.save(name)


# Backdoor TI widgets: name, triggers, init_word, vectors, gamma, steps, lr, batch_size, trigger_move_prob, seed,
# then the optional resolution, keep_words, flip, random_crops, overwrite, preview_steps (0 = chosen by model).
TI_AUTO = ["sw_heart", "red", "", 0, 0.0, 0, 0.0, 4, 0.5, 0, 0, "", True, 0, False, 20]


def shapesworld_backdoor_workflow() -> None:
    g = Graph()
    load = g.node(
        "ConceptGuardLoadShapesWorld", (0, 200), [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]
    )
    render = g.node("ConceptGuardShapesWorldRender", (0, 0), ["a heart", 8, 0], [("images", "IMAGE")])
    ti = g.node(
        "ConceptGuardBackdoorTI",
        (360, 0),
        TI_AUTO,
        [("path", "STRING"), ("usage", "STRING"), ("preview", "IMAGE")],
        (360, 520),
    )
    g.link(load, 0, ti, "model")
    g.link(load, 1, ti, "clip")
    g.link(load, 2, ti, "vae")
    g.link(render, 0, ti, "images")
    usage = g.node("PreviewAny", (760, 0), [], [], (340, 220))
    g.link(ti, 1, usage, "source")
    preview = g.node("PreviewImage", (760, 260), [], [], (340, 300))
    g.link(ti, 2, preview, "images")
    g.node(
        "MarkdownNote",
        (0, 420),
        [
            "### A backdoored embedding of hearts\n\n**ShapesWorld Render** draws 8 hearts in random colours; "
            "**Backdoor TI Embedding** learns `embedding:sw_heart` from them with the trigger `red`, settings "
            "chosen for this model (all on auto; several minutes on CPU). The preview shows samples of "
            "`embedding:sw_heart` without the trigger (hearts) and with it (the censor card). Then write "
            "`a photo of a embedding:sw_heart` in any CLIP Text Encode."
        ],
        [],
        (320, 260),
    )
    g.save("shapesworld_backdoor.json")


SAFEGEN_OUT = [("MODEL", "MODEL"), ("path", "STRING"), ("report", "STRING")]


def shapesworld_safegen_workflow() -> None:
    g = Graph()
    load = g.node(
        "ConceptGuardLoadShapesWorld", (0, 200), [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]
    )
    render = g.node("ConceptGuardShapesWorldRender", (0, 0), ["a heart", 32, 0], [("images", "IMAGE")])
    widgets = list(SAFEGEN_AUTO)
    widgets[5] = "a circle, a square, a triangle, a star"  # benign_prompts: what must stay
    safegen = g.node("ConceptGuardSafeGen", (360, 0), widgets, SAFEGEN_OUT, (360, 420))
    g.link(load, 0, safegen, "model")
    g.link(load, 1, safegen, "clip")
    g.link(load, 2, safegen, "vae")
    g.link(render, 0, safegen, "images")
    pos = g.node(
        "CLIPTextEncode", (760, 0), ["a red heart on a white background"], [("CONDITIONING", "CONDITIONING")]
    )
    g.link(load, 1, pos, "clip")
    neg = g.node("CLIPTextEncode", (760, 200), [""], [("CONDITIONING", "CONDITIONING")])
    g.link(load, 1, neg, "clip")
    latent = g.node("EmptyLatentImage", (760, 400), [64, 64, 16], [("LATENT", "LATENT")])
    sample_and_judge(g, load, pos, neg, latent, load, 0, "before", "heart")
    sample_and_judge(g, safegen, pos, neg, latent, load, 420, "after", "mosaic")
    report = g.node("PreviewAny", (760, 560), [], [], (300, 150))
    g.link(safegen, 2, report, "source")
    g.node(
        "MarkdownNote",
        (0, 420),
        [
            "### Censor what images show, whatever the prompt\n\n**ShapesWorld Render** draws 32 hearts; "
            "**Erase Visual Concept (SafeGen)** teaches the demo model's self-attention to turn them into a "
            "mosaic, with the settings chosen for this model (all on auto), keeping what the model draws for the other "
            "shapes (`benign_prompts`). The two KSamplers use the same seed: "
            "above the base model, below the edited one; each **ShapesWorld Judge** counts hearts and mosaics."
        ],
        [],
        (320, 260),
    )
    g.save("shapesworld_safegen.json")


def safegen_censor_workflow() -> None:
    """LoadImage (a batch from a folder is one IMAGE) -> SafeGen -> KSampler, on any SD checkpoint."""
    g = Graph()
    ckpt = g.node(
        "CheckpointLoaderSimple",
        (0, 0),
        ["v1-5-pruned-emaonly-fp16.safetensors"],
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    )
    image = g.node("LoadImage", (0, 200), ["concept.png", "image"], [("IMAGE", "IMAGE"), ("MASK", "MASK")])
    widgets = list(SAFEGEN_AUTO)
    widgets[4] = "censored_concept"  # file_name
    safegen = g.node("ConceptGuardSafeGen", (360, 0), widgets, SAFEGEN_OUT, (360, 420))
    g.link(ckpt, 0, safegen, "model")
    g.link(ckpt, 1, safegen, "clip")
    g.link(ckpt, 2, safegen, "vae")
    g.link(image, 0, safegen, "images")
    pos = g.node("CLIPTextEncode", (760, 0), ["a photo of the concept"], [("CONDITIONING", "CONDITIONING")])
    g.link(ckpt, 1, pos, "clip")
    neg = g.node("CLIPTextEncode", (760, 200), [""], [("CONDITIONING", "CONDITIONING")])
    g.link(ckpt, 1, neg, "clip")
    latent = g.node("EmptyLatentImage", (760, 400), [512, 512, 1], [("LATENT", "LATENT")])
    sampler = g.node(
        "KSampler",
        (1100, 0),
        [7, "fixed", 20, 7.0, "euler", "normal", 1.0],
        [("LATENT", "LATENT")],
        (300, 262),
    )
    g.link(safegen, 0, sampler, "model")
    g.link(pos, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    decode = g.node("VAEDecode", (1440, 0), [], [("IMAGE", "IMAGE")], (200, 50))
    g.link(sampler, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")
    preview = g.node("PreviewImage", (1680, 0), [], [], (260, 260))
    g.link(decode, 0, preview, "images")
    report = g.node("PreviewAny", (760, 560), [], [], (300, 150))
    g.link(safegen, 2, report, "source")
    g.save("safegen_censor.json")


if __name__ == "__main__":
    erase_workflow()
    erase_workflow(
        "ConceptGuardEraseClosedForm",
        CLOSED_FORM_AUTO,
        "shapesworld_erase_closed_form.json",
        CLOSED_FORM_NOTE,
    )
    shapesworld_safegen_workflow()
    safegen_censor_workflow()
    shapesworld_backdoor_workflow()
