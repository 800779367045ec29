#!/usr/bin/env bash
# Create or reuse .venv, then run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
ensure_venv
export LONGVITA_PLATFORM="${LONGVITA_PLATFORM:-cpu}"
exec .venv/bin/python -m pytest "$@"
