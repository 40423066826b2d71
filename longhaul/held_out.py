"""The held-out evaluations of a `longhaul train` run: played on a rollout actor's engine, kept in
`evaluations.jsonl`.

Training reward measures the policy on the tasks it trains on; the question a run answers is whether it learned to
search on tasks it never saw. The driver asks an actor (`RolloutActorHost.evaluate`) to play the world's test tasks
at the start, every `evaluation.every_steps` steps, and at the end; at most one evaluation runs at a time, and the
driver's loop never blocks on one in the middle of the run. Each record carries the learner step it was requested at
and the policy versions that actually played (weights may change while an evaluation runs beside training).

A run that warms up first also evaluates the model it warms up, before the warm-up (`phase: before warm-up`, played
by the driver on an engine of its own): the run's own record of what the whole command achieved. The tiny model's
result is kept in the model cache (`before_warmup_cache`), because it costs minutes (a random policy wanders to
the turn limit) and depends only on inputs the cache key holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import ray

from longhaul.config import LonghaulConfig

log = logging.getLogger(__name__)

TRAINING = "training"
"""`phase` of the evaluations of the policy the learner trains (step 0 is the starting policy)."""
BEFORE_WARMUP = "before warm-up"
"""`phase` of the evaluation of the model a warm-up starts from."""


class HeldOutEvaluations:
    """The evaluations of one run; a resumed run appends to the same file."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = (
            [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else [])
        self._pending: tuple[Any, int, str] | None = None

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def request(self, handle, actor_id: str, step: int) -> None:
        """Start an evaluation on the actor behind `handle` (a `RolloutActorHost`) for the policy at `step`."""
        if self._pending is not None:
            raise RuntimeError("an evaluation is already running")
        self._pending = (handle.evaluate.remote(), step, actor_id)

    def poll(self, timeout_s: float = 0.0) -> dict[str, Any] | None:
        """The record of the running evaluation if it finished within `timeout_s`, else None. A failed one (its
        actor died) is logged and dropped: the next request starts afresh."""
        if self._pending is None:
            return None
        ref, step, actor_id = self._pending
        ready, _ = ray.wait([ref], timeout=timeout_s)
        if not ready:
            return None
        self._pending = None
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as error:
            log.error("the held-out evaluation of step %d on %s failed: %s", step, actor_id, error)
            return None
        return self.add({"step": step, "phase": TRAINING, "actor_id": actor_id, "time": time.time(), **result})

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        """Keep `record` (an evaluation played elsewhere, like the one before the warm-up) and return it."""
        self.records.append(record)
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        return record

    def wait(self, stop: threading.Event) -> dict[str, Any] | None:
        """Block until the running evaluation finishes (its record) or `stop` is set (None)."""
        while self._pending is not None and not stop.is_set():
            record = self.poll(timeout_s=0.5)
            if record is not None:
                return record
        return None


def describe(record: dict[str, Any]) -> str:
    """One line for the console."""
    versions = record["versions"]
    played = f"v{versions[0]}" if versions[0] == versions[1] else f"v{versions[0]}-v{versions[1]}"
    when = ("before the warm-up" if record.get("phase") == BEFORE_WARMUP else
            f"at step {record['step']} ({played})")
    return (f"success {record['success_rate']:.1%} (F1 {record['mean_f1']:.3f}) on {record['episodes']} test "
            f"tasks {when}, {record['mean_tool_calls']:.1f} tool calls per episode "
            f"(max {record['max_tool_calls']}), {record['seconds']:.0f} s")


def before_warmup_cache(config: LonghaulConfig, model_dir: Path) -> Path | None:
    """Where the evaluation of the tiny model `model_dir` under `config` is kept, keyed by everything a greedy
    evaluation depends on (the model directory is named by the hash of its inputs); None for a model given by
    `model.path`, whose files may change under the same path."""
    if config.model.path is not None:
        return None
    inputs = {"model": model_dir.name, **{name: getattr(config, name).model_dump(mode="json") for name in (
        "evaluation", "agent", "world", "tools", "engine")}}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return config.model.cache_dir / "evaluations" / f"{model_dir.name}-{digest}.json"
