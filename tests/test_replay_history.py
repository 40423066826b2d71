"""The replay history: what `commit` keeps for reuse, how often it may be reused, and when it leaves the stream.

With history rounds L and max_times_sampled M, a committed trajectory stays replayable while its round is among the
last L committed steps and it has been trained on fewer than M times (its fresh use included); then it leaves the
history and its stream entry is deleted. Nothing else is ever removed from the stream, so at every step
stream_length = undelivered + pending + history_size.
"""

from __future__ import annotations

import numpy as np
import pytest
import redis

from longhaul.buffer.rate_limiter import LimiterState
from longhaul.buffer.store import CommitResult, HistoryEntry, TrajectoryStore
from longhaul.config import HistoryConfig, RateLimiterConfig
from longhaul.synthetic import synthetic_trajectory

CONSUMER = "learner-0"


def append(store: TrajectoryStore, trajectory_id: str, seed: int = 0) -> bytes:
    return store.append(synthetic_trajectory(seed, turns=4, tokens=200, trajectory_id=trajectory_id), timeout_s=5)


def append_and_read(store: TrajectoryStore, ids: list[str]):
    entry_ids = [append(store, tid, seed) for seed, tid in enumerate(ids)]
    delivered = store.read(CONSUMER, max_count=len(ids), block_ms=0)
    assert [d.entry_id for d in delivered] == entry_ids
    return delivered


def uses(store: TrajectoryStore) -> dict[str, int]:
    return {h.trajectory_id: h.uses for h in store.history()}


def stream_ids(client: redis.Redis, store: TrajectoryStore) -> list[bytes]:
    return [eid for eid, _ in client.xrange(store.keys.stream)]


def test_commit_puts_trained_trajectories_into_the_history(make_store):
    store = make_store(history=HistoryConfig(rounds=3, max_times_sampled=3))
    delivered = append_and_read(store, ["a", "b", "c", "d"])
    assert store.commit(CONSUMER, 7, delivered) == CommitResult(4, 0, 0, False)
    assert sorted(store.history(), key=lambda h: h.trajectory_id) == [
        HistoryEntry(d.trajectory.trajectory_id, d.entry_id, uses=1, round=7) for d in delivered
    ]
    stats = store.stats()
    assert (stats.pending, stats.history_size, stats.stream_length, stats.undelivered) == (0, 4, 4, 0)
    assert stats.counters["committed"] == 4


def test_replay_returns_the_stored_trajectory(make_store):
    store = make_store(history=HistoryConfig(rounds=3, max_times_sampled=3))
    [fresh] = append_and_read(store, ["a"])
    store.commit(CONSUMER, 1, [fresh])
    [again] = store.replay(["a"])
    assert (again.entry_id, again.source, again.staleness, again.weight) == (fresh.entry_id, "replay", 0, 1.0)
    assert again.trajectory.trajectory_id == "a"
    np.testing.assert_array_equal(again.trajectory.token_ids, fresh.trajectory.token_ids)
    np.testing.assert_array_equal(again.trajectory.versions, fresh.trajectory.versions)


