"""The trajectory store's contract: delivery, acknowledgement on commit, duplicates, dead letters, no silent trims."""

from __future__ import annotations

import uuid

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from longhaul.buffer.store import TrajectoryStore
from longhaul.config import BufferConfig, CodecConfig, HistoryConfig
from longhaul.synthetic import synthetic_trajectory
from longhaul.trajectory import TrajectoryError, decode_trajectory, encode_trajectory

NO_HISTORY = BufferConfig(history=HistoryConfig(rounds=0))
OVERSIZE_LIMIT = 64 * 1024  # a valid test payload is ~2 kB; "oversized" pads one past this


def _append_raw(store, fields: dict) -> bytes:
    """Append bytes the way any producer does, through the rate limiter's insert: how corrupt payloads from a buggy
    or hostile producer reach the stream."""
    return store.rate_limiter.try_insert(fields)


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_read_delivers_the_appended_trajectory_exactly(make_store):
    store = make_store()
    sent = synthetic_trajectory(7, turns=44, tokens=33_000, version=5)
    store.staleness.publish_version(5)
    store.append(sent)
    [delivery] = store.read("learner", 4, block_ms=100)
    got = delivery.trajectory
    assert got.trajectory_id == sent.trajectory_id
    for name in ("token_ids", "loss_mask", "behavior_logprobs", "versions", "turn_offsets"):
        assert np.array_equal(getattr(got, name), getattr(sent, name))
    assert (got.reward, got.reward_parts, got.num_turns) == (sent.reward, sent.reward_parts, 44)
    assert (delivery.source, delivery.staleness, delivery.weight) == ("new", 5 - sent.newest_version(), 1.0)


def test_entries_stay_pending_until_the_step_is_committed(make_store):
    store = make_store(NO_HISTORY)
    for seed in range(3):
        store.append(synthetic_trajectory(seed, turns=4, tokens=200))
    deliveries = store.read("learner", 3, block_ms=100)
    assert (store.stats().pending, store.stats().stream_length) == (3, 3)
    assert store.read("learner", 3, block_ms=0) == []  # pending entries are not handed out again
    result = store.commit("learner", 1, deliveries)
    assert (result.committed, result.duplicates, result.already_committed) == (3, 0, False)
    assert (store.stats().pending, store.stats().stream_length) == (0, 0)


def test_a_trajectory_appended_twice_trains_once(make_store):
    """A producer that retries an append after a lost reply sends the same trajectory_id again."""
    store = make_store(NO_HISTORY)
    trajectory = synthetic_trajectory(1, turns=4, tokens=200)
    store.append(trajectory)
    store.append(trajectory)
    first = store.read("learner", 1, block_ms=100)
    store.commit("learner", 1, first)
    duplicates_before = _metric("longhaul_buffer_duplicates_total")
    assert store.read("learner", 1, block_ms=100) == []
    assert _metric("longhaul_buffer_duplicates_total") - duplicates_before == 1
    stats = store.stats()
    assert (stats.counters["committed"], stats.counters["duplicates"], stats.stream_length) == (1, 1, 0)


def test_the_same_trajectory_twice_in_one_read_is_delivered_once(make_store):
    store = make_store(NO_HISTORY)
    trajectory = synthetic_trajectory(1, turns=4, tokens=200)
    store.append(trajectory)
    store.append(trajectory)
    assert [d.trajectory.trajectory_id for d in store.read("learner", 2, block_ms=100)] == [trajectory.trajectory_id]


def test_an_entry_without_a_payload_field_becomes_a_dead_letter(make_store):
    store = make_store()
    source = _append_raw(store, {b"junk": b"1"})
    assert store.read("learner", 1, block_ms=100) == []
    [letter] = store.dead_letters()
    assert (letter.source_entry_id, letter.field, letter.consumer) == (source, "entry", "learner")
    assert "no 't' field" in letter.reason


def test_an_oversized_payload_is_dead_lettered_with_its_size(make_store):
    store = make_store(BufferConfig(codec=CodecConfig(max_payload_bytes=4096)))
    _append_raw(store, {b"t": b"\x00" * 10_000})
    assert store.read("learner", 1, block_ms=100) == []
    [letter] = store.dead_letters()
    assert (letter.field, letter.payload_bytes) == ("payload", 10_000)
    assert "10000 bytes exceeds max_payload_bytes=4096" in letter.reason


def test_append_refuses_an_invalid_trajectory_and_appends_nothing(make_store):
    store = make_store()
    broken = synthetic_trajectory(1, turns=4, tokens=200)
    broken.loss_mask = broken.loss_mask[:-1]
    with pytest.raises(TrajectoryError) as error:
        store.append(broken)
    assert error.value.field == "loss_mask"
    assert store.stats().stream_length == 0


