"""Embedding files in prompts as ``embedding:NAME`` on the diffusers backend: loading through diffusers'
``load_textual_inversion`` conditions bit-identically to the earlier hand-written loader (tiny SD1/SDXL);
ShapesWorld's real CLIP vocabulary for the end-to-end checks."""

import json
import os
from pathlib import Path

import pytest
import torch
from concept_guard.cli import main as cli_main
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.embeddings import (
    add_embedding,
    expand_embedding_syntax,
    read_embedding,
    save_embedding,
)
from concept_guard.core.errors import ConceptGuardError
from concept_guard.shapesworld import load_shapesworld, shapesworld_model_path
from safetensors.torch import save_file

needs_shapesworld = pytest.mark.skipif(
    not (shapesworld_model_path() / "text_encoder").is_dir(), reason="ShapesWorld model weights not present"
)


def _legacy_add_embedding(backend, path, name=None):
    """The loader before diffusers' ``load_textual_inversion`` was used (kept verbatim as the reference)."""
    name = name or Path(path).stem
    vectors = read_embedding(path)
    key_for = ["clip_l"] if len(backend.text_encoders) == 1 else ["clip_l", "clip_g"]
    n = vectors[key_for[0]].shape[0]
    tokens = [f"<{name}_{i}>" for i in range(n)]
    for key, enc, tok in zip(key_for, backend.text_encoders, backend.tokenizers, strict=True):
        rows = vectors[key]
        table = enc.get_input_embeddings()
        assert tok.add_tokens(tokens) == n
        enc.resize_token_embeddings(len(tok))
        with torch.no_grad():
            enc.get_input_embeddings().weight[-n:] = rows.to(table.weight.dtype)
    backend.embedding_tokens[name] = tokens
    return tokens


EMBEDDING_PROMPTS = [
    "a photo of embedding:mything",
    "a red embedding:mything.safetensors circle, embedding:mything",
    "a mything cat",  # the bare name is an ordinary word, as before
    "a blue square",
]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_loader_conditions_bit_identically_to_the_old_loader(kind, tiny_dirs, tmp_path):
    old, new = DiffusersBackend.load(tiny_dirs(kind)), DiffusersBackend.load(tiny_dirs(kind))
    g = torch.Generator().manual_seed(0)
    vectors = {k: torch.randn(3, w, generator=g) for k, w in old.embedding_widths().items()}
    path = save_embedding(vectors, tmp_path / "mything.safetensors", {})
    assert (
        add_embedding(new, path) == _legacy_add_embedding(old, path) == [f"<mything_{i}>" for i in range(3)]
    )
    assert new.embedding_tokens == old.embedding_tokens
    for tok_new, tok_old, enc_new, enc_old in zip(
        new.tokenizers, old.tokenizers, new.text_encoders, old.text_encoders, strict=True
    ):
        assert tok_new.get_vocab() == tok_old.get_vocab()
        assert torch.equal(enc_new.get_input_embeddings().weight, enc_old.get_input_embeddings().weight)
    a, b = new.encode_text(EMBEDDING_PROMPTS), old.encode_text(EMBEDDING_PROMPTS)
    assert torch.equal(a.context, b.context)
    if kind == "sdxl":
        assert torch.equal(a.pooled, b.pooled) and torch.equal(a.time_ids, b.time_ids)
    plain = new.encode_text(["a photo of a cat"]).context
    assert not torch.equal(new.encode_text(["a photo of embedding:mything"]).context, plain)


def test_refused_embeddings_change_nothing(tiny_dirs, tmp_path):
    backend = DiffusersBackend.load(tiny_dirs("sdxl"))
    widths = backend.embedding_widths()
    sizes = [len(t) for t in backend.tokenizers]
    good = {k: torch.zeros(2, w) for k, w in widths.items()}
    cases = {
        "wide": (
            {**good, "clip_g": torch.zeros(2, widths["clip_g"] + 1)},
            r"is 33 wide; this text encoder is 32",
        ),
        "nan": (
            {**good, "clip_g": torch.full((2, widths["clip_g"]), float("nan"))},
            r"NaN or infinite .*clip_g",
        ),
        "uneven": ({**good, "clip_g": torch.zeros(3, widths["clip_g"])}, r"\[2, 3\] vectors"),
        "lonly": ({"clip_l": good["clip_l"]}, r"needs \['clip_l', 'clip_g'\]"),
    }
    for name, (vectors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in vectors.items()}, str(path))
        with pytest.raises(ConceptGuardError, match=message):
            add_embedding(backend, path)
        assert [len(t) for t in backend.tokenizers] == sizes  # clip_l was not extended before clip_g failed
    path = save_embedding(good, tmp_path / "twice.safetensors", {})
    add_embedding(backend, path)
    with pytest.raises(ConceptGuardError, match=r"Tokens \['<twice_0>', '<twice_1>'\] already exist"):
        add_embedding(backend, path)
    assert [len(t) for t in backend.tokenizers] == [n + 2 for n in sizes]


