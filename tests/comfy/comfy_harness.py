"""The ComfyUI test harness (imported by ``conftest.py`` only when ``COMFYUI_PATH`` is set).

ComfyUI goes on ``sys.path`` for in-process tests (CPU only), tiny MODEL/CLIP/VAE objects are built
from ComfyUI's own classes, and ``comfy_server`` starts a real headless ComfyUI with this repository
loaded as the custom node pack ``concept_guard`` (plus a stand-in ``UpscaleModelLoader`` where spandrel is
missing, which the frontend needs). Nothing is ever written into the ComfyUI tree: the server gets a
temporary ``--base-directory`` and bytecode caches go to a temporary ``pycache_prefix``. The last section
drives ComfyUI's real page (Playwright) for ``test_browser.py`` and ``scripts/make_readme_images.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ["COMFYUI_PATH"].strip()
COMFY_ROOT = Path(COMFYUI_PATH).expanduser().resolve()
if not (COMFY_ROOT / "main.py").is_file() or not (COMFY_ROOT / "comfy").is_dir():
    raise RuntimeError(
        f"COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI source tree (no main.py / comfy/); fix the path."
    )

REPO_ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(__file__).resolve().parent / "stubs"
PACK_NAME = "concept_guard"
PYCACHE = Path(tempfile.gettempdir()) / "concept_guard_comfy_pycache"
# Real installs have torchvision; only fall back to the test stub when it is missing.
NEED_TORCHVISION_STUB = importlib.util.find_spec("torchvision") is None

sys.pycache_prefix = str(PYCACHE)  # keep ComfyUI's __pycache__ out of its (read-only) tree
sys.path.insert(0, str(COMFY_ROOT))

import torch  # noqa: E402
from comfy.cli_args import args as _comfy_args  # noqa: E402

_comfy_args.cpu = True  # before comfy.model_management is imported: no CUDA probing


def _modules_importing_torchvision() -> list[str]:
    """ComfyUI modules that import torchvision at import time (found by scanning the tree)."""
    found = []
    for path in sorted((COMFY_ROOT / "comfy").rglob("*.py")):
        text = path.read_text(errors="replace")
        if any(line.startswith(("import torchvision", "from torchvision")) for line in text.splitlines()):
            found.append(".".join(path.relative_to(COMFY_ROOT).with_suffix("").parts))
    return found


def _import_comfy() -> None:
    """Import ComfyUI's core modules; the torchvision stub is importable only meanwhile.

    Several ComfyUI modules import ``torchvision`` at import time (Cosmos, Cascade, ACE). They are all
    imported here, with the stub on ``sys.path``; afterwards the stub is taken off ``sys.path`` and
    out of ``sys.modules`` again, because transformers would otherwise take it for a real torchvision.
    """
    if NEED_TORCHVISION_STUB:
        sys.path.insert(0, str(STUBS))
    try:
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy_api.latest  # noqa: F401

        for name in _modules_importing_torchvision() if NEED_TORCHVISION_STUB else []:
            try:
                importlib.import_module(name)
            except ImportError as e:  # e.g. torchaudio for ACE: not needed by SD tests
                logging.getLogger(__name__).debug("skipped %s: %s", name, e)
    finally:
        if NEED_TORCHVISION_STUB:
            sys.path.remove(str(STUBS))
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]


_import_comfy()
import comfy.model_management  # noqa: E402

# ----- tiny models from ComfyUI's own classes ----------------------------------------------------

CONTEXT_DIM = 64


def tiny_unet_config() -> dict:
    """An SD1.5-shaped UNet (same module names, 2 levels, 32 channels): ~1M parameters."""
    return dict(
        use_checkpoint=False,
        image_size=32,
        out_channels=4,
        use_spatial_transformer=True,
        legacy=False,
        adm_in_channels=None,
        dtype=torch.float32,
        in_channels=4,
        model_channels=32,
        num_res_blocks=[1, 1],
        transformer_depth=[1, 1],
        channel_mult=[1, 2],
        transformer_depth_middle=1,
        use_linear_in_transformer=False,
        context_dim=CONTEXT_DIM,
        num_heads=2,
        transformer_depth_output=[1, 1, 1, 1],
        use_temporal_attention=False,
        use_temporal_resblock=False,
    )


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """comfy.ops skip weight init, so fresh modules hold garbage: fill every parameter from a seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


