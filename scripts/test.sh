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
echo "[test] ruff check, ruff format --check, lint-imports (layer contracts)" >&2
ruff check .
ruff format --check .
lint-imports
# Two workers (CONCEPT_GUARD_TEST_WORKERS): each test runs on one torch thread (tests/conftest.py), and the two
# ShapesWorld training tests dominate; work stealing puts them on different cores.
WORKERS="${CONCEPT_GUARD_TEST_WORKERS:-2}"
echo "[test] pytest ($WORKERS workers)" >&2
exec python -m pytest -q -n "$WORKERS" --dist worksteal "$@"
