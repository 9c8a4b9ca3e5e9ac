"""A real headless ComfyUI runs the shipped example workflows end to end through ``/prompt`` and ``/history``.

The checkpoint is a tiny random SD1.5 that ComfyUI's CheckpointLoaderSimple auto-detects, written into the
server's temp ``models/checkpoints/`` at test time. The workflows are the UI files users drag in,
converted like the frontend does; only sizes and step counts are shrunk.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from tiny_checkpoint import write_tiny_sd15_checkpoint
from workflows import EXAMPLES, load_workflow, node_ids, post_prompt, queue, set_inputs, ui_to_api

ESD = "ConceptGuardEraseESD"
TI = "ConceptGuardBackdoorTI"
CKPT = "tiny_sd15.safetensors"
TINY_ESD = dict(iterations=3, sampling_steps=2, resolution=64, lr=1e-3)  # 8x8 latents
TINY_SAMPLING = {"KSampler": dict(steps=2), "EmptyLatentImage": dict(width=64, height=64)}
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.json"))


@pytest.fixture(scope="module")
def checkpoint(comfy_server) -> str:
    folder = comfy_server.base_dir / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_sd15_checkpoint(folder / CKPT)
    return CKPT


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


def tiny_prompt(name: str, object_info: dict, *, unmute: bool = False, **esd) -> dict:
    prompt = ui_to_api(load_workflow(name), object_info, unmute=unmute)
    if node_ids(prompt, "CheckpointLoaderSimple"):  # the ShapesWorld workflows load no checkpoint
        set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=CKPT)
    if node_ids(prompt, ESD):
        set_inputs(prompt, ESD, **{**TINY_ESD, **esd})
    for class_type, values in TINY_SAMPLING.items():
        if node_ids(prompt, class_type):
            set_inputs(prompt, class_type, **values)
    return prompt


def downstream_only(prompt: dict, node_id: str) -> dict:
    """The prompt without the output branches that do not use ``node_id`` (their inputs kept as needed)."""

    def sources(nid: str) -> set[str]:
        return {v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2}

    def ancestors(nid: str) -> set[str]:
        seen, todo = set(), [nid]
        while todo:
            for src in sources(todo.pop()) - seen:
                seen.add(src)
                todo.append(src)
        return seen

    used = {src for nid in prompt for src in sources(nid)}
    keep = set()
    for out in (nid for nid in prompt if nid not in used):
        if node_id in ancestors(out) or out == node_id:
            keep |= {out, *ancestors(out)}
    return {nid: node for nid, node in prompt.items() if nid in keep}


def messages(entry: dict, kind: str) -> list[dict]:
    return [data for name, data in entry["status"]["messages"] if name == kind]


def preview_images(server, entry: dict, node_id: str) -> list[Path]:
    images = entry["outputs"][node_id]["images"]
    return [server.base_dir / image["type"] / image["subfolder"] / image["filename"] for image in images]


def edit_files(server) -> list[Path]:
    return sorted((server.base_dir / "models" / "loras").rglob("*.safetensors"))


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_is_a_consistent_ui_graph(name):
    workflow = load_workflow(name)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= len(workflow["links"])
    assert any(n["type"].startswith("ConceptGuard") for n in nodes.values())
    for link_id, src, slot, dst, dst_slot, kind in workflow["links"]:
        output, target = nodes[src]["outputs"][slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in output["links"] and target["link"] == link_id, link_id
        assert output["type"] == kind and target["type"] in (kind, "*"), link_id
    for node in nodes.values():
        for inp in node.get("inputs", []):
            assert inp["link"] is None or any(link[0] == inp["link"] for link in workflow["links"])


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_widget_values_fit_their_inputs(name, object_info):
    """Each saved widget value of our nodes has its input's type, and a choice is one of the choices (values
    sit by position, so a value saved in the wrong slot shows here)."""
    prompt = ui_to_api(load_workflow(name), object_info, unmute=True)
    for node in (n for n in prompt.values() if n["class_type"].startswith("ConceptGuard")):
        info = object_info[node["class_type"]]["input"]
        for key, value in node["inputs"].items():
            spec = info.get("required", {}).get(key) or info.get("optional", {})[key]
            if isinstance(value, list):  # a link
                continue
            kind = spec[0]
            if isinstance(kind, list) or kind == "COMBO":
                options = kind if isinstance(kind, list) else spec[1]["options"]
                assert value in options, (name, node["class_type"], key, value)
            else:
                want = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}.get(kind)
                assert want is None or isinstance(value, want), (name, node["class_type"], key, value)


def test_erase_then_sample_workflow(comfy_server, checkpoint, object_info):
    prompt = tiny_prompt("esd_erase_and_sample.json", object_info)
    assert {n["class_type"] for n in prompt.values()} >= {
        "CheckpointLoaderSimple",
        ESD,
        "KSampler",
        "PreviewImage",
    }
    (sampler,) = node_ids(prompt, "KSampler")
    (esd,) = node_ids(prompt, ESD)
    assert prompt[sampler]["inputs"]["model"] == [esd, 0]  # the erased MODEL feeds the sampler
    files_before = edit_files(comfy_server)

    entry = queue(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"], entry["status"]
    (preview,) = node_ids(prompt, "PreviewImage")
    (image,) = preview_images(comfy_server, entry, preview)
    with Image.open(image) as im:
        assert im.size == (64, 64)
    assert edit_files(comfy_server) == files_before  # empty file_name: nothing saved


def test_erase_and_save_workflow_then_the_stock_lora_loader(comfy_server, checkpoint, object_info):
    workflow = "esd_erase_and_save.json"
    first = tiny_prompt(workflow, object_info)
    assert not node_ids(first, "LoraLoaderModelOnly")  # group 2 ships muted: step 1 only trains and saves
    (esd,) = node_ids(first, ESD)
    expected = comfy_server.base_dir / "models" / "loras" / "concept_guard" / "no_van_gogh.safetensors"

    entry = queue(comfy_server, first)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (shown,) = node_ids(first, "PreviewAny")
    assert entry["outputs"][shown]["text"] == [str(expected)]
    with safe_open(str(expected), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("diffusion_model.") and k.endswith((".diff", ".diff_b")) for k in keys)
    assert all(".attn2." in k for k in keys)
    assert (
        meta["concept_guard.method"],
        meta["concept_guard.concepts"],
        meta["concept_guard.iterations"],
    ) == (
        "esd-x",
        "Van Gogh",
        "3",
    )
    saved_at = expected.stat().st_mtime_ns

    # Step 2: the user refreshes, unmutes group 2 and queues again; the loader lists and applies the file.
    loras = comfy_server.get_json("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]
    assert "concept_guard/no_van_gogh.safetensors" in loras["input"]["required"]["lora_name"][0]
    second = tiny_prompt(workflow, object_info, unmute=True)
    (loader,) = node_ids(second, "LoraLoaderModelOnly")
    assert second[loader]["inputs"]["lora_name"] == "concept_guard/no_van_gogh.safetensors"
    entry = queue(comfy_server, second)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert any(esd in m["nodes"] for m in messages(entry, "execution_cached"))  # no retraining
    assert expected.stat().st_mtime_ns == saved_at
    (preview,) = node_ids(second, "PreviewImage")
    assert preview_images(comfy_server, entry, preview)[0].is_file()
    assert "lora key not loaded" not in comfy_server.log()  # every key of the file was applied

    # Changing a setting retrains, and the existing file is refused with a clear message, not overwritten.
    entry = queue(comfy_server, tiny_prompt(workflow, object_info, seed=1))
    assert entry["status"]["status_str"] == "error"
    (error,) = messages(entry, "execution_error")
    assert error["node_id"] == esd and "already exists" in error["exception_message"]
    assert expected.stat().st_mtime_ns == saved_at


def test_backdoor_ti_workflow_writes_an_embedding_the_stock_prompt_syntax_uses(
    comfy_server, checkpoint, object_info
):
    """LoadImage -> Backdoor TI -> previews; then ``embedding:my_concept`` in a stock CLIPTextEncode finds the file."""
    import numpy as np

    (comfy_server.base_dir / "input").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(
        comfy_server.base_dir / "input" / "my_concept.png"
    )
    prompt = tiny_prompt("backdoor_ti_embedding.json", object_info)
    set_inputs(prompt, TI, steps=2, batch_size=1, resolution=64)
    (ti,) = node_ids(prompt, TI)
    entry = queue(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = comfy_server.base_dir / "models" / "embeddings" / "my_concept.safetensors"
    with safe_open(str(saved), framework="pt") as f:
        assert list(f.keys()) == ["my_concept"] and f.metadata()["concept_guard.trigger_count"] == "2"
    (usage,) = node_ids(prompt, "PreviewAny")
    assert "embedding:my_concept" in entry["outputs"][usage]["text"][0]
    (preview,) = node_ids(prompt, "PreviewImage")
    assert len(preview_images(comfy_server, entry, preview)) == 4  # 2 samples without, 2 with a trigger

    def encode(text: str) -> None:
        loader = prompt[node_ids(prompt, "CheckpointLoaderSimple")[0]]
        graph = {
            "1": loader,
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
        }
        assert queue(comfy_server, graph)["status"]["status_str"] == "success"

    encode("a photo of embedding:not_there")  # the log does show a missing embedding ...
    assert "embedding:not_there does not exist" in comfy_server.log()
    encode("a photo of embedding:my_concept")  # ... and ours is found and fits this CLIP
    log = comfy_server.log()
    assert "embedding:my_concept does not exist" not in log and "shape mismatch" not in log


def test_shapesworld_backdoor_workflow_needs_no_download(comfy_server, object_info):
    """Load ShapesWorld -> Render -> Backdoor TI -> usage and preview, with no checkpoint and no input image."""
    prompt = tiny_prompt("shapesworld_backdoor.json", object_info)
    set_inputs(prompt, TI, steps=3, preview_steps=2)
    entry = queue(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = comfy_server.base_dir / "models" / "embeddings" / "sw_heart.safetensors"
    with safe_open(str(saved), framework="pt") as f:
        assert f.metadata()["concept_guard.trigger_count"] == "1" and f.get_tensor("sw_heart").shape[0] == 8
    (usage,) = node_ids(prompt, "PreviewAny")
    assert "embedding:sw_heart" in entry["outputs"][usage]["text"][0]


@pytest.mark.parametrize(
    ("workflow", "node", "inputs", "kind"),
    [
        ("esd_erase_and_sample.json", ESD, {"guidance": 1000.0}, "value_bigger_than_max"),
        ("esd_erase_and_sample.json", ESD, {"iterations": -1}, "value_smaller_than_min"),
        ("esd_erase_and_sample.json", ESD, {"adversarial": "maybe"}, "custom_validation_failed"),
        ("backdoor_ti_embedding.json", TI, {"batch_size": 0}, "value_smaller_than_min"),
        ("safegen_censor.json", "ConceptGuardSafeGen", {"steps": -1}, "value_smaller_than_min"),
        ("safegen_censor.json", "ConceptGuardSafeGen", {"mosaic_block": 1000}, "value_bigger_than_max"),
        (
            "shapesworld_erase_closed_form.json",
            "ConceptGuardEraseClosedForm",
            {"rounds": 0},
            "value_smaller_than_min",
        ),
        (
            "shapesworld_erase_closed_form.json",
            "ConceptGuardEraseClosedForm",
            {"lamb": -1.0},
            "value_smaller_than_min",
        ),
        (
            "shapesworld_erase_closed_form.json",
            "ConceptGuardEraseClosedForm",
            {"method": "x"},
            "custom_validation_failed",
        ),
    ],
)
def test_out_of_range_values_are_refused_at_queue_time(
    comfy_server, checkpoint, object_info, workflow, node, inputs, kind
):
    prompt = tiny_prompt(workflow, object_info)
    set_inputs(prompt, node, **inputs)
    (node_id,) = node_ids(prompt, node)
    prompt = downstream_only(
        prompt, node_id
    )  # else ComfyUI runs the outputs that are valid (a "before" branch)
    status, body = post_prompt(comfy_server, prompt)
    assert status == 400, body
    errors = body["node_errors"][node_id]["errors"]
    (name,) = inputs
    assert any(e["type"] == kind and e["details"].split(" - ")[0] == name for e in errors), errors


def test_template_browser_lists_every_example_with_its_thumbnail(comfy_server):
    """ComfyUI's template browser lists our examples and loads <name>.jpg beside each as the thumbnail."""
    from comfy_harness import PACK_NAME

    listed = comfy_server.get_json("/api/workflow_templates")[PACK_NAME]
    assert sorted(listed) == sorted(p.stem for p in EXAMPLES.glob("*.json"))
    for name in listed:
        url = f"{comfy_server.url}/api/workflow_templates/{PACK_NAME}/{name}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and response.read(3) == b"\xff\xd8\xff"  # a JPEG


