"""The trajectory wire codec: exact zero-copy round trips, and every malformed record or payload refused with
`TrajectoryError` naming the field at fault (never any other exception)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc_tools.protoc
import msgpack
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from longhaul.config import CodecConfig
from longhaul.synthetic import synthetic_trajectory
from longhaul.trajectory import (
    ARRAY_DTYPES,
    FINISH_REASONS,
    SCHEMA_VERSION,
    Trajectory,
    TrajectoryError,
    decode_trajectory,
    encode_trajectory,
)

FIELD_NAMES = [f.name for f in dataclasses.fields(Trajectory)]
STRING_FIELDS = ("trajectory_id", "task_id", "group_id", "actor_id", "env")
MAP_FIELDS = ("reward_parts", "timings")
DEFAULT_LIMITS = CodecConfig()

# Small episodes keep the property tests fast: ~1.1 KB payloads, 3 turns, 48 tokens.
SMALL = [synthetic_trajectory(seed, turns=3, tokens=48) for seed in range(4)]
SMALL_PAYLOADS = [encode_trajectory(t) for t in SMALL]
# The episode the codec exists for: 44 tool turns, 33k tokens (~430 KB on the wire).
REALISTIC_PAYLOAD = encode_trajectory(synthetic_trajectory(11))


def assert_identical(got: Trajectory, want: Trajectory) -> None:
    """Every field equal and of the same type; arrays equal element for element and of the same dtype."""
    for name in FIELD_NAMES:
        a, b = getattr(got, name), getattr(want, name)
        if name in ARRAY_DTYPES:
            assert a.dtype == b.dtype, name
            assert np.array_equal(a, b), name
        else:
            assert type(a) is type(b), name
            assert a == b, name


def wire_record(trajectory: Trajectory) -> dict[str, Any]:
    """The msgpack map a valid encoding carries, as plain Python values (arrays as [dtype, length, bytes])."""
    return msgpack.unpackb(encode_trajectory(trajectory), raw=False)


def refusal(payload: Any, limits: CodecConfig = DEFAULT_LIMITS) -> TrajectoryError:
    with pytest.raises(TrajectoryError) as info:
        decode_trajectory(payload, limits)
    return info.value


# ---------------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(("seed", "turns", "tokens"), [(0, 44, 33_000), (1, 40, 32_768), (7, 96, 65_536)])
def test_synthetic_trajectory_round_trips_exactly(seed: int, turns: int, tokens: int) -> None:
    original = synthetic_trajectory(seed, turns=turns, tokens=tokens)

    decoded = decode_trajectory(encode_trajectory(original))

    assert decoded.num_tokens == tokens
    assert decoded.num_turns == turns
    assert_identical(decoded, original)


def test_decoded_arrays_are_read_only_views_into_the_payload_itself() -> None:
    decoded = decode_trajectory(REALISTIC_PAYLOAD)
    payload_bytes = np.frombuffer(REALISTIC_PAYLOAD, dtype=np.uint8)

    for name in ARRAY_DTYPES:
        array = getattr(decoded, name)
        assert not array.flags.owndata, name
        assert np.shares_memory(array, payload_bytes), name  # no copy at all: a window on the received bytes
        assert not array.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            array[0] = array[0]


def test_reencoding_a_decoded_payload_reproduces_its_bytes() -> None:
    assert encode_trajectory(decode_trajectory(REALISTIC_PAYLOAD)) == REALISTIC_PAYLOAD


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=["bytes", "bytearray", "memoryview"])
def test_decode_accepts_any_contiguous_byte_buffer(wrap: Callable[[bytes], Any]) -> None:
    assert_identical(decode_trajectory(wrap(SMALL_PAYLOADS[0])), SMALL[0])


def handmade(
    mask: list[int], offsets: list[int], *, token_ids: np.ndarray | None = None, logprob: float = -0.25,
    version: int = 0, **overrides: Any,
) -> Trajectory:
    """A trajectory with the given mask and turn offsets; generated tokens get `logprob` and `version`."""
    loss_mask = np.array(mask, dtype="u1")
    generated = loss_mask.astype(bool)
    fields: dict[str, Any] = dict(
        trajectory_id="t", task_id="k", group_id="g", actor_id="a", env="e",
        token_ids=np.arange(len(mask), dtype="<u4") if token_ids is None else token_ids,
        loss_mask=loss_mask,
        behavior_logprobs=np.where(generated, np.float32(logprob), np.float32(0)).astype("<f4"),
        versions=np.where(generated, version, -1).astype("<i4"),
        turn_offsets=np.array(offsets, dtype="<u4"),
        reward=0.0, num_turns=len(offsets) - 1, num_tool_calls=0, finish_reason="aborted",
    )
    fields.update(overrides)
    return Trajectory(**fields)


EDGE_SHAPES = [
    pytest.param(handmade([], [0]), id="no tokens at all"),
    pytest.param(handmade([0] * 12, [12]), id="zero turns: turn_offsets is [T]"),
    pytest.param(handmade([0] * 10, [4, 7, 10]), id="two turns, zero generated tokens"),
    pytest.param(handmade([1], [0, 1], reward_parts={}, timings={}), id="one token, generated"),
    pytest.param(handmade([0, 1, 0], [1, 2, 3], reward_parts={}, timings={}), id="empty reward_parts and timings"),
    pytest.param(handmade([0, 1, 1], [1, 1, 3]), id="an empty turn (equal consecutive offsets)"),
    pytest.param(
        handmade(
            [0, 1, 1, 0], [1, 3, 4],
            token_ids=np.array([0, 2**32 - 1, 7, 2**31], dtype="<u4"),
            logprob=5e-4,  # a hair above 0, as bf16 rounding of a near-certain token produces
            version=2**31 - 1,
            reward=-1e300, num_tool_calls=2**31 - 1, finish_reason="max_tokens",
            trajectory_id="é" * 2048,  # exactly max_string_bytes (4096) bytes of UTF-8
            env="工具",
            reward_parts={f"part-{i}": i / 7 for i in range(256)},
            timings={"total_s": 5e-324},
        ),
        id="extreme values at every limit",
    ),
    pytest.param(
        handmade([1, 1, 0, 0], [0, 2, 4], logprob=-3.0e38, finish_reason="tool_error"),
        id="most negative float32 logprob",
    ),
]


@pytest.mark.parametrize("original", EDGE_SHAPES)
def test_edge_shapes_round_trip_exactly(original: Trajectory) -> None:
    assert_identical(decode_trajectory(encode_trajectory(original)), original)


def test_non_contiguous_array_views_encode_and_decode_contiguous() -> None:
    original = handmade([0, 1, 1, 0], [1, 3, 4], token_ids=np.arange(8, dtype="<u4")[::2])
    assert not original.token_ids.flags.c_contiguous

    decoded = decode_trajectory(encode_trajectory(original))

    assert decoded.token_ids.flags.c_contiguous
    assert decoded.token_ids.tolist() == [0, 2, 4, 6]


# ---------------------------------------------------------------------------------------------------------------------
# Encode refuses invalid trajectories, naming the field

BASE = synthetic_trajectory(5, turns=4, tokens=96)
T = BASE.num_tokens
GEN = int(BASE.turn_offsets[0])  # the first token of turn 0 is generated by the policy
OBS = 0  # the prompt: mask 0
assert BASE.loss_mask[GEN] == 1 and BASE.loss_mask[OBS] == 0


def replaced(**changes: Any) -> Callable[[Trajectory], Trajectory]:
    return lambda t: dataclasses.replace(t, **changes)


def edited(name: str, index: int, value: Any) -> Callable[[Trajectory], Trajectory]:
    """A copy of the trajectory whose array `name` has `value` at `index`."""

    def edit(t: Trajectory) -> Trajectory:
        array = getattr(t, name).copy()
        array[index] = value
        return dataclasses.replace(t, **{name: array})

    return edit


def retyped(name: str, dtype: str) -> Callable[[Trajectory], Trajectory]:
    return lambda t: dataclasses.replace(t, **{name: getattr(t, name).astype(dtype)})


def shortened(name: str) -> Callable[[Trajectory], Trajectory]:
    return lambda t: dataclasses.replace(t, **{name: getattr(t, name)[:-1].copy()})


ENCODE_VIOLATIONS = [
    # lengths: token_ids defines T, and the other three arrays are measured against it in order
    pytest.param(lambda t: dataclasses.replace(t, token_ids=np.append(t.token_ids, 1).astype("<u4")), "loss_mask",
                 id="token_ids longer than the rest"),
    pytest.param(shortened("loss_mask"), "loss_mask", id="loss_mask short"),
    pytest.param(shortened("behavior_logprobs"), "behavior_logprobs", id="behavior_logprobs short"),
    pytest.param(shortened("versions"), "versions", id="versions short"),
    # dtypes and shapes
    pytest.param(retyped("token_ids", "<i8"), "token_ids", id="token_ids int64"),
    pytest.param(retyped("token_ids", ">u4"), "token_ids", id="token_ids big-endian"),
    pytest.param(retyped("loss_mask", "?"), "loss_mask", id="loss_mask bool"),
    pytest.param(retyped("behavior_logprobs", "<f8"), "behavior_logprobs", id="behavior_logprobs float64"),
    pytest.param(retyped("behavior_logprobs", "<f2"), "behavior_logprobs", id="behavior_logprobs float16"),
    pytest.param(retyped("versions", "<i8"), "versions", id="versions int64"),
    pytest.param(retyped("turn_offsets", "<i8"), "turn_offsets", id="turn_offsets int64"),
    pytest.param(lambda t: dataclasses.replace(t, token_ids=t.token_ids.tolist()), "token_ids", id="token_ids list"),
    pytest.param(lambda t: dataclasses.replace(t, token_ids=t.token_ids.reshape(2, -1)), "token_ids",
                 id="token_ids 2-d"),
    # scalars
    pytest.param(replaced(reward=math.nan), "reward", id="NaN reward"),
    pytest.param(replaced(reward=math.inf), "reward", id="inf reward"),
    pytest.param(replaced(reward=1), "reward", id="int reward"),
    pytest.param(replaced(reward=True), "reward", id="bool reward"),
    pytest.param(replaced(reward=None), "reward", id="None reward"),
    pytest.param(replaced(reward=np.float64(0.5)), "reward", id="numpy float64 reward"),
    pytest.param(replaced(num_turns=True), "num_turns", id="bool num_turns"),
    pytest.param(replaced(num_turns=4.0), "num_turns", id="float num_turns"),
    pytest.param(replaced(num_tool_calls=True), "num_tool_calls", id="bool num_tool_calls"),
    pytest.param(replaced(num_tool_calls=-1), "num_tool_calls", id="negative num_tool_calls"),
    pytest.param(replaced(num_tool_calls=2**31), "num_tool_calls", id="num_tool_calls past int32"),
    # turn grammars: none, or one per turn
    pytest.param(replaced(turn_grammars=["{}"] * 3), "turn_grammars", id="turn_grammars one short of num_turns"),
    pytest.param(replaced(turn_grammars=("{}",) * 4), "turn_grammars", id="turn_grammars a tuple"),
    pytest.param(replaced(turn_grammars=["{}", "", None, ""]), "turn_grammars[2]", id="a None turn grammar"),
    pytest.param(replaced(turn_grammars=["x" * (1024 * 1024 + 1), "", "", ""]), "turn_grammars[0]",
                 id="a turn grammar over max_grammar_bytes"),
    # turn offsets
    pytest.param(replaced(num_turns=5), "turn_offsets", id="num_turns one more than the offsets describe"),
    pytest.param(lambda t: dataclasses.replace(t, turn_offsets=t.turn_offsets[1:].copy()), "turn_offsets",
                 id="turn_offsets one entry short"),
    pytest.param(lambda t: dataclasses.replace(t, turn_offsets=t.turn_offsets[[0, 2, 1, 3, 4]]), "turn_offsets",
                 id="turn_offsets decreasing"),
    pytest.param(edited("turn_offsets", -1, T - 1), "turn_offsets", id="last offset != T"),
    # strings
    pytest.param(replaced(finish_reason="timeout"), "finish_reason", id="unknown finish_reason"),
    pytest.param(replaced(finish_reason=""), "finish_reason", id="empty finish_reason"),
    pytest.param(replaced(finish_reason=["answer"]), "finish_reason", id="unhashable finish_reason"),
    pytest.param(replaced(trajectory_id=""), "trajectory_id", id="empty trajectory_id"),
    pytest.param(replaced(task_id=None), "task_id", id="None task_id"),
    pytest.param(replaced(group_id=b"g"), "group_id", id="bytes group_id"),
    pytest.param(replaced(actor_id=7), "actor_id", id="int actor_id"),
    pytest.param(replaced(env="x" * 4097), "env", id="env past max_string_bytes"),
    # A str decoded from a bad filename with surrogateescape has no UTF-8 form: it cannot go on the wire.
    pytest.param(replaced(trajectory_id="traj-\udcff"), "trajectory_id", id="unencodable trajectory_id"),
    # maps
    pytest.param(replaced(reward_parts={"f1": 1}), "reward_parts['f1']", id="int reward_parts value"),
    pytest.param(replaced(reward_parts={"f1": math.nan}), "reward_parts['f1']", id="NaN reward_parts value"),
    pytest.param(replaced(timings={"total_s": "3"}), "timings['total_s']", id="str timings value"),
    pytest.param(replaced(reward_parts={"": 1.0}), "reward_parts['']", id="empty reward_parts key"),
    pytest.param(replaced(reward_parts={1: 1.0}), "reward_parts[1]", id="int reward_parts key"),
    pytest.param(replaced(reward_parts=[("f1", 1.0)]), "reward_parts", id="reward_parts list of pairs"),
    pytest.param(replaced(timings={f"t{i}": 1.0 for i in range(257)}), "timings", id="257 timings"),
    # version
    pytest.param(replaced(schema_version=SCHEMA_VERSION + 1), "schema_version", id="a newer schema_version"),
    pytest.param(replaced(schema_version=1), "schema_version", id="schema_version 1 (before turn_grammars)"),
    pytest.param(replaced(schema_version=0), "schema_version", id="schema_version 0"),
    pytest.param(replaced(schema_version="1"), "schema_version", id="str schema_version"),
    # True == 1 in Python, but the wire (and the IDL's uint32) would then carry a boolean, not the version.
    pytest.param(replaced(schema_version=True), "schema_version", id="bool schema_version"),
]


@pytest.mark.parametrize(("violate", "field"), ENCODE_VIOLATIONS)
def test_encode_refuses_an_invalid_trajectory_naming_the_field(
    violate: Callable[[Trajectory], Trajectory], field: str
) -> None:
    bad = violate(BASE)

    with pytest.raises(TrajectoryError) as info:
        encode_trajectory(bad)

    assert info.value.field == field


# Per-token invariants of the mask, logprobs and versions: O(tokens) to check, so checked where trust is needed.
PER_TOKEN_VIOLATIONS = [
    pytest.param(edited("loss_mask", GEN, 2), "loss_mask", id="mask value 2"),
    pytest.param(edited("behavior_logprobs", GEN, 0.5), "behavior_logprobs", id="positive logprob generated"),
    pytest.param(edited("behavior_logprobs", GEN, 2e-3), "behavior_logprobs", id="logprob past bf16 tolerance"),
    pytest.param(edited("behavior_logprobs", GEN, np.nan), "behavior_logprobs", id="NaN logprob"),
    pytest.param(edited("behavior_logprobs", GEN, -np.inf), "behavior_logprobs", id="-inf logprob"),
    pytest.param(edited("behavior_logprobs", OBS, -0.5), "behavior_logprobs", id="nonzero logprob where mask 0"),
    pytest.param(edited("versions", GEN, -1), "versions", id="version -1 on generated token"),
    pytest.param(edited("versions", OBS, 0), "versions", id="version 0 where mask 0"),
]


@pytest.mark.parametrize(("violate", "field"), PER_TOKEN_VIOLATIONS)
def test_validate_refuses_a_per_token_violation_naming_the_field(
    violate: Callable[[Trajectory], Trajectory], field: str
) -> None:
    with pytest.raises(TrajectoryError) as info:
        violate(BASE).validate()
    assert info.value.field == field


@pytest.mark.parametrize(("violate", "field"), PER_TOKEN_VIOLATIONS)
def test_the_reader_refuses_a_per_token_violation_that_the_writer_lets_through(
    violate: Callable[[Trajectory], Trajectory], field: str
) -> None:
    """The writer guarantees a well-formed document; the reader, which trusts no writer, checks every token."""
    payload = encode_trajectory(violate(BASE))
    assert refusal(payload).field == field


def test_max_tokens_admits_exactly_the_limit_and_refuses_one_more() -> None:
    assert_identical(decode_trajectory(encode_trajectory(BASE, CodecConfig(max_tokens=T)), CodecConfig(max_tokens=T)),
                     BASE)

    with pytest.raises(TrajectoryError) as info:
        encode_trajectory(BASE, CodecConfig(max_tokens=T - 1))
    assert info.value.field == "token_ids"
    assert info.value.problem == f"{T} tokens exceeds max_tokens={T - 1}"

    assert refusal(encode_trajectory(BASE), CodecConfig(max_tokens=T - 1)).field == "token_ids"


def test_max_payload_bytes_admits_exactly_the_limit_and_refuses_one_more() -> None:
    size = len(encode_trajectory(BASE))
    assert size > 1024  # CodecConfig's floor, so both limits below are legal

    assert encode_trajectory(BASE, CodecConfig(max_payload_bytes=size)) == encode_trajectory(BASE)
    with pytest.raises(TrajectoryError) as info:
        encode_trajectory(BASE, CodecConfig(max_payload_bytes=size - 1))
    assert info.value.field == "payload"
    assert info.value.problem == f"{size} bytes exceeds max_payload_bytes={size - 1}"


# ---------------------------------------------------------------------------------------------------------------------
# Decode refuses malformed payloads, naming the field

RECORD = wire_record(BASE)
assert sorted(RECORD) == sorted(FIELD_NAMES)


def with_wire(name: str, value: Any) -> dict[str, Any]:
    record = copy.deepcopy(RECORD)
    record[name] = value
    return record


def with_wire_part(name: str, index: int, value: Any) -> dict[str, Any]:
    """RECORD with element `index` of the [dtype, length, bytes] triple of array `name` replaced."""
    triple = list(RECORD[name])
    triple[index] = value
    return with_wire(name, triple)


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in RECORD.items() if k != name}


def wire_bytes(name: str) -> bytes:
    return RECORD[name][2]


def loss_mask_with_a_two() -> bytes:
    data = bytearray(wire_bytes("loss_mask"))
    data[GEN] = 2
    return bytes(data)


DECODE_RECORD_VIOLATIONS = [
    pytest.param({**RECORD, "priority": 1.0}, "priority", id="unknown key"),
    pytest.param(without("reward"), "reward", id="missing reward"),
    pytest.param(without("schema_version"), "schema_version", id="missing schema_version"),
    pytest.param(with_wire("schema_version", 99), "schema_version", id="schema_version 99"),
    pytest.param(with_wire("schema_version", "1"), "schema_version", id="str schema_version"),
    pytest.param(with_wire("schema_version", 1.0), "schema_version", id="float schema_version"),
    # array wrappers
    pytest.param(with_wire("token_ids", "abc"), "token_ids", id="array as a string"),
    pytest.param(with_wire("token_ids", wire_bytes("token_ids")), "token_ids", id="array as bare bytes"),
    pytest.param(with_wire("token_ids", RECORD["token_ids"][:2]), "token_ids", id="array wrapper of two"),
    pytest.param(with_wire("token_ids", {"dtype": "<u4"}), "token_ids", id="array as a map"),
    pytest.param(with_wire_part("token_ids", 0, "<u8"), "token_ids", id="dtype string <u8"),
    pytest.param(with_wire_part("token_ids", 0, ">u4"), "token_ids", id="dtype string big-endian"),
    pytest.param(with_wire_part("versions", 0, "<f4"), "versions", id="versions as float32"),
    pytest.param(with_wire_part("token_ids", 0, 4), "token_ids", id="dtype as an int"),
    pytest.param(with_wire_part("loss_mask", 1, T + 1), "loss_mask", id="length disagrees with the bytes"),
    pytest.param(with_wire_part("turn_offsets", 1, -1), "turn_offsets", id="negative length"),
    pytest.param(with_wire_part("turn_offsets", 1, 5.0), "turn_offsets", id="float length"),
    pytest.param(with_wire_part("token_ids", 1, True), "token_ids", id="bool length"),
    pytest.param(with_wire_part("behavior_logprobs", 2, wire_bytes("behavior_logprobs")[:-1]), "behavior_logprobs",
                 id="bytes not a multiple of the item size"),
    pytest.param(with_wire_part("versions", 2, wire_bytes("versions") + b"\0"), "versions",
                 id="bytes one past the length"),
    pytest.param(with_wire_part("token_ids", 2, "abcd" * T), "token_ids", id="data as a string"),
    pytest.param(with_wire_part("token_ids", 2, list(wire_bytes("token_ids"))), "token_ids", id="data as a list"),
    # well-formed wire, broken invariants: decode validates like encode
    pytest.param(with_wire_part("loss_mask", 2, loss_mask_with_a_two()), "loss_mask", id="mask value 2 on the wire"),
    pytest.param(with_wire("versions", ["<i4", T - 1, wire_bytes("versions")[:-4]]), "versions",
                 id="consistent wire, versions one short"),
    pytest.param(with_wire("env", "x" * 4097), "env", id="a string past max_string_bytes"),
    pytest.param(with_wire("num_turns", True), "num_turns", id="bool num_turns"),
    pytest.param(with_wire("finish_reason", ["answer"]), "finish_reason", id="finish_reason as a list"),
    pytest.param(with_wire("finish_reason", {"answer": 1}), "finish_reason", id="finish_reason as a map"),
    pytest.param(with_wire("reward_parts", {b"f1": 1.0}), "reward_parts", id="bytes key in reward_parts"),
    pytest.param(with_wire("timings", [1.0]), "timings", id="timings as a list"),
]


@pytest.mark.parametrize(("record", "field"), DECODE_RECORD_VIOLATIONS)
def test_decode_refuses_a_malformed_record_naming_the_field(record: dict[str, Any], field: str) -> None:
    assert refusal(msgpack.packb(record, use_bin_type=True)).field == field


def test_decode_reads_an_int_where_a_float_is_due_as_that_float() -> None:
    """msgpack lets a writer send 1 for 1.0; the value is exact, so the reader takes it (the encoder never does)."""
    decoded = decode_trajectory(msgpack.packb(with_wire("reward", 1), use_bin_type=True))
    assert (type(decoded.reward), decoded.reward) == (float, 1.0)


VALID = msgpack.packb(RECORD, use_bin_type=True)

MALFORMED_PAYLOADS = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xc1", id="the byte msgpack never uses"),
    pytest.param(b"\x00\x01\x02 not msgpack", id="an int followed by junk"),
    pytest.param(VALID + b"\x00", id="trailing byte after the map"),
    pytest.param(VALID[:1], id="truncated to the map header"),
    pytest.param(VALID[: len(VALID) // 2], id="truncated halfway"),
    pytest.param(VALID[:-1], id="truncated by one byte"),
    pytest.param(msgpack.packb(list(RECORD.values()), use_bin_type=True), id="top level a list"),
    pytest.param(msgpack.packb(1), id="top level an int"),
    pytest.param(msgpack.packb(None), id="top level nil"),
    pytest.param(msgpack.packb({1: 2}), id="int map key"),
    pytest.param(msgpack.packb(msgpack.ExtType(1, b"x")), id="ext type"),
    # A hostile length prefix: a map whose bin claims 2 GiB. Refused as truncated, nothing allocated.
    pytest.param(b"\x81\xa3env\xc6\x7f\xff\xff\xff" + b"x" * 16, id="bin length prefix of 2 GiB"),
    pytest.param(b"\x91" * 100_000, id="100k nested arrays"),
    pytest.param("a string", id="not bytes"),
]


@pytest.mark.parametrize("payload", MALFORMED_PAYLOADS)
def test_decode_refuses_a_malformed_payload_as_payload(payload: Any) -> None:
    assert refusal(payload).field == "payload"


def test_every_strict_prefix_of_a_valid_payload_is_refused() -> None:
    # msgpack is self-delimiting: a map header states its entry count and every str/bin/array its length, so a
    # strict prefix always leaves the unpacker short of data. No prefix can parse, let alone validate.
    for payload in SMALL_PAYLOADS:
        for end in range(len(payload)):
            assert refusal(payload[:end]).field == "payload", end


# ---------------------------------------------------------------------------------------------------------------------
# Properties: decode never raises anything but TrajectoryError, and never returns an invalid trajectory


def decode_or_refuse(payload: bytes, limits: CodecConfig = DEFAULT_LIMITS) -> Trajectory | None:
    """Decode `payload`. A refusal is an allowed outcome (None); any exception other than TrajectoryError escapes and
    fails the test. A trajectory that decodes must validate and survive another round trip unchanged."""
    try:
        decoded = decode_trajectory(payload, limits)
    except TrajectoryError as err:
        assert err.field
        return None
    decoded.validate(limits)
    assert_identical(decode_trajectory(encode_trajectory(decoded, limits), limits), decoded)
    return decoded


EDIT = st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 2**20), st.integers(1, 255))


@settings(max_examples=400, deadline=None)
@given(payload=st.sampled_from(SMALL_PAYLOADS), edits=st.lists(EDIT, min_size=1, max_size=4))
def test_corrupted_payload_is_refused_or_decodes_to_a_valid_trajectory(
    payload: bytes, edits: list[tuple[str, int, int]]
) -> None:
    data = bytearray(payload)
    for kind, position, byte in edits:
        if kind == "insert":
            data.insert(position % (len(data) + 1), byte)
        elif data and kind == "flip":
            data[position % len(data)] ^= byte
        elif data:
            del data[position % len(data)]

    decode_or_refuse(bytes(data))


@settings(max_examples=40, deadline=None)
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_realistic_payload_is_refused(fraction: float) -> None:
    assert refusal(REALISTIC_PAYLOAD[: int(fraction * len(REALISTIC_PAYLOAD))]).field == "payload"


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=2048))
def test_arbitrary_bytes_are_refused_or_decode_to_a_valid_trajectory(payload: bytes) -> None:
    decode_or_refuse(payload)


# Any value msgpack can carry, kept inside the unpacker's bounds (str ≤ 4096 bytes, arrays and maps ≤ 1024 entries,
# text map keys only) so that a refusal is about the field, not the document. Also a valid record's own values, so a
# value of the right shape lands in the wrong field.
MSGPACK_VALUES = st.one_of(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=16)
        | st.binary(max_size=16),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    ),
    st.sampled_from([RECORD[name] for name in FIELD_NAMES]),
    st.sampled_from(sorted(FINISH_REASONS)),
    st.dictionaries(st.text(max_size=8), st.floats(), max_size=4),
)


def _is_string(value: Any) -> bool:
    return type(value) is str and 0 < len(value.encode()) <= DEFAULT_LIMITS.max_string_bytes


def _is_int32(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 2**31 - 1


def _is_wire_array(value: Any, dtype: np.dtype) -> bool:
    return (type(value) is list and len(value) == 3 and value[0] == dtype.str and type(value[1]) is int
            and value[1] >= 0 and type(value[2]) is bytes and len(value[2]) == value[1] * dtype.itemsize)


def _is_float_like(value: Any) -> bool:
    return type(value) is float or (type(value) is int and abs(value) < 2**64)


def blamed_field(name: str, value: Any) -> str | None:
    """The field decode must name when field `name` of the valid RECORD is replaced by `value`; None if still valid.

    Mostly `name` itself. Where the replacement is well-formed in isolation but contradicts another field, the
    codec reports the inconsistency at the field it checks second: turn_offsets for num_turns, loss_mask for a
    token_ids of another length. The typed decoder accepts an int where a float is due (msgpack can carry either,
    and the conversion is exact) and names a map whose keys or values have the wrong type; entries that type-check
    but break a rule (an empty key, NaN) are named `map[key]`, the first bad entry in wire order."""
    if name == "schema_version":
        return None if type(value) is int and value == SCHEMA_VERSION else name
    if name in STRING_FIELDS:
        return None if _is_string(value) else name
    if name == "finish_reason":
        return None if type(value) is str and value in FINISH_REASONS else name
    if name == "reward":
        return None if _is_float_like(value) and math.isfinite(value) else name
    if name == "num_tool_calls":
        return None if _is_int32(value) else name
    if name == "num_turns":
        if not _is_int32(value):
            return name
        return None if value == RECORD["num_turns"] else "turn_offsets"
    if name == "token_ids":
        if not _is_wire_array(value, ARRAY_DTYPES[name]):
            return name
        return None if value[1] == T else "loss_mask"  # any uint32 is a token id
    if name in ARRAY_DTYPES:
        return None if value == RECORD[name] else name
    if name == "turn_grammars":
        if type(value) is not list or not all(type(g) is str for g in value):
            return name
        return None if len(value) in (0, RECORD["num_turns"]) else name
    if name in MAP_FIELDS:
        if type(value) is not dict or not all(type(k) is str and _is_float_like(x) for k, x in value.items()):
            return name
        if len(value) > 256:
            return name
        for key, x in value.items():
            if not _is_string(key) or not math.isfinite(x):
                return f"{name}[{key!r:.40}]"
        return None
    raise AssertionError(f"no rule for field {name}")


@settings(max_examples=500, deadline=None)
@given(name=st.sampled_from(FIELD_NAMES), value=MSGPACK_VALUES)
def test_a_field_of_the_wrong_type_is_refused_naming_that_field(name: str, value: Any) -> None:
    payload = msgpack.packb(with_wire(name, value), use_bin_type=True)
    expected = blamed_field(name, value)

    if expected is None:
        decoded = decode_or_refuse(payload)
        assert decoded is not None
        assert msgpack.unpackb(encode_trajectory(decoded))[name] == value
    else:
        assert refusal(payload).field == expected


@settings(max_examples=100, deadline=None)
@given(pattern=st.binary(min_size=1, max_size=16), excess=st.integers(1, 8192))
def test_a_payload_over_max_payload_bytes_is_refused_before_parsing(pattern: bytes, excess: int) -> None:
    limits = CodecConfig(max_payload_bytes=1024)
    size = 1024 + excess
    garbage = (pattern * (size // len(pattern) + 1))[:size]

    err = refusal(garbage, limits)

    # The size is the complaint, not the (garbage) content: the bytes were never handed to the unpacker.
    assert err.field == "payload"
    assert err.problem == f"{size} bytes exceeds max_payload_bytes=1024"


def test_a_valid_payload_over_max_payload_bytes_is_refused_and_one_at_the_limit_decodes() -> None:
    size = len(REALISTIC_PAYLOAD)

    err = refusal(REALISTIC_PAYLOAD, CodecConfig(max_payload_bytes=size - 1))

    assert err.field == "payload"
    assert f"{size} bytes" in str(err)
    assert decode_trajectory(REALISTIC_PAYLOAD, CodecConfig(max_payload_bytes=size)).num_tokens == 33_000


# ---------------------------------------------------------------------------------------------------------------------
# The IDL and the Python record describe the same schema

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"


@pytest.fixture(scope="module")
def trajectory_pb2(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    out = tmp_path_factory.mktemp("pb2")
    bundled = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto shipped with grpc_tools
    status = grpc_tools.protoc.main(
        ["protoc", f"-I{PROTO_ROOT}", f"-I{bundled}", f"--python_out={out}", "longhaul/v1/trajectory.proto"]
    )
    assert status == 0
    # Loaded from its file rather than through sys.path: a module named `trajectory_pb2` (or `longhaul.v1...`, which
    # the real `longhaul` package would shadow) cached by another test could otherwise be picked up instead.
    spec = importlib.util.spec_from_file_location("_longhaul_trajectory_pb2", out / "longhaul/v1/trajectory_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_idl_declares_exactly_the_fields_of_the_python_record(trajectory_pb2: ModuleType) -> None:
    idl = {f.name for f in trajectory_pb2.Trajectory.DESCRIPTOR.fields}

    assert idl == {f.name for f in dataclasses.fields(Trajectory)}


# Which numpy dtypes faithfully carry each proto scalar type: (kind, largest itemsize).
PROTO_SCALARS = {FieldDescriptor.TYPE_UINT32: ("u", 4), FieldDescriptor.TYPE_INT32: ("i", 4),
                 FieldDescriptor.TYPE_FLOAT: ("f", 4)}


def test_idl_repeated_scalars_are_the_wire_arrays_with_matching_element_types(trajectory_pb2: ModuleType) -> None:
    descriptor = trajectory_pb2.Trajectory.DESCRIPTOR
    repeated = {f.name: f for f in descriptor.fields if f.is_repeated and f.message_type is None}
    maps = {f.name for f in descriptor.fields if f.message_type is not None and f.message_type.GetOptions().map_entry}

    assert set(repeated) == set(ARRAY_DTYPES) | {"turn_grammars"}
    assert repeated["turn_grammars"].type == FieldDescriptor.TYPE_STRING
    assert maps == set(MAP_FIELDS)
    for name, dtype in ARRAY_DTYPES.items():
        kind, itemsize = PROTO_SCALARS[repeated[name].type]
        assert dtype.kind == kind, name
        assert dtype.itemsize <= itemsize, name


# ---------------------------------------------------------------------------------------------------------------------
# The error type


def test_trajectory_error_is_a_value_error_reading_field_colon_problem() -> None:
    err = TrajectoryError("reward", "must be a finite float, got nan")

    assert isinstance(err, ValueError)
    assert str(err) == "reward: must be a finite float, got nan"
    assert (err.field, err.problem) == ("reward", "must be a finite float, got nan")


def test_codec_refusals_are_caught_as_value_error() -> None:
    with pytest.raises(ValueError, match=r"^payload: not a valid msgpack document"):
        decode_trajectory(b"")
