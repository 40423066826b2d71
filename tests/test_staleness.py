"""Bounded staleness: admission of new episodes, the monotonic policy version, and the train-time filter.

Admission (AReaL's rule): with published version v, max_staleness s and batch size B, exactly (v + s + 1) × B
episodes may ever be admitted. At train time a trajectory whose newest generated token (the policy that finished it) is
more than s versions behind the learner is dropped or down-weighted, and counted either way.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
from prometheus_client import REGISTRY

from longhaul.buffer.redis_server import EmbeddedRedis, connect
from longhaul.buffer.staleness import StalenessGate, StalenessVerdict
from longhaul.buffer.store import RunKeys, TrajectoryStore
from longhaul.config import StalenessConfig
from longhaul.synthetic import synthetic_trajectory


def admissions_counted(result: str) -> float:
    return REGISTRY.get_sample_value("longhaul_buffer_admission_total", {"result": result}) or 0.0


def stale_counted(action: str) -> float:
    return REGISTRY.get_sample_value("longhaul_buffer_stale_total", {"action": action}) or 0.0


def admit_until_rejected(gate: StalenessGate, limit: int = 10_000) -> int:
    """Admit one episode at a time until the rule says no; returns how many got in."""
    for admitted in range(limit):
        if not gate.try_admit():
            return admitted
    raise AssertionError(f"still admitting after {limit} episodes")


# ---- admission ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_staleness", "batch_size", "version"), [
    (0, 1, 0),    # synchronous RL, one episode per step
    (0, 4, 3),
    (2, 3, 0),
    (4, 16, 7),
])
def test_admits_exactly_v_plus_s_plus_one_batches(make_store, max_staleness, batch_size, version):
    store = make_store(staleness=StalenessConfig(max_staleness=max_staleness, batch_size=batch_size))
    gate = store.staleness
    if version:
        assert gate.publish_version(version) == version
    assert admit_until_rejected(gate) == (version + max_staleness + 1) * batch_size
    assert not gate.try_admit()  # and it stays shut
    counters = store.stats().counters
    assert counters["admitted"] == (version + max_staleness + 1) * batch_size
    assert counters["admission_rejected"] == 2


def test_each_published_version_opens_exactly_one_batch_and_never_reopens(make_store):
    store = make_store(staleness=StalenessConfig(max_staleness=2, batch_size=3))
    gate = store.staleness
    admitted_before, rejected_before = admissions_counted("admitted"), admissions_counted("rejected")

    # step                                                     admitted  rejected  version
    assert gate.version() == 0                                 # 0         0         0 (never published)
    assert admit_until_rejected(gate) == 9                     # 9         1         cap (0+2+1)*3 = 9
    assert gate.publish_version(1) == 1
    assert admit_until_rejected(gate) == 3                     # 12        2         cap 12
    assert gate.publish_version(3) == 3                        #                     a skipped version opens two
    assert admit_until_rejected(gate) == 6                     # 18        3         cap 18
    assert gate.publish_version(2) == 3                        #                     late publish: ignored
    assert gate.version() == 3
    assert not gate.try_admit()                                # 18        4
    assert gate.publish_version(3) == 3                        #                     replayed publish: ignored
    assert not gate.try_admit()                                # 18        5
    gate.release(2)                                            # 16                  two episodes never ran
    assert not gate.try_admit(3)                               # 16        8         all or nothing
    assert gate.try_admit(2)                                   # 18
    assert not gate.try_admit()                                # 18        9

    stats = store.stats()
    assert stats.version == 3
    assert (stats.counters["admitted"], stats.counters["admission_rejected"]) == (18, 9)
    # The Prometheus counters count episodes, admitted and rejected, in step with the hash.
    assert admissions_counted("admitted") - admitted_before == 9 + 3 + 6 + 2
    assert admissions_counted("rejected") - rejected_before == 9


def test_publish_zero_first_is_recorded(make_store):
    gate = make_store(staleness=StalenessConfig(max_staleness=1, batch_size=2)).staleness
    assert gate.publish_version(0) == 0
    assert gate.version() == 0
    assert admit_until_rejected(gate) == 4


def test_release_returns_admission_slots(make_store):
    store = make_store(staleness=StalenessConfig(max_staleness=0, batch_size=4))
    gate = store.staleness
    assert admit_until_rejected(gate) == 4
    gate.release()
    assert store.stats().counters["admitted"] == 3
    assert admit_until_rejected(gate) == 1
    gate.release(4)
    assert admit_until_rejected(gate) == 4


def test_a_dead_holders_unfinished_episodes_return_to_the_admission_window(make_store):
    store = make_store(staleness=StalenessConfig(max_staleness=0, batch_size=8))
    gate = store.staleness
    assert gate.try_admit(4, holder="actor-0")
    assert gate.try_admit(4, holder="actor-1")                 # the window of 8 is full
    for _ in range(3):                                         # actor-0 finishes 3 of its 4 episodes
        store.append(synthetic_trajectory(tokens=64, turns=2, actor_id="actor-0"))
    gate.release(1, holder="actor-1")                          # one of actor-1's episodes raised
    assert gate.holdings() == {"actor-0": 1, "actor-1": 3}

    assert gate.release_holder("actor-1") == 3                 # actor-1 died with 3 episodes in flight
    assert gate.holdings() == {"actor-0": 1}
    assert store.stats().counters["admitted"] == 4             # 3 appended + 1 still running on actor-0
    assert admit_until_rejected(gate) == 4
    assert gate.release_holder("actor-1") == 0                 # idempotent


def test_appends_without_an_admission_release_nothing(make_store):
    store = make_store(staleness=StalenessConfig(max_staleness=0, batch_size=2))
    store.append(synthetic_trajectory(tokens=64, turns=2, actor_id="writer"))  # e.g. a tool writing trajectories
    assert store.staleness.release_holder("writer") == 0
    assert admit_until_rejected(store.staleness) == 2


def test_concurrent_admission_never_over_admits(redis_server: EmbeddedRedis, redis_client: redis.Redis,
                                                make_store):
    config = StalenessConfig(max_staleness=1, batch_size=5)
    store = make_store(staleness=config)
    final_version = 4
    cap = (final_version + config.max_staleness + 1) * config.batch_size  # 30
    stop = threading.Event()
    admitted, rejected, errors = [0] * 12, [0] * 12, []
    over: list[tuple[int, int]] = []

    def actor(index: int) -> None:
        client = connect(redis_server.url)
        gate = StalenessGate(client, store.keys.version, store.keys.counters, store.keys.holdings, config)
        try:
            while not stop.is_set():
                if gate.try_admit():
                    admitted[index] += 1
                else:
                    rejected[index] += 1
                    time.sleep(0.001)
        except BaseException as error:
            errors.append(error)
        finally:
            client.close()

    def monitor() -> None:
        while not stop.is_set():
            pipe = redis_client.pipeline(transaction=True)  # both read at one instant
            pipe.hget(store.keys.counters, "admitted")
            pipe.get(store.keys.version)
            count, version = (int(v or 0) for v in pipe.execute())
            if count > (version + config.max_staleness + 1) * config.batch_size:
                over.append((count, version))

    threads = [threading.Thread(target=actor, args=(i,), daemon=True) for i in range(12)]
    threads.append(threading.Thread(target=monitor, daemon=True))
    for thread in threads:
        thread.start()
    for version in range(1, final_version + 1):
        time.sleep(0.1)
        store.staleness.publish_version(version)
    deadline = time.monotonic() + 10
    while sum(admitted) < cap and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # every actor keeps knocking on a full gate for a while
    stop.set()
    for thread in threads:
        thread.join(5.0)
    assert [t.name for t in threads if t.is_alive()] == []
    assert errors == []
    assert over == []
    counters = store.stats().counters
    assert sum(admitted) == counters["admitted"] == cap
    assert sum(rejected) == counters["admission_rejected"] > 0


# ---- judge ----------------------------------------------------------------------------------------------------

S = 2  # max_staleness of the judge tables


@pytest.mark.parametrize(("newest", "learner", "drop", "downweight"), [
    # newest version, learner version → verdict under policy drop, under policy downweight (weight 0.25)
    (5, 5, StalenessVerdict(0, "train", 1.0), StalenessVerdict(0, "train", 1.0)),
    (5, 6, StalenessVerdict(1, "train", 1.0), StalenessVerdict(1, "train", 1.0)),
    (5, 7, StalenessVerdict(2, "train", 1.0), StalenessVerdict(2, "train", 1.0)),         # exactly s: trained
    (5, 8, StalenessVerdict(3, "drop", 0.0), StalenessVerdict(3, "downweight", 0.25)),    # s + 1
    (0, 100, StalenessVerdict(100, "drop", 0.0), StalenessVerdict(100, "downweight", 0.25)),
    (9, 7, StalenessVerdict(0, "train", 1.0), StalenessVerdict(0, "train", 1.0)),         # newer than the learner
    (-1, 100, StalenessVerdict(0, "train", 1.0), StalenessVerdict(0, "train", 1.0)),      # generated no token
])
def test_judge_measures_staleness_from_the_newest_version(redis_client, run_name, newest, learner, drop,
                                                          downweight):
    for policy, expected in (("drop", drop), ("downweight", downweight)):
        keys = RunKeys(run_name)
        gate = StalenessGate(redis_client, keys.version, keys.counters, keys.holdings,
                             StalenessConfig(max_staleness=S, policy=policy, downweight=0.25))
        assert gate.judge(newest, learner) == expected, policy


def test_judge_with_zero_staleness_trains_only_the_current_version(redis_client, run_name):
    keys = RunKeys(run_name)
    gate = StalenessGate(redis_client, keys.version, keys.counters, keys.holdings,
                         StalenessConfig(max_staleness=0, policy="downweight", downweight=1.0))
    assert gate.judge(4, 4) == StalenessVerdict(0, "train", 1.0)
    assert gate.judge(4, 5) == StalenessVerdict(1, "downweight", 1.0)  # full weight, but still counted as stale


# ---- the train-time filter through the store ------------------------------------------------------------------

LEARNER_VERSION = 6


def append_generations(store: TrajectoryStore) -> dict[str, int]:
    """Append trajectories generated at versions 2..8 (their tokens' versions 0..6); returns id → newest version."""
    newest = {}
    for version in range(2, 9):
        trajectory = synthetic_trajectory(version, turns=4, tokens=200, version=version,
                                          trajectory_id=f"gen-{version}")
        newest[trajectory.trajectory_id] = trajectory.newest_version()
        store.append(trajectory, timeout_s=5)
    assert sorted(newest.values()) == list(range(7))  # the factory's drift: version − 2 for short episodes
    return newest


def test_drop_policy_acknowledges_deletes_and_counts_over_stale_trajectories(make_store, redis_client):
    store = make_store(staleness=StalenessConfig(max_staleness=2, policy="drop"))
    newest = append_generations(store)
    store.staleness.publish_version(LEARNER_VERSION)
    dropped_before = stale_counted("drop")

    delivered = store.read("learner-0", max_count=100, block_ms=0)

    fresh_enough = [tid for tid, v in newest.items() if LEARNER_VERSION - v <= 2]
    assert fresh_enough == ["gen-6", "gen-7", "gen-8"]  # versions 4, 5, 6: staleness 2, 1, 0
    assert [d.trajectory.trajectory_id for d in delivered] == fresh_enough
    assert [(d.staleness, d.weight, d.source) for d in delivered] == [(2, 1.0, "new"), (1, 1.0, "new"),
                                                                      (0, 1.0, "new")]
    stats = store.stats()
    assert stats.pending == 3                     # the four dropped ones were acknowledged on the spot
    assert stats.stream_length == 3               # ... and deleted: only the delivered, pending ones remain
    assert [eid for eid, _ in redis_client.xrange(store.keys.stream)] == [d.entry_id for d in delivered]
    assert stats.counters["stale_drop"] == 4
    assert "stale_downweight" not in stats.counters
    assert stale_counted("drop") - dropped_before == 4
    assert store.rate_limiter.state().samples == 3  # a dropped trajectory is not a training use


def test_downweight_policy_delivers_over_stale_trajectories_with_the_configured_weight(make_store):
    store = make_store(staleness=StalenessConfig(max_staleness=2, policy="downweight", downweight=0.25))
    newest = append_generations(store)
    store.staleness.publish_version(LEARNER_VERSION)
    downweighted_before = stale_counted("downweight")

    delivered = store.read("learner-0", max_count=100, block_ms=0)

    assert [d.trajectory.trajectory_id for d in delivered] == list(newest)
    expected = [(LEARNER_VERSION - v, 1.0 if LEARNER_VERSION - v <= 2 else 0.25) for v in newest.values()]
    assert [(d.staleness, d.weight) for d in delivered] == expected
    assert expected == [(6, 0.25), (5, 0.25), (4, 0.25), (3, 0.25), (2, 1.0), (1, 1.0), (0, 1.0)]
    stats = store.stats()
    assert (stats.pending, stats.stream_length) == (7, 7)
    assert stats.counters["stale_downweight"] == 4
    assert "stale_drop" not in stats.counters
    assert stale_counted("downweight") - downweighted_before == 4


def test_a_long_episode_is_as_old_as_the_policy_that_finished_it_not_the_one_that_started_it(make_store):
    store = make_store(staleness=StalenessConfig(max_staleness=2, policy="drop"))
    # 44 turns generated across two weight updates: tokens of versions 10, 11 and 12.
    store.append(synthetic_trajectory(0, turns=44, tokens=33_000, version=12, trajectory_id="long"), timeout_s=5)
    store.staleness.publish_version(14)  # 4 versions after its first token, 2 after its last
    [long] = store.read("learner-0", max_count=10, block_ms=0)
    assert (long.trajectory.oldest_version(), long.trajectory.newest_version()) == (10, 12)
    assert (long.staleness, long.weight) == (2, 1.0)
    store.append(synthetic_trajectory(1, turns=44, tokens=33_000, version=12, trajectory_id="later"), timeout_s=5)
    store.staleness.publish_version(15)
    assert store.read("learner-0", max_count=10, block_ms=0) == []
    assert store.stats().counters["stale_drop"] == 1


def test_filter_uses_the_version_published_at_read_time(make_store):
    store = make_store(staleness=StalenessConfig(max_staleness=1, policy="drop"))
    store.append(synthetic_trajectory(0, turns=4, tokens=200, version=5, trajectory_id="early"), timeout_s=5)
    store.staleness.publish_version(4)  # its tokens' version 3: staleness 1, trainable
    [early] = store.read("learner-0", max_count=10, block_ms=0)
    assert (early.trajectory.trajectory_id, early.staleness, early.weight) == ("early", 1, 1.0)
    store.append(synthetic_trajectory(1, turns=4, tokens=200, version=5, trajectory_id="late"), timeout_s=5)
    store.staleness.publish_version(5)  # the same generation is now 2 versions behind
    assert store.read("learner-0", max_count=10, block_ms=0) == []
    stats = store.stats()
    assert stats.counters["stale_drop"] == 1
    assert (stats.pending, stats.stream_length) == (1, 1)  # only "early", still pending


def test_staleness_is_measured_against_the_version_the_learner_trains_not_the_published_one(make_store):
    """While a weight sync is in flight the learner is ahead of what the actors have (the published version)."""
    store = make_store(staleness=StalenessConfig(max_staleness=2, policy="drop"))
    store.staleness.publish_version(4)                  # actors generate with version 4...
    trajectory = synthetic_trajectory(1, turns=4, tokens=200, version=4)
    newest = trajectory.newest_version()
    store.append(trajectory)
    # ...but the learner has already stepped to newest + 3: one version past max_staleness.
    assert store.read("learner", 1, block_ms=100, learner_version=newest + 3) == []
    assert store.stats().counters["stale_drop"] == 1
    store.append(synthetic_trajectory(2, turns=4, tokens=200, version=4))
    [delivery] = store.read("learner", 1, block_ms=100)  # no learner version given: the published one, 4
    assert delivery.staleness == 4 - delivery.trajectory.newest_version()
