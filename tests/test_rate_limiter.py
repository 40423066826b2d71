"""The samples-per-insert rate limiter: Reverb's SampleToInsertRatio kept in a Redis hash.

With offset = spi × min_size_to_sample and d = inserts × spi − samples, the limiter promises:
- no sample before `min_size_to_sample` inserts;
- from then on min_diff = offset − error_buffer ≤ d ≤ max_diff = offset + error_buffer;
- each side is granted whatever keeps that window, and a blocked call waits up to its timeout, then raises.
Each test pins one of those behaviours against a real redis-server.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pydantic import ValidationError

from longhaul.buffer.rate_limiter import LimiterState, RateLimiter, RateLimiterTimeout
from longhaul.buffer.redis_server import EmbeddedRedis, connect
from longhaul.config import BufferConfig, HistoryConfig, RateLimiterConfig, StalenessConfig
from longhaul.synthetic import synthetic_trajectory

# "Still blocked" is asserted with a short wait, "unblocked" with a long one: a slow machine can only make the
# first pass more easily and the second take longer, never flip either result.
STILL_BLOCKED_S = 0.2
UNBLOCKED_S = 10.0
PAYLOAD = {"t": b"x"}


@pytest.fixture
def keys(run_name: str) -> tuple[str, str]:
    """(limiter hash, stream) in the test's own run namespace."""
    return f"longhaul:{{{run_name}}}:limiter", f"longhaul:{{{run_name}}}:stream"


@pytest.fixture
def make_limiter(redis_client: redis.Redis, keys: tuple[str, str]) -> Callable[..., RateLimiter]:
    def make(**config) -> RateLimiter:
        return RateLimiter(redis_client, keys[0], keys[1], RateLimiterConfig(**config))

    return make


def diff(limiter: RateLimiter, state: LimiterState | None = None) -> float:
    state = state or limiter.state()
    return state.inserts * limiter.config.samples_per_insert - state.samples


def timeouts_counted(side: str) -> float:
    return REGISTRY.get_sample_value("longhaul_buffer_rate_limiter_timeouts_total", {"side": side}) or 0.0


class Blocked:
    """A limiter call running in a thread, so the test can watch it block and unblock."""

    def __init__(self, call: Callable[[], object]):
        self.result: object = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self.result = call()
        except BaseException as error:  # handed to the test thread, which re-raises it
            self.error = error

    def still_blocked(self) -> bool:
        self._thread.join(STILL_BLOCKED_S)
        return self._thread.is_alive()

    def unblocked(self) -> bool:
        self._thread.join(UNBLOCKED_S)
        if self.error is not None:
            raise self.error
        return not self._thread.is_alive()


# ---- stepwise state tables ------------------------------------------------------------------------------------

# (operation, what the limiter answers, inserts after, samples after). "insert" answers True/False (allowed or not),
# ("sample", wanted) answers the number of samples granted.
SPI_2_MIN_3_BUFFER_3 = [  # offset 6, d held in [3, 9] once inserts >= 3
    (("sample", 1), 0, 0, 0),     # nothing inserted yet
    ("insert", True, 1, 0),       # d=2: the first min_size inserts are always allowed
    ("insert", True, 2, 0),       # d=4
    (("sample", 1), 0, 2, 0),     # still below min_size
    ("insert", True, 3, 0),       # d=6=offset
    (("sample", 10), 3, 3, 3),    # grants only down to min_diff: d=3
    (("sample", 1), 0, 3, 3),     # d would be 2 < 3
    ("insert", True, 4, 3),       # d=5
    ("insert", True, 5, 3),       # d=7
    ("insert", True, 6, 3),       # d=9=max_diff: allowed, the bound is inclusive
    ("insert", False, 6, 3),      # d would be 11 > 9
    (("sample", 2), 2, 6, 5),     # d=7
    ("insert", True, 7, 5),       # d=9
    ("insert", False, 7, 5),      # d would be 11
    (("sample", 100), 6, 7, 11),  # d=3=min_diff
    (("sample", 1), 0, 7, 11),
    ("insert", True, 8, 11),      # d=5
]

