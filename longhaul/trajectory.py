"""The Trajectory: one episode of one task, the unit that crosses actor → Redis → learner.

The wire form is msgpack. Each array travels as `[dtype, length, raw little-endian bytes]` and decodes as a
`numpy.frombuffer` view into the payload: no copy, no per-element work, no pickle.
`decode_trajectory` trusts nothing: every field is checked, and any defect raises `TrajectoryError` naming the
field. The same schema is written as IDL in
`proto/longhaul/v1/trajectory.proto`; a test keeps the two in step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Final

import msgpack
import msgspec
import numpy as np

from longhaul.config import CodecConfig

# 2: `turn_grammars` (the learner scores constrained turns under the grammar that constrained them).
SCHEMA_VERSION: Final = 2

FINISH_REASONS: Final = frozenset({"answer", "max_turns", "max_tokens", "tool_error", "aborted"})

# Field name → dtype on the wire. Little-endian explicitly, so a big-endian host decodes correctly too.
ARRAY_DTYPES: Final = {
    "token_ids": np.dtype("<u4"),
    "loss_mask": np.dtype("u1"),
    "behavior_logprobs": np.dtype("<f4"),
    "versions": np.dtype("<i4"),
    "turn_offsets": np.dtype("<u4"),
}
_STRING_FIELDS: Final = ("trajectory_id", "task_id", "group_id", "actor_id", "env")
_FLOAT_MAP_FIELDS: Final = ("reward_parts", "timings")
_COUNT_FIELDS: Final = ("num_turns", "num_tool_calls")
# Sampled logprobs are ≤ 0; bf16 rounding in the engine can push a near-certain token a hair above.
_MAX_LOGPROB: Final = 1e-3
_MAX_MAP_ENTRIES: Final = 256
_NO_VERSION: Final = 2**32 - 1


class TrajectoryError(ValueError):
    """A trajectory (or its payload) that breaks the schema. `field` names what was wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(slots=True, eq=False)
