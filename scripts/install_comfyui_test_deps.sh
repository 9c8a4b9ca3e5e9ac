#!/usr/bin/env bash
# Install what the ComfyUI integration suite (tests/comfy) needs into the ACTIVE virtual environment:
# ComfyUI's own requirements.txt minus torch/torchvision/torchaudio/kornia/spandrel (kornia and spandrel
# pull torchvision, which pulls a different torch with GBs of CUDA wheels), plus `requests` and
# `torchsde`, all under a constraint that pins the torch already installed.
# Idempotent: a marker in the venv keyed on the requirements file's hash and the torch version makes a
# second run return at once.
set -euo pipefail
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI source tree (the folder with main.py)}"
REQ="$COMFYUI_PATH/requirements.txt"
if [ ! -f "$REQ" ]; then
  echo "[comfyui-deps] no requirements.txt in COMFYUI_PATH=$COMFYUI_PATH; expected a ComfyUI checkout" >&2
  exit 2
fi
PREFIX="$(python -c 'import sys; print(sys.prefix)')"
if [ "$PREFIX" = "$(python -c 'import sys; print(sys.base_prefix)')" ]; then
  echo "[comfyui-deps] refusing to install into the system Python ($PREFIX); activate the project's venv first" >&2
  exit 2
fi
TORCH_VERSION="$(python -c 'from importlib.metadata import version; print(version("torch").split("+")[0])')"
STAMP="$PREFIX/.concept-guard-comfyui-deps"
WANT="$( (cat "$REQ"; echo "torch==$TORCH_VERSION"; echo "extra: requests torchsde") | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "torch==$TORCH_VERSION" > "$WORK/constraints.txt"
# Drop comments and the packages that would replace torch; keep everything else as ComfyUI pins it.
grep -v -E '^[[:space:]]*(#|$)' "$REQ" \
  | grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio|kornia|spandrel)([[:space:]]*([<>=!~;[]|$))' \
  > "$WORK/requirements.txt"
printf 'requests\ntorchsde\n' >> "$WORK/requirements.txt"
echo "[comfyui-deps] installing ComfyUI test requirements (torch pinned to $TORCH_VERSION)" >&2
python -m pip install -q -c "$WORK/constraints.txt" -r "$WORK/requirements.txt"
python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$TORCH_VERSION' else 1)" || {
  echo "[comfyui-deps] torch changed during install; this must not happen" >&2; exit 1; }
echo "$WANT" > "$STAMP"