SPI_HALF_MIN_2_BUFFER_1 = [  # offset 1, d held in [0, 2]: two inserts pay for one sample
    ("insert", True, 1, 0),       # d=0.5
    (("sample", 1), 0, 1, 0),     # below min_size
    ("insert", True, 2, 0),       # d=1
    (("sample", 5), 1, 2, 1),     # d=0=min_diff
    (("sample", 1), 0, 2, 1),
    ("insert", True, 3, 1),       # d=0.5: half a sample is not a sample
    (("sample", 1), 0, 3, 1),
    ("insert", True, 4, 1),       # d=1
    ("insert", True, 5, 1),       # d=1.5
    ("insert", True, 6, 1),       # d=2=max_diff
    ("insert", False, 6, 1),      # d would be 2.5
    (("sample", 5), 2, 6, 3),     # d=0
    ("insert", True, 7, 3),       # d=0.5
]


@pytest.mark.parametrize(("config", "table"), [
    pytest.param(dict(samples_per_insert=2, min_size_to_sample=3, error_buffer=3), SPI_2_MIN_3_BUFFER_3,
                 id="spi2-min3-buffer3"),
    pytest.param(dict(samples_per_insert=0.5, min_size_to_sample=2, error_buffer=1), SPI_HALF_MIN_2_BUFFER_1,
                 id="spi0.5-min2-buffer1"),
])
def test_steps_through_the_ratio_window(make_limiter, keys, config, table):
    limiter = make_limiter(**config)
    for step, (op, expected, inserts, samples) in enumerate(table):
        answer = limiter.try_insert(PAYLOAD) is not None if op == "insert" else limiter.try_sample(op[1])
        assert (answer, limiter.state()) == (expected, LimiterState(inserts, samples)), f"step {step}: {op}"


def test_insert_appends_to_the_stream_only_when_allowed(make_limiter, redis_client, keys):
    limiter = make_limiter(samples_per_insert=1, min_size_to_sample=1, error_buffer=1)  # d in [0, 2]
    first = limiter.try_insert({"t": b"a"})
    second = limiter.try_insert({"t": b"b"})
    assert limiter.try_insert({"t": b"c"}) is None  # d would be 3
    assert [(eid, f) for eid, f in redis_client.xrange(keys[1])] == [(first, {b"t": b"a"}), (second, {b"t": b"b"})]
    assert limiter.state() == LimiterState(2, 0)


def test_try_sample_rejects_a_non_positive_request(make_limiter):
    limiter = make_limiter()
    with pytest.raises(ValueError, match="wanted must be >= 1"):
        limiter.try_sample(0)


# ---- blocking and unblocking ----------------------------------------------------------------------------------


def test_blocks_samples_until_min_size_reached(make_limiter, keys):
    limiter = make_limiter(samples_per_insert=1, min_size_to_sample=3, error_buffer=10)
    for inserts in range(3):
        with pytest.raises(RateLimiterTimeout):
            limiter.sample(1, timeout_s=0.05)
        assert limiter.state() == LimiterState(inserts, 0)
        if inserts < 2:
            limiter.insert(PAYLOAD, timeout_s=0)
    sampler = Blocked(lambda: limiter.sample(5, timeout_s=UNBLOCKED_S))
    assert sampler.still_blocked()  # 2 inserts, min_size 3
    limiter.insert(PAYLOAD, timeout_s=0)  # the min_size-th insert
    assert sampler.unblocked()
    assert sampler.result == 5  # d was 3 (offset 3), min_diff -7: all five granted
    assert limiter.state() == LimiterState(3, 5)


def test_blocks_sample_with_no_timeout_until_an_insert(make_limiter, keys):
    limiter = make_limiter(samples_per_insert=1, min_size_to_sample=1, error_buffer=1)
    sampler = Blocked(lambda: limiter.sample(3, timeout_s=None))
    assert sampler.still_blocked()
    limiter.insert(PAYLOAD, timeout_s=0)  # d=1, min_diff 0: one sample
    assert sampler.unblocked()
    assert (sampler.result, limiter.state()) == (1, LimiterState(1, 1))


def test_blocks_inserts_when_ahead_of_samples(make_limiter, redis_client, keys):
    limiter = make_limiter(samples_per_insert=1, min_size_to_sample=2, error_buffer=2)  # offset 2, d in [0, 4]
    for _ in range(4):
        limiter.insert(PAYLOAD, timeout_s=0)
    assert diff(limiter) == 4  # at max_diff
    with pytest.raises(RateLimiterTimeout):
        limiter.insert(PAYLOAD, timeout_s=0.05)
    inserter = Blocked(lambda: limiter.insert(PAYLOAD, timeout_s=UNBLOCKED_S))
    assert inserter.still_blocked()
    assert redis_client.xlen(keys[1]) == 4  # the blocked insert appended nothing
    assert limiter.try_sample(1) == 1  # d=3: room for one insert
    assert inserter.unblocked()
    assert isinstance(inserter.result, bytes)
    assert limiter.state() == LimiterState(5, 1)
    assert redis_client.xlen(keys[1]) == 5


