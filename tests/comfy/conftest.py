"""ComfyUI integration suite: runs against the ComfyUI source tree named by ``COMFYUI_PATH``.

Without ``COMFYUI_PATH`` every module here is reported as skipped (visible with ``-ra``) and none
is imported, since they import ComfyUI. With it, the fixtures and hooks come from ``comfy_harness``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SKIP_REASON = (
    "ComfyUI integration tests need COMFYUI_PATH=<ComfyUI source tree> "
    "(e.g. COMFYUI_PATH=../shared/vendor/ComfyUI); it is unset."
)

if os.environ.get("COMFYUI_PATH", "").strip():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from comfy_harness import (  # noqa: F401  (fixtures and hooks are found by name here)
        _comfy_test_env,
        comfy_server,
        loras,
        pytest_runtest_makereport,
        stock_nodes,
        tiny_clip,
        tiny_model,
        tiny_vae,
        tiny_vpred_model,
    )
else:

    class _SkippedModule(pytest.Module):
        def collect(self):
            pytest.skip(SKIP_REASON)

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedModule.from_parent(parent, path=module_path)
