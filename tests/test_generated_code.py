"""The generated gRPC/protobuf modules in longhaul/v1 are exactly what proto/ generates: IDL and code never drift."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = sorted((ROOT / "longhaul" / "v1").glob("*_pb2*.py*"))


def test_every_proto_has_its_generated_modules_committed():
    protos = sorted(p.stem for p in (ROOT / "proto" / "longhaul" / "v1").glob("*.proto"))
    assert sorted({p.name.split("_pb2")[0] for p in GENERATED}) == protos


def test_regenerating_from_proto_reproduces_the_committed_modules_byte_for_byte(tmp_path):
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "proto").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", *protos], cwd=tmp_path, check=True)
    for committed in GENERATED:
        regenerated = tmp_path / "longhaul" / "v1" / committed.name
        assert regenerated.read_bytes() == committed.read_bytes(), f"{committed.name}: run scripts/gen_proto.sh"