def test_blocks_store_appends_until_the_learner_reads(make_store):
    store = make_store(rate_limiter=RateLimiterConfig(samples_per_insert=1, min_size_to_sample=2, error_buffer=1))
    # offset 2, d in [1, 3]
    assert store.read("learner-0", max_count=4, block_ms=50) == []  # below min_size: read waits, then gives nothing
    for seed in range(3):
        store.append(synthetic_trajectory(seed, turns=4, tokens=200), timeout_s=0)
    with pytest.raises(RateLimiterTimeout, match="blocked insert"):
        store.append(synthetic_trajectory(3, turns=4, tokens=200), timeout_s=0.05)
    assert store.stats().stream_length == 3  # the refused trajectory never reached the stream
    appender = Blocked(lambda: store.append(synthetic_trajectory(4, turns=4, tokens=200), timeout_s=UNBLOCKED_S))
    assert appender.still_blocked()
    delivered = store.read("learner-0", max_count=4, block_ms=0)
    assert [d.trajectory.trajectory_id for d in delivered] == ["traj-0", "traj-1"]  # d=3 → 1 = min_diff
    assert appender.unblocked()
    assert store.rate_limiter.state() == LimiterState(4, 2)


def test_store_read_charges_only_what_it_delivers(make_store):
    store = make_store(rate_limiter=RateLimiterConfig(samples_per_insert=2, min_size_to_sample=1, error_buffer=10))
    for seed in range(2):
        store.append(synthetic_trajectory(seed, turns=4, tokens=200), timeout_s=0)
    delivered = store.read("learner-0", max_count=10, block_ms=0)  # 10 granted, 2 entries in the stream
    assert len(delivered) == 2
    assert store.rate_limiter.state() == LimiterState(2, 2)


# ---- timeouts -------------------------------------------------------------------------------------------------


def test_sample_timeout_fires_on_time_and_names_side_and_counters(make_limiter, keys):
    limiter = make_limiter(samples_per_insert=1, min_size_to_sample=2, error_buffer=3)
    limiter.insert(PAYLOAD, timeout_s=0)
    before = timeouts_counted("sample")
    start = time.monotonic()
    with pytest.raises(RateLimiterTimeout) as raised:
        limiter.sample(1, timeout_s=0.3)
    waited = time.monotonic() - start
    assert 0.3 <= waited < 0.3 + 2.0
    message = str(raised.value)
    assert "blocked sample for 0.3s" in message
    assert "inserts=1 samples=0" in message
    assert "min_size_to_sample=2" in message
    assert "Actors are not inserting" in message
    assert timeouts_counted("sample") == before + 1


def test_insert_timeout_fires_on_time_and_names_side_and_counters(make_limiter, keys):
    limiter = make_limiter(samples_per_insert=1, min_size_to_sample=1, error_buffer=1)  # d in [0, 2]
    limiter.insert(PAYLOAD, timeout_s=0)
    limiter.insert(PAYLOAD, timeout_s=0)
    limiter.try_sample(1)
    limiter.insert(PAYLOAD, timeout_s=0)  # inserts=3 samples=1, d=2
    before = timeouts_counted("insert")
    start = time.monotonic()
    with pytest.raises(RateLimiterTimeout) as raised:
        limiter.insert(PAYLOAD, timeout_s=0.3)
    waited = time.monotonic() - start
    assert 0.3 <= waited < 0.3 + 2.0
    message = str(raised.value)
    assert "blocked insert for 0.3s" in message
    assert "inserts=3 samples=1" in message
    assert "allowed d in [0.0, 2.0]" in message
    assert "The learner is not sampling" in message
    assert timeouts_counted("insert") == before + 1


def test_zero_timeout_tries_once_and_raises(make_limiter):
    limiter = make_limiter(min_size_to_sample=1)
    start = time.monotonic()
    with pytest.raises(RateLimiterTimeout):
        limiter.sample(1, timeout_s=0)
    assert time.monotonic() - start < 1.0


# ---- return_samples -------------------------------------------------------------------------------------------


