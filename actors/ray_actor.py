"""A rollout actor as a Ray actor: one engine, its episodes, and the receiving end of weight sync, in one process.

`RolloutActorHost` is what the driver places on the cluster (one per GPU there, `num_gpus=1`; CPU-only here). It
builds everything an actor needs from the run config and addresses (tokenizer and chat format, the engine, a tool
client, the buffer), runs `RolloutActor.run` as a background task on the actor's event loop, and serves, on the same
loop, the four weight-sync calls a learner makes. Ray runs an async actor's calls concurrently, so a weight update
arrives while episodes are generating: the engine pauses between steps, loads, resumes, and the episodes carry on.

`RayActorsClient` is the learner's `VLLMWeightSyncClient` for a set of these actors: each call fans out to all of
them. Every engine joins the transfer group at its own ranks (after the learner at rank 0 and the engines before
it), so several independent engines share one group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import ray

from longhaul.config import LonghaulConfig

log = logging.getLogger(__name__)


class RolloutActorHost:
    """Hosts one rollout actor; create it with `ray.remote(RolloutActorHost).options(...).remote(...)`."""

    def __init__(self, actor_id: str, config: dict[str, Any], model_dir: str, redis_url: str, tool_address: str,
                 initial_version: int = 0, seed: int = 0):
        # The config travels as a plain dict (Ray pickles arguments; a dict survives any version skew) and is
        # validated again here.
        self.actor_id = actor_id
        self.config = LonghaulConfig.model_validate(config)
        self._model_dir, self._redis_url, self._tool_address = model_dir, redis_url, tool_address
        self._initial_version, self._seed = initial_version, seed
        self._engine = None
        self._actor = None
        self._tools = None
        self._chat = None
        self._stop = asyncio.Event()
        self._running: asyncio.Task | None = None
        self._evaluations: set[asyncio.Task] = set()

    async def start(self, generate: bool = True) -> dict[str, Any]:
        """Start the engine, and the episodes unless `generate` is False (then `begin` starts them: an actor that
        joins a running job first receives the current weights, so that it never samples with stale ones).
        Returns the engine's worker count (its ranks in the sync group), this process's id, and the address of its
        Prometheus /metrics."""
        from prometheus_client import start_http_server
        from transformers import AutoTokenizer

        from longhaul.actors.agent_loop import ChatFormat
        from longhaul.actors.engine import InferenceEngine
        from longhaul.actors.rollout_actor import RolloutActor
        from longhaul.actors.tool_service import ToolClient
        from longhaul.buffer.redis_server import connect
        from longhaul.buffer.store import TrajectoryStore

        config = self.config
        self._engine = await InferenceEngine(self._model_dir, config.engine, self._initial_version).start()
        self._tools = ToolClient(self._tool_address, config.tools)
        store = TrajectoryStore(connect(self._redis_url), config.run_name, config.buffer)
        tasks = await self._tools.all_tasks(config.actor.split)
        self._chat = ChatFormat(AutoTokenizer.from_pretrained(self._model_dir))
        self._actor = RolloutActor(self.actor_id, engine=self._engine, tools=self._tools, chat=self._chat,
                                   store=store, tasks=tasks, agent=config.agent, config=config.actor, seed=self._seed)
        if generate:
            await self.begin()
        host = config.train.metrics_host
        server, _ = start_http_server(0, addr=host)
        advertised = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host
        return {"workers": config.engine.tensor_parallel_size, "pid": os.getpid(),
                "metrics": f"{advertised}:{server.server_port}"}

    async def begin(self) -> None:
        """Start running episodes (once; after `start(generate=False)`)."""
        if self._actor is None:
            raise RuntimeError(f"{self.actor_id}: begin() before start()")
        if self._running is None:
            self._running = asyncio.create_task(self._actor.run(self._stop))

    async def ping(self) -> int:
        """The health check: this process's id, or the exception that ended the actor's episode loop."""
        if self._running is not None and self._running.done() and self._running.exception() is not None:
            raise self._running.exception()
        return os.getpid()

    async def evaluate(self) -> dict[str, Any]:
        """Play the held-out tasks (`evaluation` config) on this actor's engine, beside its rollouts, and return the
        figures (`EvalResult.summary`) with the seconds it took. Nothing goes to the buffer."""
        from longhaul.actors.evaluation import evaluate_held_out

        if self._engine is None:
            raise RuntimeError(f"{self.actor_id}: evaluate() before start()")
        started = time.monotonic()
        task = asyncio.create_task(evaluate_held_out(self.config, engine=self._engine, tools=self._tools,
                                                     chat=self._chat))
        self._evaluations.add(task)  # `stop` waits for it: the engine must outlive the episodes using it
        try:
            result = await task
        finally:
            self._evaluations.discard(task)
        return {**result.summary(), "seconds": time.monotonic() - started}

    async def stop(self) -> int:
        """Stop admitting groups, let those in flight (and any evaluation) finish, shut the engine down; returns
        trajectories appended."""
        self._stop.set()
        if self._running is not None:
            await self._running
        if self._evaluations:
            await asyncio.wait(self._evaluations)
        if self._tools is not None:
            await self._tools.close()
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        return self._actor.appended if self._actor else 0

    async def status(self) -> dict[str, Any]:
        pid = await self.ping()  # the actor loop died: surface why to the driver
        running = self._running is not None and not self._running.done()
        return {"actor_id": self.actor_id, "pid": pid, "running": running,
                "appended": self._actor.appended if self._actor else 0,
                "version": await self._engine.weight_version() if self._engine else None}

    # ---- weight sync: the engine's four calls ------------------------------------------------------------------

    async def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        await self._engine.init_weight_transfer_engine(init_info)

    async def start_weight_update(self) -> None:
        await self._engine.start_weight_update()

    async def update_weights(self, update_info: dict[str, Any]) -> None:
        await self._engine.update_weights(update_info)

    async def finish_weight_update(self, weight_version: str | None = None) -> None:
        await self._engine.finish_weight_update(weight_version)


class ActorLost(RuntimeError):
    """An actor the learner syncs weights to is dead or unresponsive; no engine was touched."""


class RayActorsClient:
    """`VLLMWeightSyncClient` over several `RolloutActorHost`s: each call goes to all of them and waits for all.

    `workers[i]` is actor i's engine worker count; actor i's workers take the ranks after the learner's (0) and
    those of the actors before it."""

    def __init__(self, handles: list, workers: list[int], timeout_s: float = 600.0, ping_timeout_s: float = 30.0):
        if len(handles) != len(workers):
            raise ValueError(f"{len(handles)} actors but {len(workers)} worker counts")
        self._handles, self._workers, self._timeout_s = handles, workers, timeout_s
        self._ping_timeout_s = ping_timeout_s

    @property
    def world_size(self) -> int:
        """The transfer group: the learner and every engine worker."""
        return 1 + sum(self._workers)

    def _all(self, calls) -> None:
        ray.get(calls, timeout=self._timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        calls, offset = [], 1
        for handle, workers in zip(self._handles, self._workers, strict=True):
            calls.append(handle.init_weight_transfer_engine.remote({**init_info, "rank_offset": offset}))
            offset += workers
        self._all(calls)

    def start_weight_update(self) -> None:
        # Every engine must be alive before any is paused: an update that starts on some engines and fails on a
        # dead one would leave the others paused mid-reload, waiting for buckets that never come.
        try:
            ray.get([h.ping.remote() for h in self._handles], timeout=self._ping_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as error:
            raise ActorLost(f"an actor of the weight-sync group is gone or unresponsive: {error}") from error
        self._all([h.start_weight_update.remote() for h in self._handles])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all([h.update_weights.remote(update_info) for h in self._handles])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all([h.finish_weight_update.remote(weight_version) for h in self._handles])


def start_ray(address: str | None = None, attempts: int = 3, **init_options: Any) -> None:
    """`ray.init`, retried when a local node misses its registration window.

    Ray gives a starting local node a fixed 30 s to register with its GCS; on a loaded 2-core machine (an engine
    from a previous run still shutting down, say) that window can pass, and a second try a moment later succeeds."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_options)
            return
        except Exception as error:  # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(error) or attempt == attempts:
                raise
            log.warning("Ray's local node did not start in time (attempt %d of %d): retrying", attempt, attempts)
            ray.shutdown()


def config_for_ray(config: LonghaulConfig) -> dict[str, Any]:
    """The run config as plain data for a Ray actor's constructor."""
    return config.model_dump(mode="json")

