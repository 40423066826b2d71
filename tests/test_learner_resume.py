"""A learner killed with SIGKILL mid-run and resumed from its checkpoint ends exactly where an uninterrupted run on the
same data ends, and trains no trajectory twice (only the steps after its last checkpoint are redone)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from longhaul.buffer.redis_server import connect
from longhaul.buffer.store import TrajectoryStore
from longhaul.config import BufferConfig, StalenessConfig
from longhaul.synthetic import policy_trajectories

STEPS = 12
BATCH = 8
CHECKPOINT_EVERY = 3
KILL_AFTER_STEP = 7  # past the checkpoint of step 6, before that of step 9


def _learner(redis_url: str, run: str, checkpoints: Path, model_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "longhaul.cli", "learner", f"redis.url={redis_url}", f"run_name={run}",
               f"model.path={model_dir}", f"learner.checkpoint_dir={checkpoints}", f"learner.total_steps={STEPS}",
               f"learner.checkpoint_every={CHECKPOINT_EVERY}", "learner.learning_rate=0.001",
               f"buffer.staleness.batch_size={BATCH}", "buffer.staleness.max_staleness=1000"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _steps(checkpoints: Path) -> list[dict]:
    path = checkpoints / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_step(process: subprocess.Popen, checkpoints: Path, step: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(record["step"] == step for record in _steps(checkpoints)):
        if process.poll() is not None:
            raise AssertionError(f"learner exited with {process.returncode} before step {step}:\n"
                                 f"{process.stdout.read()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the learner did not reach step {step} within {timeout_s} s")
        time.sleep(0.05)


def _wait_until_pending(store: TrajectoryStore, count: int, timeout_s: float = 60) -> None:
    # The learner logs step 7 before it reads the next group; killing it in between would leave that group unread
    # (still in the stream, not pending) and the test would not show that a held, unacknowledged group survives.
    deadline = time.monotonic() + timeout_s
    while store.stats().pending != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the learner did not hold {count} trajectories within {timeout_s} s: "
                               f"{store.stats()}")
        time.sleep(0.05)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output


@pytest.mark.slow
def test_sigkilled_learner_resumes_to_the_uninterrupted_result_without_training_any_trajectory_twice(
        tiny_model_dir: Path, redis_server, tmp_path: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trajectories = policy_trajectories(model, count=STEPS * BATCH, group_size=4, seed=11)
    config = BufferConfig(staleness=StalenessConfig(batch_size=BATCH, max_staleness=1000))
    client = connect(redis_server.url)
    stores = {run: TrajectoryStore(client, run, config) for run in ("uninterrupted", "killed")}

    # The reference: all the data up front, one learner from start to end.
    for trajectory in trajectories:
        stores["uninterrupted"].append(trajectory)
    reference_dir = tmp_path / "uninterrupted"
    _finish(_learner(redis_server.url, "uninterrupted", reference_dir, tiny_model_dir))

    # The same data in two parts. The first is 7 batches and one group more: the learner trains step 7 (after the
    # checkpoint of step 6), holds the extra group while it waits for a batch, and is killed there.
    killed_dir = tmp_path / "killed"
    first_part = KILL_AFTER_STEP * BATCH + 4
    for trajectory in trajectories[:first_part]:
        stores["killed"].append(trajectory)
    process = _learner(redis_server.url, "killed", killed_dir, tiny_model_dir)
    _wait_for_step(process, killed_dir, KILL_AFTER_STEP)
    _wait_until_pending(stores["killed"], BATCH + 4)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    stats = stores["killed"].stats()
    assert stats.counters.get("committed", 0) == 6 * BATCH  # only what the checkpoint of step 6 covers
    assert stats.pending == BATCH + 4  # step 7's batch and the held group: unacknowledged, not lost
    for trajectory in trajectories[first_part:]:
        stores["killed"].append(trajectory)
    _finish(_learner(redis_server.url, "killed", killed_dir, tiny_model_dir))

    # Same parameters as the uninterrupted run.
    reference = load_file(reference_dir / f"step-{STEPS:08d}" / "model" / "model.safetensors")
    resumed = load_file(killed_dir / f"step-{STEPS:08d}" / "model" / "model.safetensors")
    assert reference.keys() == resumed.keys()
    initial = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(reference[name].to(initial[name].dtype), initial[name]) for name in initial), \
        "training changed no parameter: the comparison would prove nothing"

    # Step 7 was trained twice (killed before its checkpoint); in the surviving history, every trajectory once.
    records = _steps(killed_dir)
    assert [r["step"] for r in records] == [*range(1, KILL_AFTER_STEP + 1), *range(KILL_AFTER_STEP, STEPS + 1)]
    surviving = {r["step"]: r for r in records}  # a redone step's later line wins
    reference_records = {r["step"]: r for r in _steps(reference_dir)}
    for step in range(1, STEPS + 1):
        assert surviving[step]["trajectory_ids"] == reference_records[step]["trajectory_ids"]
        assert surviving[step]["loss"] == pytest.approx(reference_records[step]["loss"], abs=1e-6)
    trained = [tid for step in range(1, STEPS + 1) for tid in surviving[step]["trajectory_ids"]]
    assert sorted(trained) == sorted(t.trajectory_id for t in trajectories)
    stats = stores["killed"].stats()
    assert stats.counters["committed"] == STEPS * BATCH
    assert stats.counters.get("duplicates", 0) == 0
    assert stats.pending == 0
    client.close()