class Trajectory:
    """One episode of one task, tokens flattened over all turns.

    Invariants (checked by `validate`, on encode and on decode):
    - `token_ids`, `loss_mask`, `behavior_logprobs` and `versions` share one length T.
    - `loss_mask` is 1 exactly on tokens the policy generated, 0 on prompt and tool observations.
    - where the mask is 0, `behavior_logprobs` is 0 and `versions` is -1; where it is 1, the logprob is a finite
      log-probability (≤ 0) and the version is the policy version (≥ 0) that sampled the token.
    - `turn_offsets` has `num_turns + 1` non-decreasing entries; entry 0 is the end of the initial prompt, the last is
      T, and turn k (one model generation and the observation that answers it) is `[offsets[k], offsets[k+1])`.
    - `turn_grammars` is empty (no turn was constrained) or has `num_turns` entries: the JSON schema the engine's
      structured outputs held turn k's generation to, "" for a free turn. Under a grammar the engine samples from
      the model's distribution renormalised over the tokens the grammar admits, and that is the distribution
      `behavior_logprobs` come from; the learner scores those tokens under the same grammar
      (`learner/grammar_mask.py`), or every importance ratio would compare two different distributions.
    """

    trajectory_id: str
    task_id: str
    group_id: str
    actor_id: str
    env: str
    token_ids: np.ndarray
    loss_mask: np.ndarray
    behavior_logprobs: np.ndarray
    versions: np.ndarray
    turn_offsets: np.ndarray
    reward: float
    num_turns: int
    num_tool_calls: int
    finish_reason: str
    reward_parts: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    turn_grammars: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def oldest_version(self) -> int:
        """The oldest policy version that generated any token of this episode (-1 if it generated none)."""
        # Valid versions are -1 off the mask and >= 0 on it; read as uint32, -1 becomes the largest value, so one
        # pass over a zero-copy view finds the minimum over generated tokens.
        oldest = int(self.versions.view(np.uint32).min(initial=_NO_VERSION))
        return -1 if oldest == _NO_VERSION else oldest

    def newest_version(self) -> int:
        """The newest policy version that generated any token of this episode, the one that finished it (-1 if it
        generated none): a trajectory's age counts from here (`buffer/staleness.py`)."""
        return int(self.versions.max(initial=-1))  # -1 off the mask, so the max is over generated tokens

    def validate(self, limits: CodecConfig = CodecConfig(), *, per_token: bool = True) -> None:
        """Raise `TrajectoryError` naming the first field that breaks the invariants above.

        `per_token=False` skips the mask/logprob/version values, the one check that costs O(tokens): the writers use
        it, because the reader checks every payload in full anyway and the check would otherwise run twice."""
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise TrajectoryError(
                "schema_version", f"unsupported version {self.schema_version!r}; this build reads {SCHEMA_VERSION}"
            )
        for name in _STRING_FIELDS:
            _check_string(name, getattr(self, name), limits)
        for name, dtype in ARRAY_DTYPES.items():
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim != 1:
                raise TrajectoryError(name, f"must be a 1-d numpy array, got {type(array).__name__}")
            if array.dtype != dtype:
                raise TrajectoryError(name, f"dtype must be {dtype.str}, got {array.dtype.str}")
        n = len(self.token_ids)
        if n > limits.max_tokens:
            raise TrajectoryError("token_ids", f"{n} tokens exceeds max_tokens={limits.max_tokens}")
        for name in ("loss_mask", "behavior_logprobs", "versions"):
            if len(getattr(self, name)) != n:
                raise TrajectoryError(name, f"length {len(getattr(self, name))} != len(token_ids) {n}")
        if per_token and not self._token_arrays_valid():
            self._raise_token_array_error()
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 2**31 - 1:
                raise TrajectoryError(name, f"must be a non-negative int32, got {value!r}")
        offsets = self.turn_offsets
        if len(offsets) != self.num_turns + 1:
            raise TrajectoryError("turn_offsets", f"length {len(offsets)} != num_turns + 1 = {self.num_turns + 1}")
        if offsets[-1] != n:
            raise TrajectoryError("turn_offsets", f"last offset {int(offsets[-1])} != len(token_ids) {n}")
        if np.any(offsets[1:] < offsets[:-1]):
            raise TrajectoryError("turn_offsets", "must be non-decreasing")
        if type(self.reward) is not float or not math.isfinite(self.reward):
            raise TrajectoryError("reward", f"must be a finite float, got {self.reward!r}")
        if type(self.finish_reason) is not str or self.finish_reason not in FINISH_REASONS:
            raise TrajectoryError("finish_reason", f"{self.finish_reason!r} is not one of {sorted(FINISH_REASONS)}")
        for name in _FLOAT_MAP_FIELDS:
            _check_float_map(name, getattr(self, name), limits)
        _check_grammars(self.turn_grammars, self.num_turns, limits)


    def _token_arrays_valid(self) -> bool:
        """The mask/logprob/version invariants in a few whole-array passes and no boolean indexing: this runs on
        every encode and decode, so it is the codec's hot path. `_raise_token_array_error` names the field."""
        mask, logprobs, versions = self.loss_mask, self.behavior_logprobs, self.versions
        if len(mask) == 0:
            return True
        if mask.max() > 1:
            return False
        generated = mask.view(np.bool_)  # zero-copy: every byte is now 0 or 1
        # min/max propagate NaN, and catch ±inf and positive logprobs, in two passes.
        low, high = logprobs.min(), logprobs.max()
        if not (math.isfinite(low) and math.isfinite(high)) or high > _MAX_LOGPROB:
            return False
        if np.any((logprobs != 0) > generated):  # a nonzero logprob off the mask
            return False
        return versions.min() >= -1 and np.array_equal(versions >= 0, generated)

    def _raise_token_array_error(self) -> None:
        generated = self.loss_mask == 1
        if not np.all(generated | (self.loss_mask == 0)):
            raise TrajectoryError("loss_mask", "values must be 0 or 1")
        logprobs = self.behavior_logprobs
        if not np.all(np.isfinite(logprobs)):
            raise TrajectoryError("behavior_logprobs", "must be finite")
        if np.any(logprobs[generated] > _MAX_LOGPROB):
            raise TrajectoryError("behavior_logprobs", "a log-probability is positive")
        if np.any(logprobs[~generated] != 0):
            raise TrajectoryError("behavior_logprobs", "must be 0 where loss_mask is 0")
        if np.any(self.versions[generated] < 0):
            raise TrajectoryError("versions", "must be >= 0 on generated tokens")
        if np.any(self.versions[~generated] != -1):
            raise TrajectoryError("versions", "must be -1 where loss_mask is 0")
        raise AssertionError("_token_arrays_valid and _raise_token_array_error disagree")  # a bug in this file


