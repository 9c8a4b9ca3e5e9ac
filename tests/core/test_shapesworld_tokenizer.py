"""The committed CLIP tokenizer files are CLIP's standard BPE vocabulary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from concept_guard.core.errors import ModelLoadError
from concept_guard.shapesworld import shapesworld_model_path
from concept_guard.shapesworld.tokenizer import (
    VOCAB_SIZE,
    build_vocab,
    bytes_to_unicode,
    make_clip_tokenizer,
)

TOK_DIR = shapesworld_model_path() / "tokenizer"


def test_vocabulary_is_the_standard_clip_one():
    vocab = json.loads((TOK_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    assert len(bytes_to_unicode()) == 256


def test_tokenizer_ids_are_clips():
    tok = make_clip_tokenizer(TOK_DIR)
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    padded = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == 49407  # padded with the end token, as SD1.x


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH not set")
def test_matches_comfyui_sd1_tokenizer_files():
    theirs = Path(os.environ["COMFYUI_PATH"]) / "comfy" / "sd1_tokenizer"
    assert json.loads((TOK_DIR / "vocab.json").read_text(encoding="utf-8")) == json.loads(
        (theirs / "vocab.json").read_text(encoding="utf-8")
    )
    ours = (TOK_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert ours == (theirs / "merges.txt").read_text(encoding="utf-8").splitlines()[: len(ours)]


def test_missing_merge_list_is_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="not found; see this module's docstring"):
        build_vocab(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