def build_tiny_model(model_type: str = "eps", seed: int = 0, *, inference: bool = True):
    """A ComfyUI MODEL (ModelPatcher) built as a loader node would: under inference mode.

    ``model_type``: ``"eps"`` (SD1.5 config) or ``"v"`` (SD2.x config, ``ModelType.V_PREDICTION``).
    ``inference=False`` builds ordinary trainable tensors instead (as a model made outside a node).
    """
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models as sm

    mm = comfy.model_management
    with torch.inference_mode(inference):
        if model_type == "eps":
            config = sm.SD15(tiny_unet_config())
            config.set_inference_dtype(torch.float32, None)
            base = config.get_model({})
        else:
            config = sm.SD20(tiny_unet_config())
            config.unet_config["num_head_channels"] = 16  # SD2's 64-channel heads do not fit 32 channels
            config.set_inference_dtype(torch.float32, None)
            base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
        randomize_(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


SDXL_CLIP_L, SDXL_CLIP_G = 32, 64  # SDXL context = concat of both (96); pooled = CLIP-G width (64)


def build_tiny_sdxl(seed: int = 4):
    """A tiny SDXL MODEL and CLIP (CLIP-L + CLIP-G) from ComfyUI's SDXL classes."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb

    unet = dict(
        tiny_unet_config(),
        context_dim=SDXL_CLIP_L + SDXL_CLIP_G,
        adm_in_channels=SDXL_CLIP_G + 6 * 256,
        use_linear_in_transformer=True,
        num_classes="sequential",
    )
    target = smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    text = {"num_hidden_layers": 3, "intermediate_size": 128, "num_attention_heads": 2}  # penultimate layer
    options = {
        "clip_l_model_config": dict(text, hidden_size=SDXL_CLIP_L),
        "clip_g_model_config": dict(text, hidden_size=SDXL_CLIP_G),
    }
    mm = comfy.model_management
    with torch.inference_mode():
        config = sm.SDXL(unet)
        config.unet_config["num_head_channels"] = 16
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({})
        randomize_(base, seed)
        clip = comfy.sd.CLIP(target, model_options=options)
        randomize_(clip.cond_stage_model, seed + 1)
    model = comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
    return model, clip


def build_tiny_clip(seed: int = 1):
    """ComfyUI's SD1 CLIP with a 2-layer, 64-wide text model and the bundled tokenizer (no download)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base as smb

    target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {
        "clip_l_model_config": {
            "num_hidden_layers": 2,
            "hidden_size": CONTEXT_DIM,
            "intermediate_size": 128,
            "num_attention_heads": 2,
        }
    }
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target, model_options=options)
        randomize_(clip.cond_stage_model, seed)
    return clip


def build_tiny_vae(seed: int = 2):
    """ComfyUI's SD VAE (AutoencoderKL) at 32 channels; 64x64 images <-> 4x8x8 latents."""
    import comfy.sd

    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 64,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "Missing VAE keys": expected, we pass no state dict
    try:
        with torch.inference_mode():
            vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})
            randomize_(vae.first_stage_model, seed, scale=0.05)
    finally:
        logging.disable(previous)
    return vae


@pytest.fixture
def tiny_model():
    """Fresh per test: several tests check that the MODEL is left bit-identical."""
    return build_tiny_model("eps")


@pytest.fixture
def tiny_vpred_model():
    return build_tiny_model("v", seed=3)


@pytest.fixture(scope="session")
def tiny_clip():
    return build_tiny_clip()


@pytest.fixture(scope="session")
def tiny_vae():
    return build_tiny_vae()


@pytest.fixture
def loras(tmp_path, monkeypatch) -> Path:
    """A temporary ComfyUI ``models/loras`` folder (with our ``concept_guard/`` subfolder)."""
    import folder_paths

    folder = tmp_path / "loras"
    (folder / "concept_guard").mkdir(parents=True)
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "loras", ([str(folder)], folder_paths.supported_pt_extensions)
    )
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


