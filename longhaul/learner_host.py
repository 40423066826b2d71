"""The learner as a Ray actor, so that a run places it where its resources are (a GPU node on a cluster).

`LearnerHost` owns a `Learner` in its own process: the buffer client, the model, the optimizer, the checkpoints and
the trainer side of the weight-transfer group, whose rank 0 it is (so the group's address is this node's).
`RemoteLearner` is the driver's blocking view of it, with the calls the driver loop and the actor pool make.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray

from longhaul.config import LonghaulConfig


class LearnerHost:
    """Create with `ray.remote(LearnerHost).options(num_cpus=..., num_gpus=...).remote(...)`."""

    def __init__(self, config: dict[str, Any], model_dir: str, redis_url: str):
        import torch

        from longhaul.buffer.redis_server import connect
        from longhaul.buffer.store import TrajectoryStore
        from longhaul.learner.trainer import Learner

        self.config = LonghaulConfig.model_validate(config)
        # Ray pins a worker's thread pools to its CPU reservation (OMP_NUM_THREADS); a CPU learner uses the node's
        # cores, which it shares with the engines by design on a single machine.
        if not torch.cuda.is_available():
            torch.set_num_threads(os.cpu_count() or 1)
        store = TrajectoryStore(connect(redis_url), self.config.run_name, self.config.buffer)
        self.learner = Learner(self.config, Path(model_dir), store)

    def start(self) -> dict[str, Any]:
        """Serve this process's Prometheus /metrics; returns its address and the learner's progress."""
        from prometheus_client import start_http_server

        host = self.config.train.metrics_host
        server, _ = start_http_server(0, addr=host)
        return {"metrics": f"{_advertised(host)}:{server.server_port}", "pid": os.getpid(), **self.progress()}

    def progress(self) -> dict[str, int]:
        return {"step": self.learner.step, "version": self.learner.version}

    def train_step(self, timeout_s: float) -> dict[str, Any] | None:
        return self.learner.train_step(timeout_s)

    def connect_actors(self, client, *, backend: str, engine_dtype: str, timeout_s: float) -> None:
        """Open a weight-transfer group with the engines behind `client`, rooted at this process, and send them the
        current weights."""
        import torch

        from longhaul.net import free_port

        self.learner.connect_actors(client, backend=backend, master_address=ray.util.get_node_ip_address(),
                                    master_port=free_port(""), world_size=client.world_size,
                                    engine_dtype=getattr(torch, engine_dtype), timeout_s=timeout_s)

    def disconnect_actors(self) -> None:
        self.learner.disconnect_actors()

    def finish(self) -> dict[str, int]:
        """Checkpoint what was trained since the last checkpoint; returns the final progress."""
        self.learner.finish()
        return self.progress()


class RemoteLearner:
    """The driver's blocking handle on a `LearnerHost`: what the loop, the pool and the status line need."""

    def __init__(self, config: LonghaulConfig, model_dir: Path, redis_url: str):
        import torch

        from longhaul.actors.ray_actor import config_for_ray

        gpus = config.train.learner_num_gpus
        gpus = (1 if torch.cuda.is_available() else 0) if gpus is None else gpus
        self._handle = ray.remote(LearnerHost).options(
            num_cpus=config.train.learner_num_cpus, num_gpus=gpus).remote(config_for_ray(config), str(model_dir),
                                                                            redis_url)
        info = ray.get(self._handle.start.remote())
        self.metrics_address: str = info["metrics"]
        self.step: int = info["step"]
        self.version: int = info["version"]

    def train_step(self, timeout_s: float) -> dict[str, Any] | None:
        """One step, or None if no batch came within `timeout_s`. A failed weight sync raises `WeightSyncError`
        (Ray's error for it is an instance of it)."""
        record = ray.get(self._handle.train_step.remote(timeout_s))
        if record is not None:
            self.step, self.version = record["step"], record["version"]
        return record

    def connect_actors(self, client, *, backend: str, engine_dtype: str, timeout_s: float) -> None:
        ray.get(self._handle.connect_actors.remote(client, backend=backend, engine_dtype=engine_dtype,
                                                   timeout_s=timeout_s))

    def disconnect_actors(self) -> None:
        ray.get(self._handle.disconnect_actors.remote())

    def finish(self) -> None:
        progress = ray.get(self._handle.finish.remote())
        self.step, self.version = progress["step"], progress["version"]


def _advertised(host: str) -> str:
    """The address others reach a server bound to `host` at."""
    return ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host