def _check_string(name: str, value: Any, limits: CodecConfig) -> None:
    if type(value) is not str or not value:
        raise TrajectoryError(name, f"must be a non-empty string, got {value!r:.80}")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate, e.g. from os.fsdecode of a badly encoded name
        raise TrajectoryError(name, "not encodable as UTF-8") from None
    if size > limits.max_string_bytes:
        raise TrajectoryError(name, f"longer than max_string_bytes={limits.max_string_bytes}")


def _check_float_map(name: str, value: Any, limits: CodecConfig) -> None:
    if type(value) is not dict:
        raise TrajectoryError(name, f"must be a map of name to float, got {type(value).__name__}")
    if len(value) > _MAX_MAP_ENTRIES:
        raise TrajectoryError(name, f"more than {_MAX_MAP_ENTRIES} entries")
    for key, x in value.items():
        _check_string(f"{name}[{key!r:.40}]", key, limits)
        if type(x) is not float or not math.isfinite(x):
            raise TrajectoryError(f"{name}[{key!r:.40}]", f"must be a finite float, got {x!r:.40}")


def _check_grammars(grammars: Any, num_turns: int, limits: CodecConfig) -> None:
    if type(grammars) is not list:
        raise TrajectoryError("turn_grammars", f"must be a list of strings, got {type(grammars).__name__}")
    if grammars and len(grammars) != num_turns:
        raise TrajectoryError("turn_grammars", f"{len(grammars)} entries for num_turns={num_turns} (want 0 or "
                                               f"{num_turns})")
    for k, grammar in enumerate(grammars):
        if type(grammar) is not str:
            raise TrajectoryError(f"turn_grammars[{k}]", f"must be a string, got {type(grammar).__name__}")
        try:
            size = len(grammar.encode())
        except UnicodeEncodeError:
            raise TrajectoryError(f"turn_grammars[{k}]", "not encodable as UTF-8") from None
        if size > limits.max_grammar_bytes:
            raise TrajectoryError(f"turn_grammars[{k}]", f"{size} bytes exceeds max_grammar_bytes="
                                                         f"{limits.max_grammar_bytes}")


# Dataclass order, so one trajectory always encodes to the same bytes, in every process.
_FIELD_ORDER: Final = tuple(f.name for f in fields(Trajectory))
_FIELD_NAMES: Final = frozenset(_FIELD_ORDER)


def encode_trajectory(trajectory: Trajectory, limits: CodecConfig = CodecConfig()) -> bytes:
    """Return the msgpack wire form of `trajectory`: always a well-formed document.

    Raises `TrajectoryError` for anything that would make it malformed (types, dtypes, lengths, offsets, strings,
    sizes). The per-token values (`validate(per_token=True)`) are the reader's to check: `decode_trajectory` checks
    everything, since it cannot trust any writer, and checking here too would double the cost of the hot path."""
    trajectory.validate(limits, per_token=False)
    return _checked_size(msgpack.packb(_wire_record(trajectory), use_bin_type=True), limits)


class TrajectoryEncoder:
    """`encode_trajectory` into one buffer reused across calls, for producers on the hot path.

    A fresh payload per trajectory costs an allocation of its full size, which the allocator serves by mapping new
    pages and faulting them in; reusing the buffer skips that and one copy. The returned view is valid until the next
    `encode`. Not thread-safe: one encoder per producing thread."""

    def __init__(self, limits: CodecConfig = CodecConfig()):
        self.limits = limits
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=False)

    def encode(self, trajectory: Trajectory) -> memoryview:
        trajectory.validate(self.limits, per_token=False)
        self._packer.reset()
        self._packer.pack(_wire_record(trajectory))
        return _checked_size(self._packer.getbuffer(), self.limits)


