#!/usr/bin/env bash
# The whole test suite: lint, then pytest. Creates/reuses .venv itself.
# With COMFYUI_PATH set, also installs what the ComfyUI suite needs (never replacing torch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_env.sh"
cd "$ROOT"
if [ -n "${COMFYUI_PATH:-}" ]; then
  bash "$ROOT/scripts/install_comfyui_test_deps.sh"
fi
echo "[test] ruff check" >&2
ruff check .
echo "[test] pytest" >&2
exec python -m pytest -q "$@"
