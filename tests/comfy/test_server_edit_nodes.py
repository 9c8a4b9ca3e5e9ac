"""A real headless ComfyUI runs Apply Edited UNet and Convert Edit through ``/prompt`` and ``/history``.

Inside the server, diffusers/transformers imports probe torchvision, and on CPU-only test machines the test
stub (``stubs/torchvision``, on the server's PYTHONPATH) must satisfy them: checked directly here too. The edit
is a small random ``.diff`` file (our format, ``save_edit``) on a few modules of the tiny SD1.5 checkpoint,
with shapes read from the checkpoint file itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfy_harness import NEED_TORCHVISION_STUB, STUBS
from concept_guard.core.edits.diff_file import save_edit
from PIL import Image
from safetensors import safe_open
from tiny_checkpoint import write_tiny_sd15_checkpoint
from workflows import queue

CKPT = "tiny_sd15.safetensors"
EDIT = "concept_guard/server_edit.safetensors"
#: LDM modules of the tiny checkpoint the edit changes (a cross-attention key, an attention output with
#: bias, the last conv): found by these name patterns in the checkpoint, so the test follows its layout.
MODULE_PATTERNS = (".attn2.to_k", ".attn2.to_out.0", "out.2")
UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def checkpoint(comfy_server) -> Path:
    folder = comfy_server.base_dir / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CKPT
    if not path.is_file():  # the session's server may already have it (test_server_e2e writes the same file)
        write_tiny_sd15_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def edit(comfy_server, checkpoint) -> dict[str, torch.Size]:
    """Write ``models/loras/EDIT``; return the LDM keys it changes and their shapes."""
    with safe_open(str(checkpoint), framework="pt") as f:
        shapes = {
            k[len(UNET) :]: torch.Size(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(UNET)
        }
    modules = []
    for pattern in MODULE_PATTERNS:
        found = sorted(k[: -len(".weight")] for k in shapes if k.endswith(f"{pattern}.weight"))
        assert found, f"the tiny checkpoint has no module matching {pattern!r}"
        modules.append(found[0])
    g = torch.Generator().manual_seed(0)
    deltas = {
        f"{m}.{kind}": torch.randn(shapes[f"{m}.{kind}"], generator=g) * 0.01
        for m in modules
        for kind in ("weight", "bias")
        if f"{m}.{kind}" in shapes
    }
    path = comfy_server.base_dir / "models" / "loras" / EDIT
    path.parent.mkdir(parents=True, exist_ok=True)
    save_edit(deltas, path, {"concept_guard.method": "esd-x"})
    return {k: v.shape for k, v in deltas.items()}


def error_of(entry: dict) -> str:
    """The execution error of a history entry, for assertion messages."""
    errors = [data for name, data in entry["status"]["messages"] if name == "execution_error"]
    return "\n".join(f"{e['node_type']}: {e['exception_message']}" for e in errors) or str(entry["status"])


def combo_options(spec: list) -> list:
    """A combo input's options from ``/object_info``: ``[[options...], {...}]`` or ``["COMBO", {"options": ...}]``."""
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def loader() -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}


#: Run with the server's PYTHONPATH: what diffusers/transformers import from torchvision when they find one.
STUB_CHECK = """
import torchvision
from diffusers import UNet2DConditionModel  # diffusers.loaders.peft -> transformers.image_utils
import transformers.image_processing_utils, transformers.image_processing_backends, transformers.video_utils
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_to_tensor
assert torchvision.__file__.startswith(sys.argv[1]), torchvision.__file__
assert {m.name: m.value for m in InterpolationMode} == {
    "NEAREST": "nearest", "NEAREST_EXACT": "nearest-exact", "BILINEAR": "bilinear", "BICUBIC": "bicubic",
    "BOX": "box", "HAMMING": "hamming", "LANCZOS": "lanczos"}
try:
    pil_to_tensor(None)
except AttributeError as e:
    assert "test stub of torchvision" in str(e), e
else:
    raise AssertionError("the stub's pil_to_tensor did not fail")
print("ok")
"""


@pytest.mark.skipif(
    not NEED_TORCHVISION_STUB, reason="torchvision is installed: the server uses the real one"
)
def test_the_servers_torchvision_stub_satisfies_diffusers_and_transformers():
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(STUBS), os.environ.get("PYTHONPATH")) if p)
    )
    done = subprocess.run(
        [sys.executable, "-c", "import sys\n" + STUB_CHECK, str(STUBS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-4000:]


def test_the_server_lists_the_edit_file(comfy_server, edit):
    info = comfy_server.get_json("/object_info/ConceptGuardApplyEditedUNet")["ConceptGuardApplyEditedUNet"]
    assert EDIT in combo_options(info["input"]["required"]["edit"])


def test_apply_edited_unet_then_sample(comfy_server, edit):
    """CheckpointLoaderSimple -> Apply Edited UNet -> KSampler -> VAEDecode -> PreviewImage."""
    text = "a photo of a cat"
    prompt = {
        "1": loader(),
        "2": {
            "class_type": "ConceptGuardApplyEditedUNet",
            "inputs": {"model": ["1", 0], "edit": EDIT, "strength": 1.0},
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "seed": 0,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    entry = queue(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    (image,) = entry["outputs"]["8"]["images"]
    path = comfy_server.base_dir / image["type"] / image["subfolder"] / image["filename"]
    with Image.open(path) as im:
        assert im.size == (64, 64)
    (report,) = entry["outputs"]["9"]["text"]
    modules = {k.rsplit(".", 1)[0] for k in edit}
    assert f"Applied: {len(edit)} tensors on {len(modules)} UNet modules at strength 1" in report, report
    assert "Ignored" not in report, report


@pytest.mark.parametrize(("to", "name"), [("lora", "server_edit_lora"), ("diff", "server_edit_copy")])
def test_convert_edit_writes_the_converted_file(comfy_server, edit, to, name):
    """CheckpointLoaderSimple -> Convert Edit -> PreviewAny; the file lands in models/loras/concept_guard/."""
    expected = comfy_server.base_dir / "models" / "loras" / "concept_guard" / f"{name}.safetensors"
    prompt = {
        "1": loader(),
        "2": {
            "class_type": "ConceptGuardConvertEdit",
            "inputs": {
                "model": ["1", 0],
                "edit": EDIT,
                "to": to,
                "rank": 4,
                "file_name": name,
                "overwrite": False,
            },
        },
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    entry = queue(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    assert entry["outputs"]["3"]["text"] == [str(expected)]
    assert expected.is_file()
    with safe_open(str(expected), framework="pt") as f:
        keys = list(f.keys())
    modules = {k.rsplit(".", 1)[0] for k in edit}
    if to == "diff":
        assert sorted(keys) == sorted(
            f"diffusion_model.{k.rsplit('.', 1)[0]}.{'diff' if k.endswith('.weight') else 'diff_b'}"
            for k in edit
        )
    else:
        downs = [k for k in keys if k.endswith(".lora_down.weight")]
        assert len(downs) == len(modules), keys
        with safe_open(str(expected), framework="pt") as f:
            assert all(f.get_slice(k).get_shape()[0] <= 4 for k in downs)  # rank 4 at most
    # The stock loader lists the converted file after a refresh.
    loras = comfy_server.get_json("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]
    assert f"concept_guard/{name}.safetensors" in combo_options(loras["input"]["required"]["lora_name"])