def test_return_samples_gives_back_granted_but_unused_samples(make_limiter, keys):
    limiter = make_limiter(samples_per_insert=1, min_size_to_sample=1, error_buffer=3)  # offset 1, d in [-2, 4]
    limiter.insert(PAYLOAD, timeout_s=0)
    assert limiter.try_sample(10) == 3                     # d: 1 → -2
    assert limiter.try_sample(1) == 0
    assert limiter.return_samples(2) == 2                  # two of the three went unused: d=0
    assert limiter.state() == LimiterState(1, 1)
    assert limiter.try_sample(10) == 2                     # what was returned can be granted again
    assert limiter.return_samples(0) == 0                  # nothing to return: no change
    assert limiter.state() == LimiterState(1, 3)


def test_return_samples_never_pushes_d_above_max_diff(make_limiter, keys):
    """An insert may use the room a grant opened; returning that grant afterwards must not overfill the window.

    This is the interleaving `TrajectoryStore.read` produces when an actor appends between the grant and the
    XREADGROUP that comes back with fewer entries than granted."""
    limiter = make_limiter(samples_per_insert=1, min_size_to_sample=1, error_buffer=1)  # offset 1, d in [0, 2]
    limiter.insert(PAYLOAD, timeout_s=0)          # d=1
    limiter.insert(PAYLOAD, timeout_s=0)          # d=2=max_diff
    assert limiter.try_sample(1) == 1                      # d=1 (a reader is granted one sample)
    limiter.insert(PAYLOAD, timeout_s=0)          # d=2 (an actor takes the room)
    assert limiter.return_samples(1) == 0                  # the reader found nothing: the room is gone, d=2
    assert limiter.state() == LimiterState(3, 1)


# ---- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spi", "narrowest"), [(0.5, 0.75), (1, 1.0), (2, 1.5), (7, 4.0)])
def test_config_rejects_an_error_buffer_that_would_deadlock(spi, narrowest):
    RateLimiterConfig(samples_per_insert=spi, error_buffer=narrowest)  # the narrowest window that still moves
    with pytest.raises(ValidationError) as raised:
        RateLimiterConfig(samples_per_insert=spi, error_buffer=narrowest * 0.99)
    message = str(raised.value)
    assert f"(samples_per_insert + 1) / 2 = {narrowest}" in message
    assert "deadlocks inserts and samples together" in message


def test_config_error_buffer_is_checked_inside_a_buffer_config():
    with pytest.raises(ValidationError, match="deadlock"):
        BufferConfig.model_validate({"rate_limiter": {"samples_per_insert": 3, "error_buffer": 1}})


def test_too_narrow_window_deadlocks_which_is_why_config_rejects_it(redis_client, keys):
    """The rejected config, built anyway: one insert lands d where neither side may move."""
    narrow = RateLimiterConfig.model_construct(samples_per_insert=1.5, min_size_to_sample=1, error_buffer=0.9)
    limiter = RateLimiter(redis_client, keys[0], keys[1], narrow)   # offset 1.5, d in [0.6, 2.4]
    limiter.insert(PAYLOAD, timeout_s=0)          # d=1.5
    assert limiter.try_insert(PAYLOAD) is None    # d would be 3.0
    assert limiter.try_sample(1) == 0                      # d would be 0.5
    with pytest.raises(ValidationError):
        RateLimiterConfig(samples_per_insert=1.5, min_size_to_sample=1, error_buffer=0.9)


# ---- properties over operation sequences (single caller) ------------------------------------------------------

# Dyadic ratios and buffers keep every d exact in binary floating point, in Python and in Lua alike.
SPIS = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
OPS = st.lists(st.one_of(st.just(0), st.integers(1, 6)), min_size=1, max_size=60)  # 0: insert, n: sample(n)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spi=SPIS, min_size=st.integers(1, 5), slack=st.integers(0, 8), ops=OPS)
def test_every_decision_is_the_greediest_one_that_keeps_the_window(redis_server, spi, min_size, slack, ops):
    client = connect(redis_server.url)
    try:
        config = RateLimiterConfig(samples_per_insert=spi, min_size_to_sample=min_size,
                                   error_buffer=(spi + 1) / 2 + slack / 4)
        key = f"longhaul:{{prop-{uuid.uuid4().hex[:12]}}}:limiter"
        stream = key.replace(":limiter", ":stream")
        limiter = RateLimiter(client, key, stream, config)
        state = LimiterState(0, 0)
        for op in ops:
            d = diff(limiter, state)
            if op == 0:
                allowed = limiter.try_insert(PAYLOAD) is not None
                # Allowed exactly when below min_size, or when the insert keeps d <= max_diff.
                assert allowed == (state.inserts < min_size or d + spi <= limiter.max_diff)
                expected = LimiterState(state.inserts + allowed, state.samples)
            else:
                granted = limiter.try_sample(op)
                room = 0 if state.inserts < min_size else max(0, math.floor(d - limiter.min_diff))
                # As many as asked, or as many as keep d >= min_diff, whichever is fewer.
                assert granted == min(op, room)
                expected = LimiterState(state.inserts, state.samples + granted)
            state = limiter.state()
            assert state == expected
            if state.inserts >= min_size:
                assert limiter.min_diff <= diff(limiter, state) <= limiter.max_diff
            else:
                assert state.samples == 0
            # The window is wide enough that some side can always move: no deadlock is reachable.
            assert (state.inserts < min_size or diff(limiter, state) + spi <= limiter.max_diff
                    or diff(limiter, state) - 1 >= limiter.min_diff)
        client.delete(limiter.key, stream)
    finally:
        client.close()