@pytest.fixture()
def backend():
    return load_shapesworld()  # fresh: add_embedding extends its tokenizer


def heart_row(backend):
    tok, enc = backend.tokenizers[0], backend.text_encoders[0]
    (tid,) = tok("heart", add_special_tokens=False).input_ids
    return enc.get_input_embeddings().weight[tid : tid + 1].detach().float().clone()


@needs_shapesworld
def test_embedding_of_a_word_row_conditions_like_the_word(backend, tmp_path):
    path = tmp_path / "myheart.safetensors"
    save_file({"emb_params": heart_row(backend)}, str(path))
    assert add_embedding(backend, path) == ["<myheart_0>"]
    a = backend.encode_text(["a red embedding:myheart"]).context
    b = backend.encode_text(["a red heart"]).context
    assert torch.equal(a, b)
    assert torch.equal(backend.encode_text(["a red embedding:myheart.safetensors"]).context, a)


@pytest.mark.parametrize("fmt", ["a1111_pt", "diffusers_bin", "clip_l"])
def test_other_formats_read(tmp_path, fmt):
    rows = torch.randn(2, 128)
    if fmt == "a1111_pt":
        path = tmp_path / "e.pt"
        torch.save({"string_to_param": {"*": rows}, "name": "e"}, path)
    elif fmt == "diffusers_bin":
        path = tmp_path / "e.bin"
        torch.save({"<e>": rows}, path)
    else:
        path = tmp_path / "e.safetensors"
        save_file({"clip_l": rows}, str(path))
    assert torch.equal(read_embedding(path)["clip_l"], rows)


@needs_shapesworld
def test_bad_embeddings_are_refused(backend, tmp_path):
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, str(wide))
    with pytest.raises(ConceptGuardError, match="768 wide; this text encoder is 128"):
        add_embedding(backend, wide)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Evil()}}, evil)
    with pytest.raises(ConceptGuardError, match="refused"):
        read_embedding(evil)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ConceptGuardError, match="no such embedding is loaded"):
        expand_embedding_syntax("a embedding:nothere", {})


@needs_shapesworld
def test_eval_cli_with_embedding(backend, tmp_path, capsys):
    path = tmp_path / "myheart.safetensors"
    save_file({"emb_params": heart_row(backend)}, str(path))
    code = cli_main(
        [
            "eval",
            "--embedding",
            str(path),
            "--prompts",
            "a red embedding:myheart",
            "--samples",
            "8",
            "--json",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["embedding"] == str(path)
    assert report["prompts"][0]["rates"]["shape"]["heart"] >= 0.75


@needs_shapesworld
def test_eval_cli_preservation_table_with_edit(tmp_path, capsys):
    from concept_guard.core.edits.diff_file import save_edit

    b = load_shapesworld()
    name = next(n for n in b.unet_module_names() if n.endswith("attn2.to_k"))
    weight = dict(b.unet.named_parameters())[b.keymap.to_diffusers(name) + ".weight"]
    edit = save_edit({f"{name}.weight": torch.zeros_like(weight)}, tmp_path / "zero.safetensors", {})
    code = cli_main(
        [
            "eval",
            "--edit",
            str(edit),
            "--prompts",
            "a red circle",
            "--preserve",
            "a blue square",
            "--samples",
            "4",
            "--json",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["preservation"]
    assert {(r["head"], r["label"]) for r in rows} == {("shape", "square"), ("colour", "blue")}
    assert all(r["change"] == 0 for r in rows)  # a zero edit changes nothing, same seeds
