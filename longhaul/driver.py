"""`longhaul train`: the whole job, started, watched and stopped from one driver process.

The driver brings the run up in dependency order: the policy model (the tiny one is built if missing, and warmed
up on expert demonstrations if `warmup.enabled`: `longhaul/warm_start.py`, after playing the held-out test tasks
itself so that the run records where it began), Redis (the embedded server unless
`redis.url` is set), Ray (local unless `train.ray_address`), then on Ray the tool server (unless `tools.address`),
the rollout actors (`longhaul/pool.py`) and the learner (`longhaul/learner_host.py`), which opens the weight transfer
group with every actor's engine and sends them its weights before they generate. The starting policy plays the
held-out test tasks first (`longhaul/held_out.py`). It then trains until `learner.total_steps` or a stop request
(Ctrl-C, SIGTERM, or the control plane), keeping the pool and the tool server healthy between steps, evaluating on
the test tasks every `evaluation.every_steps` and at the end, and showing one status line: version, reward,
success, staleness, buffer depth, tokens/s.

A stop is clean: the learner checkpoints (acknowledging everything it trained on), the actors stop admitting groups
and finish those in flight, the processes go down in reverse order, and the run leaves `summary.json`,
`evaluations.jsonl` and `progress.png` in its output directory (`train.run_dir/run_name`). `--resume` continues from
the newest checkpoint; starting fresh over a run that has one is refused, because it would mix two runs' data in one
buffer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longhaul import metrics
from longhaul.config import LonghaulConfig
from longhaul.held_out import BEFORE_WARMUP, TRAINING, HeldOutEvaluations, before_warmup_cache, describe

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says what to do."""


@dataclass
class _Progress:
    """The figures of the status line, smoothed over the last steps."""

    started: float
    tokens: int = 0
    last: dict[str, Any] | None = None

    def line(self, config: LonghaulConfig, stats) -> str:
        if self.last is None:
            return f"{config.run_name}: waiting for the first batch (buffer {stats.undelivered} undelivered)"
        r = self.last
        rate = self.tokens / max(1e-9, time.monotonic() - self.started)
        return (f"v{r['version']} step {r['step']}/{config.learner.total_steps}  reward {r['reward_mean']:.3f}  "
                f"success {r['success_rate']:.0%}  staleness {r['staleness_mean']:.1f}  "
                f"buffer {stats.undelivered}+{stats.pending}  tool calls ≤{r['tool_calls_max']}  "
                f"learner {rate:,.0f} tok/s")