@pytest.fixture(scope="session")
def stock_nodes():
    """ComfyUI's own ``nodes`` module (LoraLoaderModelOnly, CheckpointLoaderSimple, ...) from COMFY_ROOT."""
    import nodes

    assert Path(nodes.__file__).resolve().parent == COMFY_ROOT, nodes.__file__
    return nodes


@pytest.fixture(autouse=True)
def _comfy_test_env():
    """One torch thread per test (tiny models: on 2 shared cores, 2 threads spin and ran ~100x slower,
    measured); afterwards nothing stays loaded in ComfyUI's model manager."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        comfy.model_management.unload_all_models()


# ----- a real headless server -----------------------------------------------------------------------


@dataclass
class ComfyServer:
    url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get_json(self, route: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            return json.loads(response.read())

    def post_json(self, route: str, data, timeout: float = 60) -> int:
        """POST ``data`` as JSON; the HTTP status."""
        request = urllib.request.Request(
            self.url + route, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(server: ComfyServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"ComfyUI exited with status {server.process.returncode} during startup.\n{server.log()[-6000:]}"
            )
        try:
            server.get_json("/object_info", timeout=10)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(0.5)
    raise RuntimeError(f"ComfyUI did not serve /object_info within {timeout:.0f} s.\n{server.log()[-6000:]}")


#: A one-file custom node pack copied into the test's base directory: ComfyUI's own
#: ``UpscaleModelLoader`` lives in ``comfy_extras/nodes_upscale_model.py``, which imports spandrel (and so
#: torchvision); without it the frontend's model store throws and every ckpt/lora/vae combo fails to build.
#: ComfyUI loads comfy_extras before custom nodes, so the stand-in registers only when the real node is missing.
UPSCALE_STANDIN = STUBS / "upscale_model_loader_standin.py"
UPSCALE_STANDIN_NODE_FILE = "concept_guard_test_upscale_model_loader.py"


def prepare_base_dir(base: Path) -> Path:
    """A ComfyUI ``--base-directory``: our pack symlinked in as ``custom_nodes/concept_guard``, the stand-in.

    ComfyUI loads a pack under its folder name, and this repository's folder may be named anything,
    so the base directory gets a symlink with the right name.
    """
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    shutil.copyfile(UPSCALE_STANDIN, custom_nodes / UPSCALE_STANDIN_NODE_FILE)
    return base


def start_comfy_server(base: Path, *, start_timeout: float | None = None) -> ComfyServer:
    """``python main.py --cpu`` on a free port with ``base`` as its base directory; returns once it serves.

    The torchvision stub is on the server's ``PYTHONPATH`` when this Python has no torchvision. Stop it
    with :func:`stop_comfy_server`.
    """
    prepare_base_dir(base)
    port = _free_port()
    threads = os.environ.get("CONCEPT_GUARD_SERVER_THREADS", "1")  # 1: the tests share 2 cores
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(PYCACHE), PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads)
    if NEED_TORCHVISION_STUB:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STUBS), env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        str(COMFY_ROOT / "main.py"),
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
        "--disable-auto-launch",
    ]
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ComfyServer(url=f"http://127.0.0.1:{port}", base_dir=base, log_path=log_path, process=process)
    if start_timeout is None:
        start_timeout = float(os.environ.get("CONCEPT_GUARD_COMFY_START_TIMEOUT", "180"))
    try:
        _wait_until_serving(server, timeout=start_timeout)
    except BaseException:
        stop_comfy_server(server)
        raise
    return server


def stop_comfy_server(server: ComfyServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=15)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A real headless ComfyUI (:func:`start_comfy_server`) in a temporary base directory, for the session."""
    server = start_comfy_server(tmp_path_factory.mktemp("comfy_base"))
    try:
        yield server
    finally:
        stop_comfy_server(server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When a test that used the server fails, show the server's log with the failure."""
    outcome = yield
    report = outcome.get_result()
    server = item.funcargs.get("comfy_server") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(server, ComfyServer):
        report.sections.append(("ComfyUI server log (tail)", server.log()[-8000:]))