# ---- random interleavings of many threads ---------------------------------------------------------------------


@dataclass
class Tally:
    inserts: int = 0
    insert_timeouts: int = 0
    granted: int = 0
    returned: int = 0
    sample_timeouts: int = 0
    early_timeouts: list[tuple[str, float, float]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _inserter(url: str, config: RateLimiterConfig, key: str, stream: str, rng: random.Random,
              stop: threading.Event, tally: Tally) -> None:
    client = connect(url)
    limiter = RateLimiter(client, key, stream, config)
    try:
        while not stop.is_set():
            time.sleep(rng.uniform(0, 0.004))
            timeout = rng.choice([0.0, 0.005, 0.02, 0.1])
            start = time.monotonic()
            try:
                limiter.insert(PAYLOAD, timeout_s=timeout)
                with tally.lock:
                    tally.inserts += 1
            except RateLimiterTimeout:
                waited = time.monotonic() - start
                with tally.lock:
                    tally.insert_timeouts += 1
                    if waited < timeout:
                        tally.early_timeouts.append(("insert", timeout, waited))
    except BaseException as error:
        tally.errors.append(error)
    finally:
        client.close()


def _sampler(url: str, config: RateLimiterConfig, key: str, stream: str, rng: random.Random,
             stop: threading.Event, tally: Tally, returns: bool) -> None:
    client = connect(url)
    limiter = RateLimiter(client, key, stream, config)
    try:
        while not stop.is_set():
            time.sleep(rng.uniform(0, 0.004))
            timeout = rng.choice([0.0, 0.005, 0.02, 0.1])
            start = time.monotonic()
            try:
                granted = limiter.sample(rng.randint(1, 4), timeout_s=timeout)
            except RateLimiterTimeout:
                waited = time.monotonic() - start
                with tally.lock:
                    tally.sample_timeouts += 1
                    if waited < timeout:
                        tally.early_timeouts.append(("sample", timeout, waited))
                continue
            unused = rng.randint(0, granted) if returns else 0
            given_back = 0
            if unused:
                time.sleep(rng.uniform(0, 0.002))  # the read that finds fewer entries than granted
                # The limiter refuses the part of a return that would push d above max_diff; count what it took.
                given_back = limiter.return_samples(unused)
            with tally.lock:
                tally.granted += granted
                tally.returned += given_back
    except BaseException as error:
        tally.errors.append(error)
    finally:
        client.close()


def _monitor(limiter: RateLimiter, stop: threading.Event, violations: list[tuple[LimiterState, str]],
             observed: list[int]) -> None:
    min_size = limiter.config.min_size_to_sample
    while not stop.is_set():
        state = limiter.state()  # one HMGET: both counters from the same instant
        observed[0] += 1
        if state.inserts < min_size:
            if state.samples != 0:
                violations.append((state, "sampled before min_size"))
        elif not limiter.min_diff <= diff(limiter, state) <= limiter.max_diff:
            violations.append((state, f"d={diff(limiter, state)} outside [{limiter.min_diff}, {limiter.max_diff}]"))


INTERLEAVING_SEEDS = {"1.0": 1, "2.0": 2, "0.5": 3}
INTERLEAVING_CONFIGS = [
    pytest.param(dict(samples_per_insert=1, min_size_to_sample=4, error_buffer=2), id="spi1"),
    pytest.param(dict(samples_per_insert=2, min_size_to_sample=3, error_buffer=1.5), id="spi2-narrowest"),
    pytest.param(dict(samples_per_insert=0.5, min_size_to_sample=6, error_buffer=2.5), id="spi0.5"),
]


@pytest.mark.parametrize("returns", [False, True], ids=["no-returns", "with-returns"])
@pytest.mark.parametrize("config", INTERLEAVING_CONFIGS)
def test_many_threads_keep_the_counter_in_bounds(redis_server: EmbeddedRedis, redis_client, keys, config, returns):
    config = RateLimiterConfig(**config)
    seed = 1000 * INTERLEAVING_SEEDS[str(config.samples_per_insert)] + 500 * returns  # fixed per case
    stop, halt_monitor = threading.Event(), threading.Event()
    tally = Tally()
    violations: list[tuple[LimiterState, str]] = []
    observed = [0]
    limiter = RateLimiter(redis_client, keys[0], keys[1], config)
    workers = [
        threading.Thread(target=_inserter, args=(redis_server.url, config, *keys, random.Random(seed + i), stop,
                                                 tally), daemon=True)
        for i in range(8)
    ] + [
        threading.Thread(target=_sampler, args=(redis_server.url, config, keys[0], keys[1],
                                                random.Random(seed + 100 + i), stop, tally, returns), daemon=True)
        for i in range(8)
    ]
    monitor = threading.Thread(target=_monitor, args=(limiter, halt_monitor, violations, observed), daemon=True)
    monitor.start()
    for worker in workers:
        worker.start()
    time.sleep(1.5)
    stop.set()
    for worker in workers:
        worker.join(5.0)  # the longest wait a worker starts is 0.1 s
    assert [w.name for w in workers if w.is_alive()] == []
    halt_monitor.set()
    monitor.join(5.0)
    assert not monitor.is_alive()

    assert tally.errors == []
    worst = max((diff(limiter, state) for state, _ in violations), default=None)
    assert violations[:3] == [], (f"{len(violations)} of {observed[0]} observed states broke the invariant; "
                                  f"worst d={worst}, window [{limiter.min_diff}, {limiter.max_diff}]")
    assert tally.early_timeouts == []
    final = limiter.state()
    assert final.inserts == tally.inserts == redis_client.xlen(keys[1])
    assert final.samples == tally.granted - tally.returned
    assert final.inserts > config.min_size_to_sample and final.samples > 0  # both sides made progress
    assert tally.insert_timeouts + tally.sample_timeouts > 0  # and the timeouts fired on the blocked side


def test_inserts_count_every_append_even_after_the_store_deletes_entries(make_store):
    """inserts is derived (entries in the stream + entries the store deleted): committed, duplicate, stale-dropped
    and dead-lettered entries all leave the stream, and none of them may shrink the count."""
    store = make_store(history=HistoryConfig(rounds=0),
                       staleness=StalenessConfig(max_staleness=2),
                       rate_limiter=RateLimiterConfig(samples_per_insert=1, min_size_to_sample=1, error_buffer=100))
    store.staleness.publish_version(5)
    fresh = synthetic_trajectory(1, turns=4, tokens=200, version=5)
    store.append(fresh)
    store.append(fresh)                                                    # a duplicate
    store.append(synthetic_trajectory(2, turns=4, tokens=200, version=1))  # over-stale: dropped at read
    store.rate_limiter.try_insert({b"t": b"not msgpack"})                  # dead letter
    assert store.rate_limiter.state().inserts == 4
    deliveries = store.read("learner", 4, block_ms=100)
    store.commit("learner", 1, deliveries)
    stats = store.stats()
    assert (stats.stream_length, stats.counters["committed"], stats.counters["duplicates"],
            stats.counters["stale_drop"], stats.counters["dead_letters"]) == (0, 1, 1, 1, 1)
    assert store.rate_limiter.state() == LimiterState(inserts=4, samples=1)


def test_without_a_ratio_appends_never_wait_and_samples_wait_only_for_min_size(make_store):
    store = make_store(rate_limiter=RateLimiterConfig(min_size_to_sample=3))
    assert not store.rate_limiter.enforces_ratio
    for seed in range(2):
        store.append(synthetic_trajectory(seed, turns=4, tokens=200), timeout_s=0)
    assert store.read("learner", 8, block_ms=50) == []                     # 2 < min_size_to_sample
    for seed in range(2, 50):
        store.append(synthetic_trajectory(seed, turns=4, tokens=200), timeout_s=0)  # never refused
    assert len(store.read("learner", 64, block_ms=100)) == 50
