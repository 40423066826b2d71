"""`longhaul train`: the whole job, started, watched and stopped from one driver process.

The driver brings the run up in dependency order: the policy model (the tiny one is built if missing), Redis (the
embedded server unless `redis.url` is set), the tool server (its own process), Ray (local unless
`train.ray_address`), the rollout actors as Ray actors, and the learner in this process, which opens the weight
transfer group with every actor's engine and sends them its weights before the first step. It then trains until
`learner.total_steps` or a stop request (Ctrl-C, SIGTERM, or the control plane), showing one status line: version,
reward, success, staleness, buffer depth, tokens/s.

A stop is clean: the learner checkpoints (acknowledging everything it trained on), the actors stop admitting groups
and finish those in flight, the processes go down in reverse order, and the run leaves `summary.json` and
`progress.png` in its output directory (`train.run_dir/run_name`). `--resume` continues from the newest checkpoint;
starting fresh over a run that has one is refused, because it would mix two runs' data in one buffer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longhaul.config import LonghaulConfig
from longhaul.net import free_port

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
        self._hosts: list = []
        self._progress = _Progress(started=time.monotonic())
        self._metrics_targets: dict[str, list[str]] = {}
        """Prometheus /metrics addresses by component."""

    def run(self) -> dict[str, Any]:
        """Train to the end or to a stop request; returns the run summary (also written to summary.json)."""
        from longhaul.actors.tiny_model import ensure_run_model
        from longhaul.buffer.redis_server import connect, redis_for_run
        from longhaul.buffer.store import TrajectoryStore
        from longhaul.learner.checkpoint import latest_checkpoint

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
            tools = stack.enter_context(self._tool_server())
            print(f"  tools      {tools.address}", flush=True)
            hosts, workers = self._start_actors(stack, model_dir, redis_url, tools.address)
            # After Ray and the actors are up: Ray forks its processes at start, and a gRPC server already serving
            # in this process makes every fork log a warning.
            control = stack.enter_context(self._control_server())
            print(f"  control    {control.address} (longhaul status | pause | resume | stop)", flush=True)
            targets = self._serve_metrics()
            print(f"  metrics    {', '.join(t for ts in self._metrics_targets.values() for t in ts)} "
                  f"(Prometheus file discovery: {targets})", flush=True)
            learner = self._start_learner(model_dir, store, hosts, workers)
            self._learner, self._store, self._hosts = learner, store, hosts
            print(f"  learner    step {learner.step}, weights sent to {len(hosts)} actor(s)", flush=True)
            self._state = "running"
            self._train(learner, store)
            self._state = "stopping"
            learner.finish()
            print(f"stopped at step {learner.step}; draining the actors ...", flush=True)
        self._state = "stopped"
        return self._summarize(time.monotonic() - started)

    # ---- bring-up -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tool_server(self):
        from longhaul.actors.tool_service import ToolServerProcess

        with ToolServerProcess(self.config.tools, self.config.world) as server:
            yield server

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
        """Serve this process's metrics (learner, buffer) and write every process's address for Prometheus file
        discovery (`file_sd_configs`); returns that file."""
        from prometheus_client import start_http_server

        host = self.config.train.metrics_host
        server, _ = start_http_server(0, addr=host)
        self._metrics_targets["driver"] = [f"{host}:{server.server_port}"]
        groups = [{"targets": addresses, "labels": {"job": "longhaul", "run": self.config.run_name, "component": c}}
                  for c, addresses in sorted(self._metrics_targets.items())]
        path = self.output_dir / "prometheus_targets.json"
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(groups, indent=2) + "\n")
        partial.replace(path)  # Prometheus re-reads the file on change: never show it half written
        return path

    def _start_actors(self, stack: contextlib.ExitStack, model_dir: Path, redis_url: str, tool_address: str):
        import ray

        from longhaul.actors.ray_actor import RolloutActorHost, config_for_ray, start_ray

        config = self.config
        start_ray(config.train.ray_address)
        stack.callback(ray.shutdown)
        gpus = 1 if torch.cuda.is_available() else 0
        host_class = ray.remote(RolloutActorHost).options(num_cpus=config.train.actor_num_cpus, num_gpus=gpus)
        hosts = [host_class.remote(f"actor-{i}", config_for_ray(config), str(model_dir), redis_url, tool_address,
                                   seed=config.learner.seed * 1000 + i)
                 for i in range(config.train.actors)]
        stack.callback(self._stop_actors, hosts)
        print(f"  actors     starting {len(hosts)} (engine start takes ~20 s on CPU) ...", flush=True)
        started = ray.get([host.start.remote() for host in hosts])
        self._metrics_targets["actor"] = [s["metrics"] for s in started]
        return hosts, [s["workers"] for s in started]

    @staticmethod
    def _stop_actors(hosts) -> None:
        import ray

        appended = ray.get([host.stop.remote() for host in hosts], timeout=600)
        print(f"  actors     stopped; {sum(appended)} trajectories appended in this session", flush=True)

    def _start_learner(self, model_dir: Path, store, hosts, workers):
        from longhaul.actors.engine import weight_transfer_backend
        from longhaul.actors.ray_actor import RayActorsClient
        from longhaul.learner.trainer import Learner

        learner = Learner(self.config, model_dir, store)
        client = RayActorsClient(hosts, workers)
        learner.connect_actors(client, backend=weight_transfer_backend(self.config.engine),
                               master_address=_local_address(), master_port=free_port(""),
                               world_size=client.world_size, engine_dtype=getattr(torch, self.config.engine.dtype))
        return learner

    # ---- the loop -----------------------------------------------------------------------------------------------

    def _train(self, learner, store) -> None:
        config = self.config
        progress = self._progress = _Progress(started=time.monotonic())
        interactive = sys.stdout.isatty()
        last_line = 0.0
        while learner.step < config.learner.total_steps and not self.stop_requested.is_set():
            if self.paused.is_set():
                self.stop_requested.wait(0.2)
                continue
            record = learner.train_step(timeout_s=1.0)
            if record is not None:
                progress.tokens += record["tokens"]
                progress.last = record
            now = time.monotonic()
            if interactive or now - last_line >= config.train.status_interval_s:
                line = progress.line(config, store.stats())
                print(f"\r{line:<140}" if interactive else line, end="" if interactive else "\n", flush=True)
                last_line = now
        if interactive:
            print()

    # ---- the control plane (longhaul.control.ControlTarget; called from the control server's threads) ---------

    def status(self):
        import ray

        from longhaul.control import ActorStatus, RunStatus

        actors = []
        for index, host in enumerate(self._hosts):
            try:
                info = ray.get(host.status.remote(), timeout=5)
                actors.append(ActorStatus(info["actor_id"], "running" if info["running"] else "draining",
                                          info["appended"], int(info["version"] or 0), info["pid"]))
            except Exception:  # noqa: BLE001 - a dead or hung actor is a status to show, not an error to raise
                actors.append(ActorStatus(f"actor-{index}", "dead", 0, 0, 0))
        stats = self._store.stats() if self._store is not None else None
        last = self._progress.last or {}
        learner = self._learner
        state = "paused" if self.paused.is_set() and self._state == "running" else self._state
        return RunStatus(
            run_name=self.config.run_name, state=state if state != "starting" else "running",
            policy_version=learner.version if learner else 0, learner_step=learner.step if learner else 0,
            total_steps=self.config.learner.total_steps, target_actors=self.config.train.actors, actors=actors,
            buffer_undelivered=stats.undelivered if stats else 0, buffer_pending=stats.pending if stats else 0,
            reward_mean=last.get("reward_mean", 0.0), success_rate=last.get("success_rate", 0.0),
            staleness_mean=last.get("staleness_mean", 0.0),
            tokens_per_second=self._progress.tokens / max(1e-9, time.monotonic() - self._progress.started),
            uptime_s=time.monotonic() - self._started)

    def scale(self, actors: int) -> tuple[int, int]:
        raise RuntimeError(f"this driver runs a fixed pool of {self.config.train.actors} actor(s); to change it, stop "
                           f"the run and start it again with train.actors={actors} --resume")

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
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _plot(records, self.output_dir / "progress.png", self.config.run_name)
        print(f"summary: {self.output_dir / 'summary.json'}; plot: {self.output_dir / 'progress.png'}", flush=True)
        return summary


def _plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in records]
    axis.plot(steps, [r["reward_mean"] for r in records], label="reward (F1)")
    axis.plot(steps, [r["success_rate"] for r in records], label="success (exact match)")
    axis.set_xlabel("learner step")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(f"longhaul run {title}")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _local_address() -> str:
    """The address actors on other nodes reach this driver at (loopback on a single machine is fine too)."""
    import ray

    return ray.util.get_node_ip_address()
