"""The trajectory store: one Redis Stream per run, read by the learner through a consumer group.

The life of an entry:
1. An actor `append`s an encoded Trajectory (XADD, through the rate limiter).
2. The learner `read`s it (XREADGROUP): it is now pending on that consumer. Invalid payloads go to the dead-letter
   stream, entries whose trajectory_id was already trained on are dropped as duplicates, and the staleness filter
   applies; each of those is acknowledged on the spot and counted.
3. The learner trains on it and `commit`s the step: in one atomic script the entry is acknowledged, its
   trajectory_id joins the seen-set, and it either enters the replay history or is deleted from the stream.
4. If the consumer dies between 2 and 3, the entry stays pending: the restarted consumer gets it back with
   `recover`, any other consumer with `reclaim` once it has been idle `claim_idle_ms`.

Nothing is ever trimmed by length. An entry leaves the stream only after it was acknowledged and is not in the replay
history, so the stream always holds exactly undelivered + pending + history entries, and an unacknowledged
trajectory cannot be dropped. Delivery is at-least-once; the seen-set makes a redelivery harmless.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, fields
from typing import Literal

import redis

from longhaul.buffer import metrics
from longhaul.buffer.rate_limiter import RateLimiter, RateLimiterTimeout
from longhaul.buffer.staleness import StalenessGate
from longhaul.config import BufferConfig
from longhaul.trajectory import Trajectory, TrajectoryEncoder, TrajectoryError, decode_trajectory

GROUP = "learner"
PAYLOAD_FIELD = b"t"
# A dead letter keeps at most this much of the offending payload: enough to debug, bounded against a hostile producer.
_DEAD_LETTER_PAYLOAD_BYTES = 1 << 20
_LABELLED_FIELDS = frozenset(f.name for f in fields(Trajectory)) | {"payload", "entry"}

Source = Literal["new", "recovered", "reclaimed", "replay"]


@dataclass(frozen=True, slots=True)
class RunKeys:
    """Redis keys of one run. The `{run}` hash tag puts them in one cluster slot, as the Lua scripts require."""

    run: str

    def _key(self, name: str) -> str:
        return f"longhaul:{{{self.run}}}:{name}"

    @property
    def stream(self) -> str: return self._key("stream")  # noqa: E704
    @property
    def dead_letters(self) -> str: return self._key("dead")  # noqa: E704
    @property
    def seen(self) -> str: return self._key("seen")  # noqa: E704
    @property
    def version(self) -> str: return self._key("version")  # noqa: E704
    @property
    def counters(self) -> str: return self._key("counters")  # noqa: E704
    @property
    def limiter(self) -> str: return self._key("limiter")  # noqa: E704
    @property
    def committed_steps(self) -> str: return self._key("committed_steps")  # noqa: E704
    @property
    def history_entries(self) -> str: return self._key("history:entries")  # noqa: E704
    @property
    def history_uses(self) -> str: return self._key("history:uses")  # noqa: E704
    @property
    def history_rounds(self) -> str: return self._key("history:rounds")  # noqa: E704
    @property
    def holdings(self) -> str: return self._key("holdings")  # noqa: E704


@dataclass(frozen=True, slots=True)
class Delivery:
    """A trajectory handed to training, and what `commit` needs to acknowledge it."""

    entry_id: bytes
    trajectory: Trajectory
    source: Source
    staleness: int
    """Learner version at delivery minus the trajectory's newest generated version (`StalenessGate.judge`)."""
    weight: float
    """Loss weight from the staleness policy: 1, or `staleness.downweight` for an over-stale trajectory."""

    @property
    def trajectory_id(self) -> str:
        return self.trajectory.trajectory_id


@dataclass(frozen=True, slots=True)
class Consumed:
    """What `commit` needs of a delivery, without the trajectory: a learner checkpoint keeps these so that a
    restarted learner can repeat the commit of its last checkpoint (commits are idempotent)."""

    entry_id: bytes
    trajectory_id: str
    source: Source


