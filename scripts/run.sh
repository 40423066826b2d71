#!/usr/bin/env bash
# Set up from nothing (scripts/setup.sh) and run the main job on the embedded default. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# `longhaul train` arrives with the running-system issue; until then the main job is the end-to-end check of the
# data path that exists: embedded Redis, trajectory codec, buffer append/read/commit, crash-safe persistence.
exec "${LONGHAUL_VENV:-.venv}/bin/longhaul" doctor "$@"
