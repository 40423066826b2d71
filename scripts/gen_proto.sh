#!/usr/bin/env bash
# Regenerate the Python protobuf/gRPC modules (and .pyi stubs) of every proto/longhaul/v1/*.proto into longhaul/v1/.
# The generated files are committed: after editing a .proto, run this and commit the .proto and its modules together.
#   PYTHON  interpreter with grpcio-tools installed (the `dev` extra); default: `python` on PATH
#
# protoc runs from the repo root (the script cds there) with `-Iproto`, so proto/longhaul/v1/x.proto has the import
# path longhaul/v1/x.proto: its modules land in ./longhaul/v1 and import as `longhaul.v1.x_pb2` (a bare top-level
# `proto` package would collide with proto-plus, which ray installs).
#
# The protoc inside grpcio-tools stamps its version into the gencode, and at import the protobuf runtime refuses
# gencode of another major version or newer than itself (grpcio likewise refuses *_pb2_grpc.py from a newer
# grpcio-tools). The last step imports every module, so a mismatch fails here and not in a running actor.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"

"$python" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/longhaul/v1/*.proto

"$python" - <<'PY'
import importlib
import pathlib

import google.protobuf
import grpc

for path in sorted(pathlib.Path("longhaul/v1").glob("*_pb2*.py")):
    importlib.import_module(f"longhaul.v1.{path.stem}")
print(f"[gen_proto] ok: longhaul/v1 imports with protobuf {google.protobuf.__version__}, grpcio {grpc.__version__}")
PY