def _compare_graph(prompts: str, samples: int) -> dict:
    """Load ShapesWorld -> Compare Models (the model against itself) with the given prompts and samples."""
    inputs = {"base": ["1", 0], "edited": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "seed": 0, "steps": 1}
    return {
        "1": {"class_type": "ConceptGuardLoadShapesWorld", "inputs": {}},
        "2": {
            "class_type": "ConceptGuardCompareModels",
            "inputs": {**inputs, "prompts": prompts, "samples": samples, "cfg": 1.0},
        },
    }


def _attack_graph(concept: str = "a circle", search_steps: int = 5) -> dict:
    """Load ShapesWorld -> closed-form erase of "circle" -> Attack Erasure with rendered circles."""
    erase = dict(
        method="auto", anchor="", preserve="", eta=0.0, erase_scale=0.0, preserve_scale=0.0, lamb=0.0
    )
    attack = dict(
        concept=concept, paraphrases="a disc", search_steps=search_steps, samples=1, steps=2, cfg=5.0
    )
    return {
        "1": {"class_type": "ConceptGuardLoadShapesWorld", "inputs": {}},
        "4": {"class_type": "ConceptGuardShapesWorldRender", "inputs": {"prompt": "a circle", "count": 4, "seed": 0}},
        "5": {
            "class_type": "ConceptGuardEraseClosedForm",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": "circle", "rounds": 3, "file_name": "",
                       "score": False, **erase},
        },
        "2": {
            "class_type": "ConceptGuardAttackErasure",
            "inputs": {"base": ["1", 0], "edited": ["5", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["4", 0],
                       "seed": 0, **attack},
        },
    }  # fmt: skip


