"""The standard CLIP BPE tokenizer files (vocab.json, merges.txt), rebuilt from CLIP's merge list.

Why: ShapesWorld's text encoder uses the exact 49 408-token CLIP vocabulary so that ComfyUI's own SD1
tokenizer, prompt weighting and ``embedding:NAME`` work unchanged on the converted model. We derive the
files from ``bpe_simple_vocab_16e6.txt.gz`` (shipped in the MIT-licensed ``open_clip_torch`` wheel, the
same list OpenAI's CLIP ships) the way CLIP's ``SimpleTokenizer`` does, instead of copying anyone's
tokenizer folder::

    pip download --no-deps open_clip_torch -d /tmp/oc && cd /tmp/oc && unzip -o *.whl 'open_clip/*.gz'
    python -m concept_guard.shapesworld.tokenizer /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz OUT_DIR
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from pathlib import Path

from ..core.errors import ModelLoadError

logger = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48 894 merges
SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
# Padded with the end token and 77 long, as SD1.x's tokenizer (and ComfyUI's SD1 tokenizer) are.
TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "add_prefix_space": False,
    "errors": "replace",
    **SPECIAL_TOKENS,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def build_vocab(bpe_gz: str | Path) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and merge lines, exactly as CLIP builds them.

    Raises:
        ModelLoadError: the file is missing or does not hold enough merges.
    """
    path = Path(bpe_gz)
    if not path.is_file():
        raise ModelLoadError(
            f"CLIP merge list {str(path)!r} not found; see this module's docstring for how to get it."
        )
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : N_MERGES + 1]
    if len(merges) != N_MERGES:
        raise ModelLoadError(f"{str(path)!r} holds {len(merges)} merges; expected at least {N_MERGES}.")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ModelLoadError(f"Built {len(vocab)} distinct tokens from {str(path)!r}; expected {VOCAB_SIZE}.")
    return vocab, merges


def write_tokenizer_files(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (HF CLIPTokenizer format) into ``out_dir``."""
    vocab, merges = build_vocab(bpe_gz)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2), encoding="utf-8")
    logger.info("wrote CLIP tokenizer files (%d tokens, %d merges) to %s", len(vocab), len(merges), out)
    return out


def make_clip_tokenizer(files_dir: str | Path):
    """A ``CLIPTokenizer`` loaded from a folder written by :func:`write_tokenizer_files`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(files_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild CLIP's vocab.json/merges.txt from its merge list.")
    parser.add_argument("bpe_gz", help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    write_tokenizer_files(args.bpe_gz, args.out_dir)


if __name__ == "__main__":
    main()