def _wire_record(trajectory: Trajectory) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for name in _FIELD_ORDER:
        value = getattr(trajectory, name)
        if name in ARRAY_DTYPES:
            # memoryview of a contiguous array packs as msgpack bin without an intermediate bytes copy.
            array = np.ascontiguousarray(value)
            value = [array.dtype.str, len(array), memoryview(array).cast("B")]
        record[name] = value
    return record


def _checked_size(payload: bytes | memoryview, limits: CodecConfig) -> bytes | memoryview:
    if len(payload) > limits.max_payload_bytes:
        raise TrajectoryError("payload", f"{len(payload)} bytes exceeds max_payload_bytes={limits.max_payload_bytes}")
    return payload


class _WireVersion(msgspec.Struct):
    """Just the schema version: read first, so a payload from a newer writer is refused for what it is."""

    schema_version: Any = None


_WireArray = tuple[str, int, memoryview]


class _WireTrajectory(msgspec.Struct, forbid_unknown_fields=True):
    """The msgpack document's shape, for the typed decoder. `memoryview` makes msgspec hand out each array's bytes as
    a view into the payload, so the arrays below are never copied."""

    trajectory_id: str
    task_id: str
    group_id: str
    actor_id: str
    env: str
    token_ids: _WireArray
    loss_mask: _WireArray
    behavior_logprobs: _WireArray
    versions: _WireArray
    turn_offsets: _WireArray
    reward: float
    num_turns: int
    num_tool_calls: int
    finish_reason: str
    reward_parts: dict[str, float]
    timings: dict[str, float]
    turn_grammars: list[str]
    schema_version: int


_VERSION_DECODER: Final = msgspec.msgpack.Decoder(_WireVersion)
_WIRE_DECODER: Final = msgspec.msgpack.Decoder(_WireTrajectory)
# msgspec names the offending field as "`$.name...`" (a wrong type, also "at `key` in `$.name`" for a map key) or
# "field `name`" (missing or unknown).
_ERROR_FIELD: Final = re.compile(r"`\$\.(\w+)|field `([^`]+)`")


def decode_trajectory(payload: bytes, limits: CodecConfig = CodecConfig()) -> Trajectory:
    """Parse and validate a wire payload. Raises `TrajectoryError` (and nothing else) for any defect.

    The arrays of the returned trajectory are read-only views into `payload`."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TrajectoryError("payload", f"must be bytes, got {type(payload).__name__}")
    if len(payload) > limits.max_payload_bytes:
        raise TrajectoryError("payload", f"{len(payload)} bytes exceeds max_payload_bytes={limits.max_payload_bytes}")
    # The encoder is msgpack-python; the decoder is msgspec, which reads the same format but can return `bin` fields
    # as views of the input (msgpack-python copies each array out) and checks every type in C on the way.
    version = _decode_wire(_VERSION_DECODER, payload).schema_version
    if type(version) is not int or version != SCHEMA_VERSION:
        raise TrajectoryError("schema_version", f"unsupported version {version!r:.40}; this build reads "
                                                f"{SCHEMA_VERSION}")
    wire = _decode_wire(_WIRE_DECODER, payload)
    record = {name: getattr(wire, name) for name in _FIELD_ORDER}
    for name, dtype in ARRAY_DTYPES.items():
        record[name] = _decode_array(name, record[name], dtype)
    trajectory = Trajectory(**record)
    trajectory.validate(limits)
    return trajectory


def _decode_wire(decoder: msgspec.msgpack.Decoder, payload: bytes) -> Any:
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        match = _ERROR_FIELD.search(str(exc))
        raise TrajectoryError(next(filter(None, match.groups())) if match else "payload", str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets invalid UTF-8 in a str escape as is
        raise TrajectoryError("payload", f"not a valid msgpack document: {exc}") from None


def _decode_array(name: str, wire: _WireArray, dtype: np.dtype) -> np.ndarray:
    dtype_str, length, data = wire
    if dtype_str != dtype.str:
        raise TrajectoryError(name, f"dtype must be {dtype.str}, got {dtype_str!r:.40}")
    if length < 0:
        raise TrajectoryError(name, f"length must be non-negative, got {length}")
    if len(data) != length * dtype.itemsize:
        raise TrajectoryError(name, f"{len(data)} bytes for {length} elements of {dtype.str}")
    return np.frombuffer(data, dtype=dtype)