@dataclass(frozen=True, slots=True)
class CommitResult:
    committed: int
    """Fresh trajectories newly marked as trained."""
    duplicates: int
    """Fresh deliveries whose trajectory_id was already trained on (another consumer committed it first)."""
    replayed: int
    """Replay uses recorded (those whose trajectory was still in the history)."""
    already_committed: bool
    """True if this consumer had already committed this step: the call changed nothing."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    trajectory_id: str
    entry_id: bytes
    uses: int
    round: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: bytes
    source_entry_id: bytes
    field: str
    reason: str
    consumer: str
    payload: bytes
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class BufferStats:
    stream_length: int
    pending: int
    history_size: int
    dead_letters: int
    version: int
    counters: dict[str, int]

    @property
    def undelivered(self) -> int:
        return self.stream_length - self.pending - self.history_size


# Every deletion from the stream goes through `delete`, so the rate limiter can derive inserts = XLEN + deleted.
# Multi-id commands go in chunks: Lua's unpack() is limited to a few thousand values.
_BULK = """
local function in_chunks(command, key, prefix, ids)
  local done = 0
  for i = 1, #ids, 1000 do
    local args = {}
    if prefix then args[1] = prefix end
    for j = i, math.min(i + 999, #ids) do args[#args + 1] = ids[j] end
    done = done + redis.call(command, key, unpack(args))
  end
  return done
end
local function delete(stream, limiter, eids)
  local n = in_chunks('XDEL', stream, nil, eids)
  if n > 0 then redis.call('HINCRBY', limiter, 'deleted', n) end
end
"""

# KEYS: stream, limiter, counters. ARGV: group, then (entry_id, counter field) pairs. Acknowledges and deletes entries
# that will not be trained on, counting each under its field (duplicates, stale_drop, dead_letters).
_DISCARD = _BULK + """
local stream, limiter, counters = unpack(KEYS)
local eids = {}
for i = 2, #ARGV, 2 do
  eids[#eids + 1] = ARGV[i]
  redis.call('HINCRBY', counters, ARGV[i + 1], 1)
end
in_chunks('XACK', stream, ARGV[1], eids)
delete(stream, limiter, eids)
"""

# KEYS: stream, seen, counters, committed_steps, history_entries, history_uses, history_rounds, limiter
# ARGV: group, consumer, step, L, max_times_sampled, n_fresh, (entry_id, trajectory_id) × n_fresh, replayed ids...
_COMMIT = _BULK + """
local stream, seen, counters, steps, h_entries, h_uses, h_rounds, limiter = unpack(KEYS)
local group, consumer = ARGV[1], ARGV[2]
local step, L, max_times, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local last = tonumber(redis.call('HGET', steps, consumer) or '-1')
if step <= last then return {0, 0, 0, 1} end
redis.call('HSET', steps, consumer, step)

local doomed = {}  -- entry ids leaving the stream, deleted together at the end
local function evict(tid)
  local eid = redis.call('HGET', h_entries, tid)
  if eid then doomed[#doomed + 1] = eid end
  redis.call('HDEL', h_entries, tid)
  redis.call('HDEL', h_uses, tid)
  redis.call('ZREM', h_rounds, tid)
end

local keep = L > 0 and max_times > 1
local committed, duplicates, replayed = 0, 0, 0
local fresh = {}
for i = 0, n - 1 do fresh[#fresh + 1] = ARGV[7 + 2 * i] end
in_chunks('XACK', stream, group, fresh)
for i = 0, n - 1 do
  local eid, tid = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  if redis.call('SADD', seen, tid) == 1 then
    committed = committed + 1
    if keep then
      redis.call('HSET', h_entries, tid, eid)
      redis.call('HSET', h_uses, tid, 1)
      redis.call('ZADD', h_rounds, step, tid)
    else
      doomed[#doomed + 1] = eid
    end
  else
    duplicates = duplicates + 1
    -- The same entry may be the one the history holds (committed twice after a reclaim race): keep it then.
    if redis.call('HGET', h_entries, tid) ~= eid then doomed[#doomed + 1] = eid end
  end
end
for i = 7 + 2 * n, #ARGV do
  local tid = ARGV[i]
  if redis.call('HEXISTS', h_entries, tid) == 1 then
    replayed = replayed + 1
    if redis.call('HINCRBY', h_uses, tid, 1) >= max_times then evict(tid) end
  end
end
-- Keep the rounds (step - L, step]; older ones leave the history and the stream.
for _, tid in ipairs(redis.call('ZRANGEBYSCORE', h_rounds, '-inf', step - L)) do evict(tid) end
delete(stream, limiter, doomed)
redis.call('HINCRBY', counters, 'committed', committed)
redis.call('HINCRBY', counters, 'duplicates', duplicates)
redis.call('HINCRBY', counters, 'replayed', replayed)
return {committed, duplicates, replayed, 0}
"""


class TrajectoryStore:
    """Actors append trajectories; the learner reads, trains, and commits. One instance per process."""

    def __init__(self, client: redis.Redis, run_name: str, config: BufferConfig = BufferConfig()):
        self._client = client
        self.config = config
        self.keys = RunKeys(run_name)
        self.rate_limiter = RateLimiter(client, self.keys.limiter, self.keys.stream, config.rate_limiter)
        self.staleness = StalenessGate(client, self.keys.version, self.keys.counters, self.keys.holdings,
                                       config.staleness)
        self._thread_local = threading.local()  # a TrajectoryEncoder per appending thread
        self._commit = client.register_script(_COMMIT)
        self._discard = client.register_script(_DISCARD)
        try:
            # From id 0, not $: trajectories appended before the learner first connects are read too.
            client.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ---- actor side -------------------------------------------------------------------------------------------

    def append(self, trajectory: Trajectory, timeout_s: float | None = None) -> bytes:
        """Encode and append one trajectory; returns its entry id once Redis has it.

        Waits for the rate limiter up to `timeout_s` (None: forever) and raises `RateLimiterTimeout` after that;
        raises `TrajectoryError` for a trajectory that cannot be encoded (nothing is appended then). Per-token
        values are checked by the reader, which dead-letters a violation with the field named."""
        start = time.perf_counter()
        payload = self._encoder().encode(trajectory)
        try:
            # The actor's admission for this episode is settled in the same transaction as the XADD.
            entry_id = self.rate_limiter.insert({PAYLOAD_FIELD: payload}, timeout_s,
                                                settle=(self.keys.holdings, trajectory.actor_id))
        finally:
            size = len(payload)
            payload.release()  # the encoder's buffer is reused by the next append
        metrics.APPENDED.inc()
        metrics.APPENDED_BYTES.inc(size)
        metrics.OP_SECONDS.labels("append").observe(time.perf_counter() - start)
        return entry_id

    def _encoder(self) -> TrajectoryEncoder:
        encoder = getattr(self._thread_local, "encoder", None)
        if encoder is None:
            encoder = self._thread_local.encoder = TrajectoryEncoder(self.config.codec)
        return encoder

    # ---- learner side -----------------------------------------------------------------------------------------

    def read(self, consumer: str, max_count: int, block_ms: int | None = None,
             learner_version: int | None = None) -> list[Delivery]:
        """Up to `max_count` new trajectories for `consumer`, waiting up to `block_ms` for the first.

        `learner_version` is the version the caller is training, which staleness is measured against (default: the
        published version, which lags the learner while a weight sync is in flight). Each delivery counts as one
        sample for the rate limiter; deliveries stay pending until `commit`."""
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        block_ms = self.config.read_block_ms if block_ms is None else block_ms
        start = time.perf_counter()
        try:
            granted = self.rate_limiter.sample(max_count, timeout_s=block_ms / 1000)
        except RateLimiterTimeout:
            return []
        deliveries: list[Delivery] = []
        try:
            response = self._client.xreadgroup(GROUP, consumer, {self.keys.stream: ">"}, count=granted,
                                               block=block_ms or None)
            entries = response[0][1] if response else []
            deliveries = self._deliver(entries, consumer, "new", learner_version)
            return deliveries
        finally:
            self.rate_limiter.return_samples(granted - len(deliveries))
            metrics.OP_SECONDS.labels("read").observe(time.perf_counter() - start)

    def recover(self, consumer: str, max_count: int = 1024, learner_version: int | None = None) -> list[Delivery]:
        """Entries still pending on `consumer` itself: what it had read but not committed before it restarted."""
        deliveries: list[Delivery] = []
        last = "0"
        while len(deliveries) < max_count:
            response = self._client.xreadgroup(GROUP, consumer, {self.keys.stream: last},
                                               count=max_count - len(deliveries))
            entries = response[0][1] if response else []
            if not entries:
                break
            last = entries[-1][0]
            deliveries += self._deliver(entries, consumer, "recovered", learner_version)
        return deliveries

    def reclaim(self, consumer: str, max_count: int = 1024, min_idle_ms: int | None = None,
                learner_version: int | None = None) -> list[Delivery]:
        """Take over entries pending on other consumers for at least `min_idle_ms` (default: `claim_idle_ms`)."""
        min_idle_ms = self.config.claim_idle_ms if min_idle_ms is None else min_idle_ms
        deliveries: list[Delivery] = []
        cursor = "0-0"
        while len(deliveries) < max_count:
            cursor, entries = self._client.xautoclaim(self.keys.stream, GROUP, consumer, min_idle_ms, cursor,
                                                      count=max_count - len(deliveries))[:2]
            deliveries += self._deliver(entries, consumer, "reclaimed", learner_version)
            if cursor in (b"0-0", "0-0"):
                break
        return deliveries

    def commit(self, consumer: str, step: int, deliveries: list[Delivery] | list[Consumed]) -> CommitResult:
        """Acknowledge everything `step` trained on, after the step is committed (applied or checkpointed).

        Atomic, and idempotent per (consumer, step): calling it again for a step already committed changes nothing,
        so a learner may re-commit the step recorded in its checkpoint after a crash."""
        fresh = [d for d in deliveries if d.source != "replay"]
        args: list = [GROUP, consumer, step, self.config.history.rounds, self.config.history.max_times_sampled,
                      len(fresh)]
        for delivery in fresh:
            args += [delivery.entry_id, delivery.trajectory_id]
        args += [d.trajectory_id for d in deliveries if d.source == "replay"]
        start = time.perf_counter()
        committed, duplicates, replayed, already = self._commit(keys=[
            self.keys.stream, self.keys.seen, self.keys.counters, self.keys.committed_steps,
            self.keys.history_entries, self.keys.history_uses, self.keys.history_rounds, self.keys.limiter,
        ], args=args)
        metrics.OP_SECONDS.labels("commit").observe(time.perf_counter() - start)
        metrics.COMMITTED.inc(committed)
        metrics.DUPLICATES.inc(duplicates)
        metrics.REPLAYED.inc(replayed)
        return CommitResult(committed, duplicates, replayed, bool(already))

    # ---- replay history ---------------------------------------------------------------------------------------

    def history(self) -> list[HistoryEntry]:
        """Every trajectory eligible for replay, oldest round first."""
        rounds = self._client.zrange(self.keys.history_rounds, 0, -1, withscores=True)
        if not rounds:
            return []
        ids = [tid for tid, _ in rounds]
        pipe = self._client.pipeline(transaction=True)
        pipe.hmget(self.keys.history_entries, ids)
        pipe.hmget(self.keys.history_uses, ids)
        entry_ids, uses = pipe.execute()
        return [
            HistoryEntry(tid.decode(), eid, int(u), int(r))
            for (tid, r), eid, u in zip(rounds, entry_ids, uses, strict=True)
            if eid is not None  # evicted between the two reads
        ]

    def replay(self, trajectory_ids: list[str], timeout_s: float = 0.0,
               learner_version: int | None = None) -> list[Delivery]:
        """Fetch history trajectories for another training use. Each counts as a sample for the rate limiter;
        `commit` records the use, and a trajectory leaves the history at `max_times_sampled` uses."""
        if not trajectory_ids:
            return []
        try:
            granted = self.rate_limiter.sample(len(trajectory_ids), timeout_s=timeout_s)
        except RateLimiterTimeout:
            return []
        wanted = trajectory_ids[:granted]
        entry_ids = self._client.hmget(self.keys.history_entries, wanted)
        pipe = self._client.pipeline(transaction=False)
        for eid in entry_ids:
            if eid is not None:
                pipe.xrange(self.keys.stream, min=eid, max=eid, count=1)
        found = iter(pipe.execute())
        if learner_version is None:
            learner_version = self.staleness.version()
        deliveries = []
        counts = self._client.pipeline(transaction=False)
        for eid in entry_ids:
            entries = next(found) if eid is not None else []
            if not entries:
                continue  # evicted since the caller listed the history
            trajectory = decode_trajectory(entries[0][1][PAYLOAD_FIELD], self.config.codec)
            verdict = self.staleness.judge(trajectory.newest_version(), learner_version)
            if verdict.action != "train":
                counts.hincrby(self.keys.counters, f"stale_{verdict.action}", 1)
                metrics.STALE.labels(verdict.action).inc()
            if verdict.action != "drop":
                deliveries.append(Delivery(eid, trajectory, "replay", verdict.staleness, verdict.weight))
        if len(counts):
            counts.execute()
        self.rate_limiter.return_samples(granted - len(deliveries))
        return deliveries

    # ---- inspection -------------------------------------------------------------------------------------------

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest `count` dead letters, for inspection."""
        return [
            DeadLetter(eid, f[b"source"], f[b"field"].decode(), f[b"reason"].decode(), f[b"consumer"].decode(),
                       f[b"payload"], int(f[b"payload_bytes"]))
            for eid, f in self._client.xrange(self.keys.dead_letters, count=count)
        ]

    def stats(self) -> BufferStats:
        """Server-side state of the run; also refreshes the gauges."""
        pipe = self._client.pipeline(transaction=True)
        pipe.xlen(self.keys.stream)
        pipe.xpending(self.keys.stream, GROUP)
        pipe.zcard(self.keys.history_rounds)
        pipe.xlen(self.keys.dead_letters)
        pipe.get(self.keys.version)
        pipe.hgetall(self.keys.counters)
        length, pending, history, dead, version, counters = pipe.execute()
        stats = BufferStats(length, pending["pending"], history, dead, int(version or 0),
                            {k.decode(): int(v) for k, v in counters.items()})
        metrics.STREAM_LENGTH.set(stats.stream_length)
        metrics.PENDING.set(stats.pending)
        metrics.LAG.set(stats.undelivered)
        metrics.HISTORY_SIZE.set(stats.history_size)
        metrics.DEAD_LETTER_LENGTH.set(stats.dead_letters)
        metrics.POLICY_VERSION.set(stats.version)
        return stats

    # ---- internals --------------------------------------------------------------------------------------------

    def _deliver(self, entries: list, consumer: str, source: Source, learner_version: int | None) -> list[Delivery]:
        """Decode and screen raw stream entries; everything not handed to training is acknowledged here."""
        candidates: list[tuple[bytes, Trajectory]] = []
        discards: list = []  # entry_id, counter field, ... for _DISCARD
        # One MULTI for all the bookkeeping: an entry is never acknowledged without its dead letter and counts.
        bookkeeping = self._client.pipeline(transaction=True)
        for entry_id, entry_fields in entries:
            if entry_fields is None:  # deleted while pending (Redis 6.2 XAUTOCLAIM reports it as nil)
                bookkeeping.xack(self.keys.stream, GROUP, entry_id)
                continue
            payload = entry_fields.get(PAYLOAD_FIELD)
            if payload is None:
                names = sorted(k.decode(errors="replace") for k in entry_fields)
                error = TrajectoryError("entry", f"no {PAYLOAD_FIELD.decode()!r} field in the stream entry ({names})")
                discards += self._dead_letter(bookkeeping, entry_id, consumer, error, b"")
                continue
            try:
                candidates.append((entry_id, decode_trajectory(payload, self.config.codec)))
            except TrajectoryError as error:
                discards += self._dead_letter(bookkeeping, entry_id, consumer, error, payload)
        deliveries: list[Delivery] = []
        if candidates:
            seen = self._client.smismember(self.keys.seen, [t.trajectory_id for _, t in candidates])
            if learner_version is None:
                learner_version = self.staleness.version()
            in_batch: set[str] = set()
            for (entry_id, trajectory), already_trained in zip(candidates, seen, strict=True):
                if already_trained or trajectory.trajectory_id in in_batch:
                    discards += [entry_id, "duplicates"]
                    metrics.DUPLICATES.inc()
                    continue
                in_batch.add(trajectory.trajectory_id)
                verdict = self.staleness.judge(trajectory.newest_version(), learner_version)
                metrics.STALENESS.observe(verdict.staleness)
                if verdict.action == "drop":
                    discards += [entry_id, "stale_drop"]
                elif verdict.action == "downweight":
                    bookkeeping.hincrby(self.keys.counters, "stale_downweight", 1)
                if verdict.action != "train":
                    metrics.STALE.labels(verdict.action).inc()
                if verdict.action != "drop":
                    deliveries.append(Delivery(entry_id, trajectory, source, verdict.staleness, verdict.weight))
        if discards:
            self._discard(keys=[self.keys.stream, self.keys.limiter, self.keys.counters], args=[GROUP, *discards],
                          client=bookkeeping)
        if len(bookkeeping):
            bookkeeping.execute()
        metrics.DELIVERED.labels(source).inc(len(deliveries))
        return deliveries

    def _dead_letter(self, pipe: redis.client.Pipeline, entry_id: bytes, consumer: str, error: TrajectoryError,
                     payload: bytes) -> list:
        """Queue the dead letter on `pipe`; returns the `_DISCARD` arguments that acknowledge and count the entry."""
        pipe.xadd(self.keys.dead_letters, {
            "source": entry_id, "field": error.field, "reason": str(error), "consumer": consumer,
            "payload": payload[:_DEAD_LETTER_PAYLOAD_BYTES], "payload_bytes": len(payload),
        }, maxlen=self.config.dead_letter_maxlen, approximate=True)
        # The field can be any key a hostile payload invents: only schema names become label values.
        field = error.field.split("[")[0]
        metrics.DEAD_LETTERS.labels(field if field in _LABELLED_FIELDS else "unknown_field").inc()
        return [entry_id, "dead_letters"]
