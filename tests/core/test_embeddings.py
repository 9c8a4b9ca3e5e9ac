"""Embedding files in prompts as ``embedding:NAME`` on the diffusers backend (ShapesWorld's real CLIP vocab)."""

import json
import os

import pytest
import torch
from concept_guard.cli import main as cli_main
from concept_guard.core.embeddings import add_embedding, expand_embedding_syntax, read_embedding
from concept_guard.core.errors import ConceptGuardError
from concept_guard.shapesworld import load_shapesworld, shapesworld_model_path
from safetensors.torch import save_file

pytestmark = pytest.mark.skipif(
    not (shapesworld_model_path() / "text_encoder").is_dir(), reason="ShapesWorld model weights not present"
)


@pytest.fixture()
def backend():

    return load_shapesworld()  # fresh: add_embedding extends its tokenizer


def heart_row(backend):
    tok, enc = backend.tokenizers[0], backend.text_encoders[0]
    (tid,) = tok("heart", add_special_tokens=False).input_ids
    return enc.get_input_embeddings().weight[tid : tid + 1].detach().float().clone()


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
