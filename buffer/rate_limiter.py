"""Samples-per-insert rate limiting with Reverb's semantics, shared through Redis by every actor and the learner.

`inserts` is every entry ever appended to the run's stream, derived rather than counted: the entries in the stream
now plus those the store has deleted from it (`deleted` in the limiter hash, incremented by every script that
deletes, in the same atomic step). Appending is therefore a plain XADD that the limiter need not see, unless a ratio
is enforced. `samples` (training uses granted) lives in the same hash.

With a ratio (`error_buffer` set) and offset = samples_per_insert × min_size_to_sample, the difference
d = inserts × spi − samples is held inside [offset − error_buffer, offset + error_buffer]:
- an insert is allowed while inserts < min_size_to_sample, or if it keeps d ≤ max_diff;
- a sample is allowed once inserts ≥ min_size_to_sample, if it keeps d ≥ min_diff.
Without one, sampling only waits for min_size_to_sample inserts. Check and update happen in one Lua script, so
concurrent callers in any number of processes cannot overshoot. A caller that is not allowed waits (polling with
backoff) up to its timeout and then raises `RateLimiterTimeout` instead of hanging: a stalled learner shows up as an
error in the actors, not a silent deadlock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from longhaul.buffer import metrics
from longhaul.config import RateLimiterConfig

# Bounds standing in for "no bound" when no ratio is enforced: finite, so the Lua arithmetic stays plain.
_UNBOUNDED = 1e300

_STATE = """
local function limiter_state(limiter, stream)
  local deleted, samples = unpack(redis.call('HMGET', limiter, 'deleted', 'samples'))
  return redis.call('XLEN', stream) + tonumber(deleted or '0'), tonumber(samples or '0')
end
"""

# KEYS: limiter hash, stream, holdings hash. ARGV: spi, min_size, max_diff, holder ('' for none), then field/value
# pairs of the stream entry. Returns the new entry id, or false when the insert would push d above max_diff. Only used
# with a ratio: the payload passes through Lua arguments, which costs two extra copies of it on the server.
_INSERT = _STATE + """
local inserts, samples = limiter_state(KEYS[1], KEYS[2])
local spi, min_size, max_diff = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if inserts >= min_size and (inserts + 1) * spi - samples > max_diff then
  return false