@pytest.mark.parametrize("max_times", [2, 3, 5])
def test_max_times_sampled_is_respected_exactly(make_store, redis_client, max_times):
    store = make_store(history=HistoryConfig(rounds=100, max_times_sampled=max_times))
    ids = ["a", "b", "c"]
    delivered = append_and_read(store, ids)
    store.commit(CONSUMER, 1, delivered)
    assert uses(store) == dict.fromkeys(ids, 1)                  # the fresh use counts as the first
    for step in range(2, max_times + 1):                          # M − 1 replays
        replays = store.replay(ids)
        assert [r.trajectory.trajectory_id for r in replays] == ids
        assert store.commit(CONSUMER, step, replays) == CommitResult(0, 0, 3, False)
        assert store.stats().counters["replayed"] == 3 * (step - 1)
        if step < max_times:
            assert uses(store) == dict.fromkeys(ids, step)
            assert stream_ids(redis_client, store) == [d.entry_id for d in delivered]
    assert store.history() == []                                  # M uses: gone from the history
    assert stream_ids(redis_client, store) == []                  # ... and from the stream
    samples = store.rate_limiter.state().samples
    assert store.replay(ids) == []                                # the M+1-th use is refused
    assert store.rate_limiter.state().samples == samples          # ... and costs no sample
    assert store.commit(CONSUMER, max_times + 1, []) == CommitResult(0, 0, 0, False)
    stats = store.stats()
    assert (stats.stream_length, stats.history_size, stats.pending) == (0, 0, 0)
    assert stats.counters["replayed"] == 3 * (max_times - 1)
    assert stats.counters["committed"] == 3


def test_replay_of_an_evicted_trajectory_commits_nothing(make_store):
    store = make_store(history=HistoryConfig(rounds=100, max_times_sampled=2))
    delivered = append_and_read(store, ["a", "b"])
    store.commit(CONSUMER, 1, delivered)
    first = store.replay(["a", "b"])
    second = store.replay(["a"])  # listed before step 2 commits: still in the history
    assert store.commit(CONSUMER, 2, first) == CommitResult(0, 0, 2, False)  # both reach M = 2 and leave
    assert store.commit(CONSUMER, 3, second) == CommitResult(0, 0, 0, False)  # the late use is not recorded
    assert store.stats().counters["replayed"] == 2


def test_rounds_older_than_l_steps_leave_history_and_stream(make_store, redis_client):
    rounds = 2
    store = make_store(history=HistoryConfig(rounds=rounds, max_times_sampled=10))
    appended: list[tuple[str, bytes]] = []
    read = 0
    expected: dict[str, tuple[int, int, bytes]] = {}  # trajectory id → (round, uses, entry id)
    for step in range(1, 7):
        # Three arrive, two are read: one entry per step stays undelivered for the next step to pick up.
        appended += [(f"s{step}-{i}", append(store, f"s{step}-{i}", seed=i)) for i in range(3)]
        fresh = store.read(CONSUMER, max_count=2, block_ms=0)
        assert [d.entry_id for d in fresh] == [eid for _, eid in appended[read:read + 2]]
        read += 2
        undelivered = [eid for _, eid in appended[read:]]

        stats = store.stats()
        assert (stats.pending, stats.history_size) == (2, len(expected))
        assert stats.stream_length == len(undelivered) + 2 + len(expected), f"step {step} before commit"

        replays = store.replay(list(expected))
        assert sorted(r.trajectory.trajectory_id for r in replays) == sorted(expected)
        assert store.commit(CONSUMER, step, fresh + replays) == CommitResult(2, 0, len(replays), False)

        expected = {tid: (r, u + 1, eid) for tid, (r, u, eid) in expected.items()}
        expected |= {d.trajectory.trajectory_id: (step, 1, d.entry_id) for d in fresh}
        expected = {tid: v for tid, v in expected.items() if v[0] > step - rounds}  # rounds (step − L, step]
        assert {h.trajectory_id: (h.round, h.uses, h.entry_id) for h in store.history()} == expected, f"step {step}"
        assert sorted(stream_ids(redis_client, store)) == sorted(undelivered + [v[2] for v in expected.values()])
        stats = store.stats()
        assert (stats.pending, stats.history_size) == (0, len(expected))
        assert stats.stream_length == len(undelivered) + 0 + len(expected), f"step {step} after commit"
        if step >= rounds:
            assert len(expected) == 2 * rounds  # the last L rounds, two trajectories each
            assert {v[1] for v in expected.values()} == {1, 2}  # fresh this step, replayed once since


