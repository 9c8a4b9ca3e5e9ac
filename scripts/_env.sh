#!/usr/bin/env bash
# Shared by demo.sh and test.sh: create or reuse .venv and install the project into it.
# Idempotent: a marker keyed on pyproject.toml's hash skips the install when nothing changed.
# torch is installed only when missing (ComfyUI users already have theirs; we never replace it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CONCEPT_GUARD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] torch missing: installing torch==${CONCEPT_GUARD_TORCH_VERSION:-2.13.0}" >&2
  python -m pip install -q "torch==${CONCEPT_GUARD_TORCH_VERSION:-2.13.0}"
fi
TORCH_VERSION="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
CONSTRAINTS="$VENV/concept-guard-constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

STAMP="$VENV/.concept-guard-installed"
WANT="$( (cat "$ROOT/pyproject.toml"; echo "$TORCH_VERSION") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing concept-guard (editable) with test tools, torch pinned to $TORCH_VERSION" >&2
  python -m pip install -q -c "$CONSTRAINTS" -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
export CONCEPT_GUARD_CONSTRAINTS="$CONSTRAINTS"