class TrainingRun:
    """One `longhaul train` invocation."""

    def __init__(self, config: LonghaulConfig, *, resume: bool = False, stop: threading.Event | None = None):
        self.config = config
        self.resume = resume
        self.stop_requested = stop or threading.Event()
        self.paused = threading.Event()
        self.output_dir = Path(config.output_dir)
        # What `status()` reports; set as the run comes up, read from the control server's threads.
        self._started = time.monotonic()
        self._state = "starting"
        self._learner = None
        self._store = None
        self._pool = None
        self._tools: tuple | None = None
        """(handle, start info, public) of the tool server this run started."""
        self._tools_checked = 0.0
        self._progress = _Progress(started=time.monotonic())
        self._metrics_targets: dict[str, list[str]] = {}
        """Prometheus /metrics addresses by component."""
        self._evaluations = HeldOutEvaluations(self.output_dir / "evaluations.jsonl")

    def run(self) -> dict[str, Any]:
        """Train to the end or to a stop request; returns the run summary (also written to summary.json)."""
        from longhaul.actors.tiny_model import ensure_run_model
        from longhaul.buffer.redis_server import connect, redis_for_run
        from longhaul.buffer.store import TrajectoryStore
        from longhaul.learner.checkpoint import latest_checkpoint
        from longhaul.learner_host import RemoteLearner
        from longhaul.warm_start import warm_start

        config = self.config
        has_checkpoint = latest_checkpoint(config.checkpoint_dir) is not None
        if has_checkpoint and not self.resume:
            raise RunError(f"run {config.run_name!r} already has checkpoints in {config.checkpoint_dir}: pass --resume "
                           "to continue it, or choose another run_name (run_name=...)")
        if self.resume and not has_checkpoint:
            raise RunError(f"--resume: no checkpoint of run {config.run_name!r} in {config.checkpoint_dir}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        print(f"longhaul train: run {config.run_name!r}, outputs in {self.output_dir}", flush=True)
        model_dir = ensure_run_model(config.model, config.world)
        print(f"  model      {model_dir}", flush=True)
        model_dir = warm_start(config, model_dir, before=(
            self._evaluate_before_warmup if config.evaluation.at_start and not self.resume else None))
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            redis_url = stack.enter_context(redis_for_run(config.redis))
            client = connect(redis_url)
            stack.callback(client.close)
            store = TrajectoryStore(client, config.run_name, config.buffer)
            if not self.resume and store.stats().stream_length:
                raise RunError(f"the buffer of run {config.run_name!r} already holds trajectories: pass --resume, "
                               "or choose another run_name")
            print(f"  redis      {redis_url.split('@')[-1]}", flush=True)
            self._start_ray(stack)
            tool_address = self._start_tool_server(stack)
            print(f"  tools      {tool_address}", flush=True)
            # The learner loads beside the engines' start and the first evaluation: it trains nothing before
            # `pool.reconcile` below sends its weights.
            launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner-start")
            stack.callback(launcher.shutdown, wait=False)
            starting_learner = launcher.submit(RemoteLearner, self.config, model_dir, redis_url)
            pool = self._pool = self._start_actors(stack, model_dir, redis_url, tool_address, store)
            # After Ray and the actors are up: Ray forks its processes at start, and a gRPC server already serving
            # in this process makes every fork log a warning.
            control = stack.enter_context(self._control_server())
            print(f"  control    {control.address} (longhaul status | scale | pause | resume | stop)", flush=True)
            targets = self._serve_metrics()
            print(f"  metrics    {', '.join(t for ts in self._metrics_targets.values() for t in ts)} "
                  f"(Prometheus file discovery: {targets})", flush=True)
            if config.evaluation.at_start and not self.resume:
                # Before the first rollout, so the starting policy has the engine to itself and plays as version 0.
                self._evaluate(pool.members()[0], step=0)
            learner = starting_learner.result()
            self._learner, self._store = learner, store
            self._metrics_targets["learner"] = [learner.metrics_address]
            pool.reconcile(learner)  # opens the weight-sync group, sends the weights, and the actors begin
            self._write_targets()
            print(f"  learner    step {learner.step}, weights sent to {len(pool.members())} actor(s)", flush=True)
            self._state = "running"
            self._train(learner, store, pool)
            self._state = "stopping"
            if learner.step >= config.learner.total_steps and config.evaluation.at_end:
                if (evaluated := self._evaluations.wait(self.stop_requested)) is not None:  # one from the loop
                    print(f"  held-out   {describe(evaluated)}", flush=True)
                if running := [m for m in pool.members() if m.state == "running"]:
                    # The drain runs beside the final evaluation, not after it; with no new groups admitted, the
                    # evaluation soon has the engine to itself.
                    self._evaluate(running[0], step=learner.step, then=pool.begin_stop)
            learner.finish()
            print(f"stopped at step {learner.step}; draining the actors ...", flush=True)
        self._state = "stopped"
        return self._summarize(time.monotonic() - started)

    # ---- bring-up -----------------------------------------------------------------------------------------------

    def _start_ray(self, stack: contextlib.ExitStack) -> None:
        import ray

        from longhaul.actors.ray_actor import start_ray

        start_ray(self.config.train.ray_address)
        stack.callback(ray.shutdown)

    def _start_tool_server(self, stack: contextlib.ExitStack) -> str:
        """The run's tool server (a Ray actor), or the one `tools.address` names; returns its address."""
        import ray

        from longhaul.actors.ray_actor import config_for_ray
        from longhaul.actors.ray_tool_server import launch_tool_server

        if self.config.tools.address is not None:
            return self.config.tools.address
        public = self.config.train.ray_address is not None  # actors on other nodes call it
        handle, info = launch_tool_server(config_for_ray(self.config), num_cpus=self.config.train.tool_server_num_cpus,
                                          public=public)
        self._tools = (handle, info, public)
        self._metrics_targets["tools"] = [info["metrics"]]
        stack.callback(lambda: ray.get(self._tools[0].stop.remote(), timeout=60))
        return info["address"]

    def _check_tool_server(self) -> None:
        """Restart a dead tool server on the same node and port, so that the actors' address stays valid (their
        calls meanwhile fail as `unavailable` observations, retried within their bounds)."""
        import ray

        from longhaul.actors.ray_actor import config_for_ray
        from longhaul.actors.ray_tool_server import launch_tool_server

        if self._tools is None:
            return
        handle, info, public = self._tools
        try:
            ray.get(handle.ping.remote(), timeout=self.config.train.health_timeout_s)
            return
        except (ray.exceptions.RayError, TimeoutError) as error:
            log.error("the tool server is gone (%s): restarting it on %s", error, info["address"])
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(handle, no_restart=True)
        self._tools = (*launch_tool_server(config_for_ray(self.config), num_cpus=self.config.train.tool_server_num_cpus,
                                           port=info["port"], public=public, node_id=info["node_id"]), public)
        metrics.TOOL_SERVER_RESTARTS.inc()

    @contextlib.contextmanager
    def _control_server(self):
        from longhaul.control import ControlServer, address_file, write_address_file

        settings = self.config.control
        with ControlServer(self, host=settings.host, port=settings.port, max_actors=settings.max_actors) as server:
            path = write_address_file(address_file(self.config.run_name, self.config.train.run_dir), server.address)
            try:
                yield server
            finally:
                path.unlink(missing_ok=True)

    def _serve_metrics(self) -> Path:
        """Serve this process's metrics (learner, buffer, pool) and write every process's address for Prometheus
        file discovery (`file_sd_configs`); returns that file."""
        from prometheus_client import start_http_server

        host = self.config.train.metrics_host
        server, _ = start_http_server(0, addr=host)
        self._metrics_targets["driver"] = [f"{host}:{server.server_port}"]
        return self._write_targets()

    def _write_targets(self) -> Path:
        """(Re)write the scrape targets: at start, and whenever actors join or leave."""
        if self._pool is not None:
            self._metrics_targets["actor"] = self._pool.metrics_addresses()
        groups = [{"targets": addresses, "labels": {"job": "longhaul", "run": self.config.run_name, "component": c}}
                  for c, addresses in sorted(self._metrics_targets.items()) if addresses]
        # Prometheus re-reads the file on change: never show it half written.
        return _write_atomically(self.output_dir / "prometheus_targets.json", json.dumps(groups, indent=2) + "\n")

    def _start_actors(self, stack: contextlib.ExitStack, model_dir: Path, redis_url: str, tool_address: str, store):
        from longhaul.pool import ActorPool

        config = self.config
        pool = ActorPool(config, model_dir=model_dir, redis_url=redis_url, tool_address=tool_address,
                         gate=store.staleness)
        stack.callback(self._stop_actors, pool)
        print(f"  actors     starting {config.train.actors} (engine start takes ~20 s on CPU) ...", flush=True)
        pool.start(wait=True)
        return pool

    @staticmethod
    def _stop_actors(pool) -> None:
        appended = pool.stop()
        print(f"  actors     stopped; {appended} trajectories appended in this session", flush=True)

    # ---- the loop -----------------------------------------------------------------------------------------------

    def _train(self, learner, store, pool) -> None:
        from longhaul.autoscale import Autoscaler
        from longhaul.learner.trainer import WeightSyncError

        config = self.config
        progress = self._progress = _Progress(started=time.monotonic())
        autoscaler = Autoscaler(config.train.autoscale) if config.train.autoscale.enabled else None
        interactive = sys.stdout.isatty()
        last_line, waited = 0.0, 0.0
        while learner.step < config.learner.total_steps and not self.stop_requested.is_set():
            self._reconcile(pool, learner, interactive)
            if self.paused.is_set():
                self.stop_requested.wait(0.2)
                continue
            called = time.monotonic()
            try:
                record = learner.train_step(timeout_s=1.0)
            except WeightSyncError as error:
                # The step stands; the actors get its weights when the group is re-formed without the lost one.
                log.warning("%s: checking the actors", error)
                self._report(pool.check_now(learner), interactive)
                continue
            if (evaluated := self._evaluations.poll()) is not None:
                print(("\n" if interactive else "") + f"  held-out   {describe(evaluated)}", flush=True)
            if record is None:
                waited += time.monotonic() - called  # a starved learner: this wait belongs to the next step
            else:
                progress.tokens += record["tokens"]
                progress.last = record
                self._maybe_evaluate(pool, record["step"])
                if autoscaler is not None:
                    autoscaler.observe(waited + record["wait_seconds"], record["step_seconds"])
                    self._autoscale(autoscaler, pool, store, interactive)
                waited = 0.0
            now = time.monotonic()
            if interactive or now - last_line >= config.train.status_interval_s:
                line = progress.line(config, store.stats())
                print(f"\r{line:<140}" if interactive else line, end="" if interactive else "\n", flush=True)
                last_line = now
        if interactive:
            print()

    def _evaluate_before_warmup(self, model_dir: Path) -> None:
        """Evaluate the model a warm-up starts from, on an engine in this process (or take the result an earlier run
        kept): the run's record of where it began."""
        import asyncio

        settings = self.config.evaluation
        cache = before_warmup_cache(self.config, model_dir)
        figures = _read_json(cache) if cache is not None else None
        if figures is not None:
            print(f"  held-out   the model before the warm-up, as evaluated by an earlier run ({cache}):", flush=True)
        else:
            print(f"  held-out   evaluating the model before the warm-up on {settings.tasks or 'all'} test tasks (an "
                  "engine in this process) ...", flush=True)
            # Set before vLLM is imported here: its start-up INFO lines would bury the run's console. Restored after,
            # so the actors (whose logs go to Ray's files) keep the level they would have had.
            level = os.environ.get("VLLM_LOGGING_LEVEL")
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            from longhaul.actors.evaluation import evaluate_model

            started = time.monotonic()
            try:
                figures = {**asyncio.run(evaluate_model(model_dir, self.config)).summary(),
                           "seconds": time.monotonic() - started}
            finally:
                if level is None:
                    del os.environ["VLLM_LOGGING_LEVEL"]
            if cache is not None:  # a run stopped mid-write must not leave half a file
                cache.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(cache, json.dumps(figures) + "\n")
        record = self._evaluations.add({"step": 0, "phase": BEFORE_WARMUP, "actor_id": "driver", "time": time.time(),
                                        **figures})
        print(f"  held-out   {describe(record)}", flush=True)

    def _evaluate(self, member, step: int, then: Callable[[], None] | None = None) -> None:
        """Evaluate on `member` and wait for the result (or a stop request); `then`, if given, runs once the
        evaluation is asked for."""
        print(f"  held-out   evaluating the policy of step {step} on {self.config.evaluation.tasks or 'all'} test "
              f"tasks ({member.actor_id}) ...", flush=True)
        self._evaluations.request(member.handle, member.actor_id, step)
        if then is not None:
            then()
        if (record := self._evaluations.wait(self.stop_requested)) is not None:
            print(f"  held-out   {describe(record)}", flush=True)

    def _maybe_evaluate(self, pool, step: int) -> None:
        """Start the periodic evaluation of `step` in the background, on the first running actor."""
        every = self.config.evaluation.every_steps
        if not every or step % every or step >= self.config.learner.total_steps or self._evaluations.busy:
            return  # the last step's evaluation is the final one, which the run waits for
        if running := [m for m in pool.members() if m.state == "running"]:
            self._evaluations.request(running[0].handle, running[0].actor_id, step)

    def _autoscale(self, autoscaler, pool, store, interactive: bool) -> None:
        decision = autoscaler.decide(time.monotonic(), pool.target, store.stats().undelivered,
                                     self.config.buffer.staleness.batch_size)
        if decision is not None:
            previous, target = pool.scale(decision.target)
            print(("\n" if interactive else "") + f"  autoscale  actors {previous} -> {target}: {decision.reason}",
                  flush=True)

    def _reconcile(self, pool, learner, interactive: bool) -> None:
        self._report(pool.reconcile(learner), interactive)
        if time.monotonic() - self._tools_checked >= self.config.train.health_interval_s:
            self._check_tool_server()
            self._tools_checked = time.monotonic()

    def _report(self, event, interactive: bool) -> None:
        if event:
            print(("\n" if interactive else "") + f"  actors     {event.describe()}", flush=True)
            self._write_targets()

    # ---- the control plane (longhaul.control.ControlTarget; called from the control server's threads) ---------

    def status(self):
        import ray

        from longhaul.control import ActorStatus, RunStatus

        actors = []
        members = self._pool.members() if self._pool is not None else []
        answers = [m.handle.status.remote() if m.state in ("running", "draining") else None for m in members]
        for member, answer in zip(members, answers, strict=True):
            if answer is None:  # its engine is starting, or it waits for the group to let it in
                actors.append(ActorStatus(member.actor_id, "starting", 0, 0, member.info.get("pid", 0)))
                continue
            try:
                info = ray.get(answer, timeout=5)
                actors.append(ActorStatus(member.actor_id, member.state, info["appended"], int(info["version"] or 0),
                                          info["pid"]))
            except Exception:  # noqa: BLE001 - a dead or hung actor is a status to show, not an error to raise
                actors.append(ActorStatus(member.actor_id, "dead", 0, 0, member.info.get("pid", 0)))
        stats = self._store.stats() if self._store is not None else None
        last = self._progress.last or {}
        learner = self._learner
        state = "paused" if self.paused.is_set() and self._state == "running" else self._state
        return RunStatus(
            run_name=self.config.run_name, state=state if state != "starting" else "running",
            policy_version=learner.version if learner else 0, learner_step=learner.step if learner else 0,
            total_steps=self.config.learner.total_steps,
            target_actors=self._pool.target if self._pool is not None else self.config.train.actors, actors=actors,
            buffer_undelivered=stats.undelivered if stats else 0, buffer_pending=stats.pending if stats else 0,
            reward_mean=last.get("reward_mean", 0.0), success_rate=last.get("success_rate", 0.0),
            staleness_mean=last.get("staleness_mean", 0.0),
            tokens_per_second=self._progress.tokens / max(1e-9, time.monotonic() - self._progress.started),
            uptime_s=time.monotonic() - self._started)

    def scale(self, actors: int) -> tuple[int, int]:
        if self._pool is None:
            raise RuntimeError("the actors are still starting: try again in a moment")
        return self._pool.scale(actors)

    def pause(self) -> None:
        self.paused.set()

    def resume(self) -> None:
        self.paused.clear()

    def stop(self, drain: bool = True) -> None:
        # Actors always drain: episodes in flight finish and land in the buffer, where the resumed run finds them.
        self.stop_requested.set()

    # ---- the end ------------------------------------------------------------------------------------------------

    def _summarize(self, seconds: float) -> dict[str, Any]:
        steps_path = self.config.checkpoint_dir / "steps.jsonl"
        records = [json.loads(line) for line in steps_path.read_text().splitlines()] if steps_path.exists() else []
        latest = {r["step"]: r for r in records}  # a step redone after a crash: its last line counts
        records = [latest[s] for s in sorted(latest)]
        tenth = max(1, len(records) // 10)

        def mean(rows, key):
            return sum(r[key] for r in rows) / len(rows) if rows else 0.0

        summary = {
            "run_name": self.config.run_name, "steps": len(records), "wall_seconds": seconds,
            "policy_version": records[-1]["version"] if records else 0,
            "trajectories": sum(r["trajectories"] for r in records),
            "tokens": sum(r["tokens"] for r in records),
            "reward_first": mean(records[:tenth], "reward_mean"), "reward_last": mean(records[-tenth:], "reward_mean"),
            "success_first": mean(records[:tenth], "success_rate"),
            "success_last": mean(records[-tenth:], "success_rate"),
            "max_tool_calls": max((r["tool_calls_max"] for r in records), default=0),
            "staleness_mean": mean(records, "staleness_mean"),
            "held_out": [{"phase": e.get("phase", TRAINING), **{k: e[k] for k in (
                "step", "versions", "episodes", "success_rate", "mean_f1", "mean_tool_calls", "max_tool_calls",
                "success_by_hops")}} for e in self._evaluations.records],
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _plot(records, self._evaluations.records, self.output_dir / "progress.png", self.config.run_name)
        print(f"summary: {self.output_dir / 'summary.json'}; plot: {self.output_dir / 'progress.png'}", flush=True)
        return summary


def _write_atomically(path: Path, text: str) -> Path:
    """Write `text` to `path` whole or not at all: a reader never sees half of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None if there is none or it is not one (then it is computed again)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _plot(records: list[dict[str, Any]], evaluations: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in records]
    axis.plot(steps, [r["reward_mean"] for r in records], label="reward (F1, plus any evidence reward)")
    axis.plot(steps, [r["success_rate"] for r in records], label="success (exact match)")
    before = [e for e in evaluations if e.get("phase") == BEFORE_WARMUP]
    during = [e for e in evaluations if e.get("phase", TRAINING) == TRAINING]
    if during:
        axis.plot([e["step"] for e in during], [e["success_rate"] for e in during], "o-", color="black",
                  label=f"held-out success ({during[-1]['episodes']} test tasks, greedy)")
    if before:
        axis.plot([0], [before[-1]["success_rate"]], "x", color="tab:red", markersize=9, markeredgewidth=2,
                  label="held-out success before the warm-up")
    axis.set_xlabel("learner step")
    # An evidence reward lifts rewards above 1; success rates never leave [0, 1].
    axis.set_ylim(-0.02, max([1.0, *(r["reward_mean"] for r in records)]) + 0.02)
    axis.set_title(f"longhaul run {title}")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
