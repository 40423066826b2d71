"""Many producer and consumer processes on one run at once: every trajectory is trained on exactly once."""

from __future__ import annotations

import multiprocessing
from collections import Counter

import pytest

from longhaul.buffer.redis_server import connect
from longhaul.buffer.store import TrajectoryStore
from longhaul.config import BufferConfig, HistoryConfig
from tests import workers

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")


def test_counts_add_up_across_four_producers_and_three_consumers(redis_server, run_name, tmp_path):
    producers, per_producer, consumers = 4, 60, 3
    expected = producers * per_producer
    config = BufferConfig(claim_idle_ms=5_000, history=HistoryConfig(rounds=0))
    TrajectoryStore(connect(redis_server.url), run_name, config)  # the group exists before anyone reads

    produced = [tmp_path / f"produced{p}.log" for p in range(producers)]
    trained = [tmp_path / f"trained{c}.log" for c in range(consumers)]
    processes = [
        SPAWN.Process(target=workers.consume, args=(redis_server.url, run_name, config, c, expected, trained[c]))
        for c in range(consumers)
    ] + [
        SPAWN.Process(target=workers.produce, args=(redis_server.url, run_name, config, p, per_producer, produced[p]))
        for p in range(producers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
        assert process.exitcode == 0

    appended = [line for log in produced for line in log.read_text().splitlines()]
    per_consumer = [log.read_text().splitlines() if log.exists() else [] for log in trained]
    counts = Counter(line for lines in per_consumer for line in lines)
    assert len(appended) == expected
    assert sorted(counts) == sorted(appended)
    assert set(counts.values()) == {1}
    stats = TrajectoryStore(connect(redis_server.url), run_name, config).stats()
    assert stats.counters["committed"] == expected
    assert (stats.pending, stats.stream_length, stats.dead_letters) == (0, 0, 0)
    assert sum(1 for lines in per_consumer if lines) >= 2, "the load should actually be shared"
