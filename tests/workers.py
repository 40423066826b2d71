"""Process entry points for multi-process tests: real producer and consumer processes talking to a real Redis.

Each writes what Redis acknowledged (appends) or what it trained on (commits) to a log file, one id per line, flushed
line by line, so the test can account for every trajectory even after the process is SIGKILLed."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from longhaul.buffer.redis_server import connect
from longhaul.buffer.store import TrajectoryStore
from longhaul.config import BufferConfig
from longhaul.synthetic import synthetic_trajectory


def produce(url: str, run: str, config: BufferConfig, producer: int, count: int, log: Path) -> None:
    """Append `count` small trajectories; log each trajectory_id once its append is acknowledged. Stops at the first
    Redis error (the server was killed), which is what the durability test wants."""
    store = TrajectoryStore(connect(url), run, config)
    with open(log, "a", buffering=1) as out:
        for i in range(count):
            trajectory_id = f"p{producer}-{i}"
            try:
                store.append(synthetic_trajectory(producer * 100_000 + i, turns=4, tokens=256,
                                                  trajectory_id=trajectory_id))
            except redis.ConnectionError:
                return
            out.write(trajectory_id + "\n")


def consume(url: str, run: str, config: BufferConfig, consumer: int, expected: int, log: Path,
            deadline_s: float = 120.0) -> None:
    """Read, 'train' (log the ids), commit, until the run's committed counter reaches `expected`."""
    store = TrajectoryStore(connect(url), run, config)
    step = 0
    with open(log, "a", buffering=1) as out:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            deliveries = store.read(f"c{consumer}", 8, block_ms=100)
            deliveries += store.reclaim(f"c{consumer}", 8)
            if deliveries:
                step += 1
                for delivery in deliveries:
                    out.write(delivery.trajectory.trajectory_id + "\n")
                store.commit(f"c{consumer}", step, deliveries)
            elif store.stats().counters.get("committed", 0) >= expected:
                return


def read_and_hang(url: str, run: str, config: BufferConfig, consumer: str, count: int, log: Path) -> None:
    """Read `count` entries, log them as 'in training', then hang before committing (the test SIGKILLs us)."""
    store = TrajectoryStore(connect(url), run, config)
    deliveries = store.read(consumer, count, block_ms=5000)
    with open(log, "w") as out:
        out.write("".join(d.trajectory.trajectory_id + "\n" for d in deliveries))
    time.sleep(3600)
