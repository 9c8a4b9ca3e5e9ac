"""Shared fixtures: tiny random-init SD1.x/SD2.x/SDXL pipelines saved to temp folders (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# One thread: on 2 shared cores, torch's default thread pool oversubscribes and tiny-model calls
# get ~100x slower under load (measured 2215 ms vs 21 ms per tiny eps call).
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))  # `import tiny_models` from any test folder

from tiny_models import tiny_pipeline, write_tokenizer_files  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with a tiny CLIP vocab.json + merges.txt."""
    return write_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer_dir):
    """``get(kind, prediction_type="epsilon") -> Path``: a saved tiny pipeline folder (built once per session)."""
    cache: dict[tuple[str, str], Path] = {}

    def get(kind: str, prediction_type: str = "epsilon") -> Path:
        key = (kind, prediction_type)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{kind}_{prediction_type}")
            tiny_pipeline(kind, tokenizer_dir, prediction_type=prediction_type).save_pretrained(folder)
            cache[key] = folder
        return cache[key]

    return get


@pytest.fixture(scope="session")
def sd1_backend(tiny_dirs):
    """A tiny SD1-shaped DiffusersBackend (shared: detach any deltas a test attaches)."""
    from concept_guard.core.backends.diffusers_backend import DiffusersBackend

    return DiffusersBackend.load(tiny_dirs("sd1"))


@pytest.fixture(scope="session")
def sd2v_backend(tiny_dirs):
    """A tiny SD2-shaped v-prediction DiffusersBackend."""
    from concept_guard.core.backends.diffusers_backend import DiffusersBackend

    return DiffusersBackend.load(tiny_dirs("sd2", "v_prediction"))


@pytest.fixture(scope="session")
def sdxl_backend(tiny_dirs):
    """A tiny SDXL-shaped DiffusersBackend (two text encoders, text_time conditioning)."""
    from concept_guard.core.backends.diffusers_backend import DiffusersBackend

    return DiffusersBackend.load(tiny_dirs("sdxl"))
