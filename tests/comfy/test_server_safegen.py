"""A real headless ComfyUI runs the SafeGen example workflows through ``/prompt``: LoadImage -> SafeGen ->
KSampler on a tiny SD1.5 checkpoint, the saved edit through the stock LoRA loader, and the ShapesWorld graph
(Render -> SafeGen -> samplers -> judges) with a shrunk budget."""

from __future__ import annotations

import numpy as np
from PIL import Image
from safetensors import safe_open
from test_server_e2e import checkpoint, messages, object_info, preview_images, tiny_prompt  # noqa: F401
from workflows import node_ids, queue, set_inputs

SAFEGEN = "ConceptGuardSafeGen"


def test_censor_workflow_saves_an_edit_the_stock_lora_loader_applies(comfy_server, checkpoint, object_info):  # noqa: F811
    (comfy_server.base_dir / "input").mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(
        comfy_server.base_dir / "input" / "concept.png"
    )
    prompt = tiny_prompt("safegen_censor.json", object_info)
    set_inputs(prompt, SAFEGEN, steps=2, resolution=64, benign_prompts="a cat")
    (safegen,) = node_ids(prompt, SAFEGEN)
    (sampler,) = node_ids(prompt, "KSampler")
    assert prompt[sampler]["inputs"]["model"] == [safegen, 0]
    entry = queue(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = comfy_server.base_dir / "models" / "loras" / "concept_guard" / "censored_concept.safetensors"
    with safe_open(str(saved), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(".attn1." in k and k.endswith((".diff", ".diff_b")) for k in keys)
    assert meta["concept_guard.method"] == "safegen" and meta["concept_guard.images"] == "1"
    (preview,) = node_ids(prompt, "PreviewImage")
    assert preview_images(comfy_server, entry, preview)[0].is_file()
    (report,) = node_ids(prompt, "PreviewAny")
    assert "saved" in entry["outputs"][report]["text"][0]

    loader = prompt[node_ids(prompt, "CheckpointLoaderSimple")[0]]
    graph = {
        "1": loader,
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {
                "model": ["1", 0],
                "lora_name": "concept_guard/censored_concept.safetensors",
                "strength_model": 1.0,
            },
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "seed": 0,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["3", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    }
    assert queue(comfy_server, graph)["status"]["status_str"] == "success"
    assert "lora key not loaded" not in comfy_server.log()

    entry = queue(comfy_server, tiny_prompt("safegen_censor.json", object_info))  # same name, other settings
    assert entry["status"]["status_str"] == "error"
    (error,) = messages(entry, "execution_error")
    assert error["node_id"] == safegen and "already exists" in error["exception_message"]


def test_shapesworld_safegen_workflow_runs_and_judges_mosaics(comfy_server, object_info):  # noqa: F811
    prompt = tiny_prompt("shapesworld_safegen.json", object_info)
    set_inputs(prompt, SAFEGEN, steps=3)
    set_inputs(prompt, "EmptyLatentImage", width=64, height=64, batch_size=2)
    set_inputs(prompt, "ConceptGuardShapesWorldRender", count=4)
    entry = queue(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    judges = node_ids(prompt, "ConceptGuardShapesWorldJudge")
    labels = sorted(prompt[j]["inputs"]["label"] for j in judges)
    assert labels == ["heart", "mosaic"]
    for j in judges:
        assert "2 images" in entry["outputs"][j]["text"][0] and "mosaic" in entry["outputs"][j]["text"][0]
