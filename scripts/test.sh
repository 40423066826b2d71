#!/usr/bin/env bash
# Set up from nothing (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${LONGHAUL_VENV:-.venv}/bin/python" -m pytest "$@"