def test_a_per_token_violation_is_dead_lettered_by_the_reader_with_the_field_named(make_store):
    store = make_store()
    broken = synthetic_trajectory(1, turns=4, tokens=200)
    generated = np.flatnonzero(broken.loss_mask)[0]
    broken.behavior_logprobs = broken.behavior_logprobs.copy()
    broken.behavior_logprobs[generated] = 0.5  # a positive log-probability: a sampler bug upstream
    store.append(broken)
    store.append(synthetic_trajectory(2, turns=4, tokens=200))
    assert [d.trajectory.trajectory_id for d in store.read("learner", 2, block_ms=100)] == ["traj-2"]
    [letter] = store.dead_letters()
    assert (letter.field, letter.reason) == ("behavior_logprobs", "behavior_logprobs: a log-probability is positive")


_ANY_MSGPACK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _corrupt(payload: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "garbage", "type-confused", "oversized"]))
    if kind == "type-confused":  # a well-formed document with one field of another type
        record = msgpack.unpackb(payload)
        record[data.draw(st.sampled_from(sorted(record)))] = data.draw(_ANY_MSGPACK)
        return msgpack.packb(record, use_bin_type=True)
    if kind == "oversized":
        return payload + b"\x00" * OVERSIZE_LIMIT
    if kind == "flip":
        at = data.draw(st.integers(0, len(payload) - 1))
        return payload[:at] + bytes([payload[at] ^ data.draw(st.integers(1, 255))]) + payload[at + 1:]
    if kind == "truncate":
        return payload[: data.draw(st.integers(0, len(payload) - 1))]
    if kind == "splice":
        at = data.draw(st.integers(0, len(payload)))
        return payload[:at] + data.draw(st.binary(min_size=1, max_size=16)) + payload[at:]
    return data.draw(st.binary(max_size=256))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_payloads_never_stop_the_consumer_and_each_lands_in_the_dead_letters(redis_client, data):
    """A stream mixing valid entries with corrupted, truncated, spliced, type-confused and oversized ones: every valid
    one is delivered, every invalid one becomes a dead letter naming the field decoding reports, and nothing stays
    pending or in the stream."""
    config = NO_HISTORY.model_copy(update={"codec": CodecConfig(max_payload_bytes=OVERSIZE_LIMIT)})
    store = TrajectoryStore(redis_client, f"corrupt-{uuid.uuid4().hex[:12]}", config)  # a run per example
    expected_valid, expected_fields = [], []
    for i in range(data.draw(st.integers(1, 6))):
        payload = encode_trajectory(synthetic_trajectory(i, turns=3, tokens=120, trajectory_id=f"t{i}"))
        if data.draw(st.booleans()):
            payload = _corrupt(payload, data)
        try:
            expected_valid.append(decode_trajectory(payload, config.codec).trajectory_id)
        except TrajectoryError as error:
            expected_fields.append(error.field)
        _append_raw(store, {b"t": payload})

    delivered, step = [], 0
    # A read whose entries were all invalid returns nothing while more remain: drain by the stream, not by the read.
    for _ in range(len(expected_valid) + len(expected_fields)):
        if not store.stats().undelivered:
            break
        if batch := store.read("learner", 4, block_ms=0):
            delivered += [d.trajectory.trajectory_id for d in batch]
            step += 1
            store.commit("learner", step, batch)
    # A corruption can turn one valid id into another valid one, so compare as the decoder saw them, de-duplicated.
    assert delivered == list(dict.fromkeys(expected_valid))
    assert [letter.field for letter in store.dead_letters(1000)] == expected_fields
    assert (store.stats().pending, store.stats().stream_length) == (0, 0)


def test_nothing_unacknowledged_ever_leaves_the_stream(make_store):
    """The stream holds exactly undelivered + pending + history entries at every point."""
    store = make_store(BufferConfig(history=HistoryConfig(rounds=2, max_times_sampled=3)))
    step = 0
    rng = np.random.default_rng(0)
    for seed in range(40):
        store.append(synthetic_trajectory(seed, turns=3, tokens=120))
        if rng.random() < 0.3:
            step += 1
            batch = store.read("learner", int(rng.integers(1, 5)), block_ms=0)
            store.commit("learner", step, batch)
        stats = store.stats()
        assert stats.undelivered >= 0
        assert stats.stream_length == stats.undelivered + stats.pending + stats.history_size


def test_buffer_operations_are_exported_under_the_longhaul_buffer_prefix(make_store):
    from prometheus_client import generate_latest

    store = make_store(NO_HISTORY)
    appended_before = _metric("longhaul_buffer_appended_total")
    store.append(synthetic_trajectory(1, turns=4, tokens=200))
    store.commit("learner", 1, store.read("learner", 1, block_ms=100))
    store.stats()
    assert _metric("longhaul_buffer_appended_total") - appended_before == 1
    exposition = generate_latest(REGISTRY).decode()
    for name in ("longhaul_buffer_appended_total", "longhaul_buffer_appended_bytes_total",
                 'longhaul_buffer_delivered_total{source="new"}', "longhaul_buffer_committed_total",
                 'longhaul_buffer_op_seconds_bucket{le="0.001",op="append"}', "longhaul_buffer_stream_length",
                 "longhaul_buffer_pending", "longhaul_buffer_policy_version"):
        assert name in exposition, name
