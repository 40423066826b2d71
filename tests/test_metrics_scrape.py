"""Prometheus exposition, scraped over HTTP as Prometheus does.

tests/test_train.py scrapes the driver and an actor of a real run through its `prometheus_targets.json`; this module
covers the tool server process (its own /metrics, reported by `ToolServerProcess.metrics_address`), the exposition
of every longhaul family in one registry, and a real Prometheus server (Debian's `prometheus`) finding a target
through infra/prometheus/prometheus.yml's file discovery and loading its rules.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from longhaul.actors.tool_service import ToolClient, ToolError, ToolServerProcess
from longhaul.config import ToolServiceConfig
from longhaul.net import free_port
from tests.conftest import SMALL_WORLD
from tests.test_dashboard import longhaul_metric_objects

ROOT = Path(__file__).parent.parent


def scrape(address: str) -> dict:
    """The families a /metrics endpoint exposes, parsed by prometheus_client's own text-format parser, by name."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family, suffix: str = "") -> dict[tuple, float]:
    """Sample values of `family` keyed by their sorted label pairs (`le` included for buckets)."""
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == family.name + suffix}


async def _some_calls(address: str) -> None:
    """One answered, one rejected and one not-found call of each kind the server counts."""
    async with ToolClient(address, ToolServiceConfig(deadline_s=10)) as client:
        await client.search("capital of", top_k=3)
        await client.list_tasks("train", 0, 5)
        for bad in (client.open("no such doc!"), client.answer("task-does-not-exist", "x")):
            with pytest.raises(ToolError):
                await bad


@pytest.fixture(scope="module")
def tool_server() -> Iterator[ToolServerProcess]:
    process = ToolServerProcess(ToolServiceConfig(), SMALL_WORLD).start()
    try:
        asyncio.run(_some_calls(process.address))
        yield process
    finally:
        process.stop()


def test_tool_server_process_serves_its_tool_metrics(tool_server: ToolServerProcess):
    host, _, port = tool_server.metrics_address.rpartition(":")
    assert host == "127.0.0.1" and int(port) not in (0, tool_server.port)
    families = scrape(tool_server.metrics_address)
    requests = families["longhaul_tool_server_requests"]
    assert requests.type == "counter"
    counts = samples(requests, "_total")
    assert counts[(("code", "OK"), ("tool", "search"))] == 1
    assert counts[(("code", "OK"), ("tool", "list_tasks"))] == 1
    assert counts[(("code", "INVALID_ARGUMENT"), ("tool", "open"))] == 1
    assert counts[(("code", "NOT_FOUND"), ("tool", "answer"))] == 1
    latency = families["longhaul_tool_server_latency_seconds"]
    assert latency.type == "histogram"
    assert samples(latency, "_count")[(("tool", "search"),)] == 1
    assert samples(latency, "_bucket")[(("le", "+Inf"), ("tool", "search"))] == 1
    assert samples(families["longhaul_tool_server_in_flight"]) == {(): 0}
    # The server process exports its own families and the standard process collectors, nothing else of ours:
    # client-side tool metrics live in the actors.
    ours = {name for name in families if name.startswith("longhaul_") and not name.endswith("_created")}
    assert ours == {"longhaul_tool_server_requests", "longhaul_tool_server_latency_seconds",
                    "longhaul_tool_server_in_flight", "longhaul_tool_calls", "longhaul_tool_call_seconds",
                    "longhaul_tool_call_attempts"}
    assert not samples(families["longhaul_tool_calls"], "_total")


@pytest.mark.slow
def test_a_restarted_tool_server_serves_metrics_at_the_same_address():
    process = ToolServerProcess(ToolServiceConfig(), SMALL_WORLD).start()
    try:
        address = process.metrics_address
        assert process.stop() == 0
        process.start()
        assert process.metrics_address == address
        assert "longhaul_tool_server_requests" in scrape(address)
    finally:
        process.stop()


def test_a_tool_server_started_without_metrics_has_no_metrics_address():
    process = ToolServerProcess(ToolServiceConfig(), SMALL_WORLD, metrics_host=None).start()
    try:
        assert process.metrics_address is None
        assert process.address
    finally:
        process.stop()


def test_every_longhaul_family_round_trips_through_the_text_exposition():
    objects = longhaul_metric_objects()  # imports every module that defines longhaul metrics
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}
    for name, obj in objects.items():
        assert name in families, f"{name} is not in the exposition"
        assert families[name].type == obj._type, name
        assert families[name].documentation == obj._documentation, name


# ---- a real Prometheus --------------------------------------------------------------------------------------------


def _query(prometheus: str, expr: str) -> list[dict]:
    url = f"http://{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus not installed (Debian: apt-get install prometheus)")
def test_prometheus_finds_a_run_through_the_targets_file_and_loads_the_rules(tmp_path: Path,
                                                                             tool_server: ToolServerProcess):
    config = tmp_path / "prometheus"
    shutil.copytree(ROOT / "infra" / "prometheus", config, ignore=shutil.ignore_patterns("*.json"))
    # The driver's prometheus_targets.json, in the driver's shape, linked into targets/ as the config's comment says.
    run_targets = tmp_path / "runs" / "scrape" / "prometheus_targets.json"
    run_targets.parent.mkdir(parents=True)
    run_targets.write_text(json.dumps([{"targets": [tool_server.metrics_address],
                                        "labels": {"job": "longhaul", "run": "scrape", "component": "tools"}}]))
    (config / "targets" / "scrape.json").symlink_to(run_targets)
    address = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(["prometheus", "--config.file=prometheus.yml", f"--storage.tsdb.path={tmp_path / 'db'}",
                               f"--web.listen-address={address}", "--log.level=warn"],
                              cwd=config, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                found = _query(address, 'longhaul_tool_server_requests_total{run="scrape", component="tools"}')
            except OSError:
                found = []
            if found:
                break
            assert time.monotonic() < deadline, "Prometheus scraped nothing from the tool server within 90 s"
            time.sleep(1)
        by_call = {(r["metric"]["tool"], r["metric"]["code"]): float(r["value"][1]) for r in found}
        assert by_call[("search", "OK")] == 1
        up = _query(address, 'up{job="longhaul", run="scrape"}')
        assert [(r["metric"]["component"], r["value"][1]) for r in up] == [("tools", "1")]
        # metric_relabel_configs keeps only longhaul's and the process collectors' series.
        names = {r["metric"]["__name__"] for r in _query(address, '{job="longhaul"}')}
        assert names and all(n.startswith(("longhaul_", "process_", "python_")) or n.startswith("scrape_")
                             or n == "up" for n in names), names
        with urllib.request.urlopen(f"http://{address}/api/v1/rules", timeout=10) as response:
            groups = {g["name"]: g for g in json.load(response)["data"]["groups"]}
        assert {"longhaul.recording", "longhaul.alerts"} <= set(groups)
        assert all(rule["health"] != "err" for group in groups.values() for rule in group["rules"])
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