end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[4], -1) end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
"""

# KEYS: limiter hash, stream. ARGV: spi, min_size, min_diff, wanted. Grants 0..wanted samples, as many as keep
# d ≥ min_diff.
_SAMPLE = _STATE + """
local inserts, samples = limiter_state(KEYS[1], KEYS[2])
local spi, min_size, min_diff, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if inserts < min_size then return 0 end
local room = math.floor(inserts * spi - samples - min_diff + 1e-9)
local granted = math.max(0, math.min(wanted, room))
if granted > 0 then redis.call('HINCRBY', KEYS[1], 'samples', granted) end
return granted
"""

# KEYS: limiter hash, stream. ARGV: spi, max_diff, count. Gives back up to `count` granted-but-unused samples, but only
# as many as keep d ≤ max_diff: an insert may already have used the room the grant opened. Returns how many.
_RETURN = _STATE + """
local inserts, samples = limiter_state(KEYS[1], KEYS[2])
local spi, max_diff = tonumber(ARGV[1]), tonumber(ARGV[2])
local room = math.floor(max_diff - (inserts * spi - samples) + 1e-9)
local returned = math.max(0, math.min(tonumber(ARGV[3]), room, samples))
if returned > 0 then redis.call('HINCRBY', KEYS[1], 'samples', -returned) end
return returned
"""


class RateLimiterTimeout(TimeoutError):
    """A limiter wait outlasted its timeout. The message says which side waited and on what."""


@dataclass(frozen=True, slots=True)
class LimiterState:
    inserts: int
    samples: int


class RateLimiter:
    """Reverb's SampleToInsertRatio over a Redis hash and the stream it guards. See the module docstring."""

    def __init__(self, client: redis.Redis, key: str, stream_key: str, config: RateLimiterConfig):
        self._client = client
        self.key = key
        self.stream_key = stream_key
        self.config = config
        self.enforces_ratio = config.error_buffer is not None
        offset = config.samples_per_insert * config.min_size_to_sample
        error_buffer = config.error_buffer if self.enforces_ratio else _UNBOUNDED
        self.min_diff = offset - error_buffer
        self.max_diff = offset + error_buffer
        self._insert = client.register_script(_INSERT)
        self._sample = client.register_script(_SAMPLE)
        self._return = client.register_script(_RETURN)

    def state(self) -> LimiterState:
        pipe = self._client.pipeline(transaction=True)
        pipe.xlen(self.stream_key)
        pipe.hmget(self.key, "deleted", "samples")
        length, (deleted, samples) = pipe.execute()
        return LimiterState(length + int(deleted or 0), int(samples or 0))

    def try_insert(self, fields: dict[str, bytes | str], settle: tuple[str, str] | None = None) -> bytes | None:
        """XADD `fields` to the stream if the limiter allows it now; else None. `settle` = (holdings hash, holder):
        decrement that holder's admissions in the same atomic step (see `StalenessGate`)."""
        if not self.enforces_ratio:  # every insert is allowed: nothing to check
            if settle is None:
                return self._client.xadd(self.stream_key, fields)
            pipe = self._client.pipeline(transaction=True)
            pipe.xadd(self.stream_key, fields)
            pipe.hincrby(settle[0], settle[1], -1)
            return pipe.execute()[0]
        holdings, holder = settle or (self.key, "")
        args: list = [self.config.samples_per_insert, self.config.min_size_to_sample, self.max_diff, holder]
        for name, value in fields.items():
            args += [name, value]
        return self._insert(keys=[self.key, self.stream_key, holdings], args=args)

    def insert(self, fields: dict[str, bytes | str], timeout_s: float | None,
               settle: tuple[str, str] | None = None) -> bytes:
        """Like `try_insert`, waiting up to `timeout_s` (None: forever) for room. Returns the entry id."""
        return self._wait("insert", lambda: self.try_insert(fields, settle), timeout_s)

    def try_sample(self, wanted: int) -> int:
        """Grant up to `wanted` samples now; returns how many (possibly 0)."""
        if wanted < 1:
            raise ValueError(f"wanted must be >= 1, got {wanted}")
        return int(self._sample(keys=[self.key, self.stream_key], args=[
            self.config.samples_per_insert, self.config.min_size_to_sample, self.min_diff, wanted]))

    def sample(self, wanted: int, timeout_s: float | None) -> int:
        """Grant between 1 and `wanted` samples, waiting up to `timeout_s` (None: forever) for at least one."""
        return self._wait("sample", lambda: self.try_sample(wanted) or None, timeout_s)

    def return_samples(self, count: int) -> int:
        """Give back granted samples that were not used (e.g. the stream had fewer entries than granted).

        Returns how many were taken back: fewer than `count` when inserts have since used the room the grant
        opened, since taking them all back would push d above max_diff. The rest stay counted as samples."""
        if count <= 0:
            return 0
        return int(self._return(keys=[self.key, self.stream_key],
                                args=[self.config.samples_per_insert, self.max_diff, count]))

    def _wait(self, side: str, attempt, timeout_s: float | None):
        start = time.monotonic()
        result = attempt()
        if result is not None:
            return result
        delay = 0.001
        try:
            while True:
                waited = time.monotonic() - start
                if timeout_s is not None and waited >= timeout_s:
                    metrics.RATE_LIMITER_TIMEOUTS.labels(side).inc()
                    state = self.state()
                    raise RateLimiterTimeout(
                        f"rate limiter blocked {side} for {timeout_s}s: inserts={state.inserts} "
                        f"samples={state.samples}, samples_per_insert={self.config.samples_per_insert}, "
                        f"min_size_to_sample={self.config.min_size_to_sample}, allowed d in "
                        f"[{self.min_diff}, {self.max_diff}]. "
                        + ("The learner is not sampling: is it running?" if side == "insert"
                           else "Actors are not inserting: are they running and admitted?")
                    )
                sleep = delay if timeout_s is None else min(delay, timeout_s - waited)
                time.sleep(max(sleep, 0))
                delay = min(delay * 2, 0.05)
                result = attempt()
                if result is not None:
                    return result
        finally:
            metrics.RATE_LIMITER_WAIT.labels(side).observe(time.monotonic() - start)