def test_commit_is_idempotent_per_consumer_and_step(make_store, redis_client):
    store = make_store(history=HistoryConfig(rounds=4, max_times_sampled=3))
    delivered = append_and_read(store, ["a", "b", "c"])

    # step                                                       committed replayed uses  already
    assert store.commit(CONSUMER, 1, delivered) == CommitResult(3, 0, 0, False)
    snapshot = (store.stats(), store.history(), stream_ids(redis_client, store))
    assert store.commit(CONSUMER, 1, delivered) == CommitResult(0, 0, 0, True)    # 3  0  1  re-commit: no-op
    assert (store.stats(), store.history(), stream_ids(redis_client, store)) == snapshot
    replays = store.replay(["a", "b", "c"])
    assert store.commit(CONSUMER, 2, replays) == CommitResult(0, 0, 3, False)     # 3  3  2
    assert store.commit(CONSUMER, 2, replays) == CommitResult(0, 0, 0, True)      # 3  3  2  re-commit: no-op
    assert store.commit(CONSUMER, 1, delivered) == CommitResult(0, 0, 0, True)    # an older step: no-op too
    assert uses(store) == {"a": 2, "b": 2, "c": 2}
    counters = store.stats().counters
    assert (counters["committed"], counters["duplicates"], counters["replayed"]) == (3, 0, 3)
    # Steps are per consumer: another learner's step 1 is its own.
    assert store.commit("learner-1", 1, []) == CommitResult(0, 0, 0, False)


@pytest.mark.parametrize("history", [HistoryConfig(rounds=0, max_times_sampled=3),
                                     HistoryConfig(rounds=4, max_times_sampled=1)], ids=["rounds=0", "max_times=1"])
def test_without_history_commit_deletes_what_it_acknowledges(make_store, redis_client, history):
    store = make_store(history=history)
    delivered = append_and_read(store, ["a", "b", "c"])
    append(store, "unread", seed=9)
    assert store.commit(CONSUMER, 1, delivered) == CommitResult(3, 0, 0, False)
    assert store.history() == []
    assert store.replay(["a", "b", "c"]) == []
    stats = store.stats()
    assert (stats.stream_length, stats.pending, stats.history_size, stats.undelivered) == (1, 0, 0, 1)
    assert stats.counters["committed"] == 3
    assert len(stream_ids(redis_client, store)) == 1  # only the unread entry is left


def test_replay_charges_the_rate_limiter_per_delivery(make_store):
    store = make_store(history=HistoryConfig(rounds=4, max_times_sampled=5))
    delivered = append_and_read(store, ["a", "b", "c"])
    store.commit(CONSUMER, 1, delivered)
    assert store.rate_limiter.state() == LimiterState(3, 3)
    replays = store.replay(["a", "b", "c"])
    assert len(replays) == 3
    assert store.rate_limiter.state() == LimiterState(3, 6)
    replays = store.replay(["a", "never-trained", "c"])  # one id the history does not hold
    assert [r.trajectory.trajectory_id for r in replays] == ["a", "c"]
    assert store.rate_limiter.state() == LimiterState(3, 8)  # only what was delivered is charged


def test_replay_is_paced_by_the_rate_limiter(make_store):
    store = make_store(history=HistoryConfig(rounds=4, max_times_sampled=5),
                       rate_limiter=RateLimiterConfig(samples_per_insert=1, min_size_to_sample=1, error_buffer=1))
    # offset 1, d = inserts − samples held in [0, 2]
    delivered = append_and_read(store, ["a", "b"])        # inserts 2, samples 2: d=0
    store.commit(CONSUMER, 1, delivered)
    assert store.replay(["a", "b"]) == []                 # no room: a replay is a sample like any other
    assert store.rate_limiter.state() == LimiterState(2, 2)
    append(store, "c", seed=2)                            # d=1
    replays = store.replay(["a", "b"])
    assert [r.trajectory.trajectory_id for r in replays] == ["a"]
    assert store.rate_limiter.state() == LimiterState(3, 3)
