#!/usr/bin/env bash
# The main job on the embedded default model. Creates/reuses .venv itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_env.sh"
cd "$ROOT"
exec concept-guard demo "$@"