def test_attack_erasure_runs_through_the_server(comfy_server):
    prompt = _attack_graph()
    prompt["3"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}
    entry = queue(comfy_server, prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = "".join(entry["outputs"]["3"]["text"])
    assert "the concept's name" in report and "paraphrase" in report and "prompt search" in report, report


@pytest.mark.parametrize(
    ("prompt", "node", "kind"),
    [
        (_attack_graph(concept="  "), "2", "custom_validation_failed"),
        (_attack_graph(search_steps=-1), "2", "value_smaller_than_min"),
        (
            {
                "1": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0},
                },
                "2": {
                    "class_type": "ConceptGuardShapesWorldJudge",
                    "inputs": {"images": ["1", 0], "label": "dog"},
                },
            },
            "2",
            "custom_validation_failed",
        ),
        (
            _compare_graph(prompts=" ", samples=1),
            "2",
            "custom_validation_failed",
        ),
        (
            _compare_graph(prompts="a circle", samples=0),
            "2",
            "value_smaller_than_min",
        ),
    ],
)
def test_demo_nodes_refuse_bad_values_at_queue_time(comfy_server, prompt, node, kind):
    prompt["3"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}  # an output, so it validates
    status, body = post_prompt(comfy_server, prompt)
    assert status == 400, body
    assert any(e["type"] == kind for e in body["node_errors"][node]["errors"]), body["node_errors"]
