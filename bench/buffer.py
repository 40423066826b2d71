"""Buffer throughput: longhaul's TrajectoryStore against raw Redis stream commands moving the same bytes.

    python bench/buffer.py [--trajectories 256] [--tokens 33000] [--turns 44] [--batch 16] [--repeats 9]
                           [--short-tokens 4000] [--appendfsync everysec] [--json PATH]

Two pipelines run on one embedded redis-server (AOF on; `appendfsync everysec` unless `--appendfsync always`, which is
the production default) through one client, interleaved round by round (A B A B ...) because these machines are noisy:

- longhaul: `store.append` × N, then `store.read` + `store.commit` per batch until all N are committed. This is the
  real cost: structural checks and msgpack encoding in append, decoding with full per-token validation, the
  rate-limiter grant, the seen-set and the staleness check in read, the atomic commit script. Default config: no
  samples-per-insert ratio, so an append is one XADD. History is off (rounds=0), so a commit deletes its entries and
  the stream stays at steady state.
- raw redis: the identical payload bytes, as a careful hand-written client would move them: one XADD per item, one
  XREADGROUP per batch, one pipelined XACK + XDEL per batch. No decoding: raw bytes in, raw bytes out.

The figure of merit is longhaul's trajectories/s over raw's in the same round, median over rounds; the target
(≥ 0.80) is set on realistic trajectories (the long size). A short size is measured the same way and reported for
information. The codec is then timed against pickle (protocol 5) of the same Trajectory objects, and against msgpack
of a plain dict of `tobytes()` arrays. A missed target is printed, not turned into an exit status.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import msgpack
import redis

from longhaul.buffer.redis_server import EmbeddedRedis, connect
from longhaul.buffer.store import GROUP, PAYLOAD_FIELD, TrajectoryStore
from longhaul.config import BufferConfig, HistoryConfig
from longhaul.synthetic import synthetic_trajectory
from longhaul.trajectory import ARRAY_DTYPES, Trajectory, decode_trajectory, encode_trajectory

TARGET_RATIO = 0.80
CONSUMER = "bench"
MB = 1e6


# ---- one timed pass of one pipeline ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pass:
    """One timed append + drain of N trajectories through one pipeline."""

    seconds: float
    append_s: float
    drain_s: float
    client_cpu_s: float
    """CPU time of this (client) process over the pass."""
    server_cpu_s: float
    """CPU time of redis-server over the pass (all its threads: main, AOF fsync, lazy free)."""


def _server_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _timed(client: redis.Redis, append: Callable[[], None], drain: Callable[[], None]) -> Pass:
    gc.collect()  # a collection of the previous pass's garbage must not land inside this one
    server0, cpu0, t0 = _server_cpu_s(client), time.process_time(), time.perf_counter()
    append()
    t1 = time.perf_counter()
    drain()
    t2 = time.perf_counter()
    cpu1, server1 = time.process_time(), _server_cpu_s(client)
    return Pass(t2 - t0, t1 - t0, t2 - t1, cpu1 - cpu0, server1 - server0)


def longhaul_pass(client: redis.Redis, trajectories: Sequence[Trajectory], batch: int, config: BufferConfig) -> Pass:
    # A fresh run per pass: an empty seen-set, limiter and step counter, exactly like a new run's first steps.
    store = TrajectoryStore(client, f"bench-{uuid.uuid4().hex[:12]}", config)
    n = len(trajectories)

    def append() -> None:
        for trajectory in trajectories:
            store.append(trajectory)

    def drain() -> None:
        committed, step = 0, 0
        while committed < n:
            # As a learner does, pass the version being trained (this one never updates weights: version 0).
            deliveries = store.read(CONSUMER, batch, learner_version=0)
            if not deliveries:
                raise RuntimeError(f"longhaul read returned nothing with {n - committed} trajectories outstanding")
            result = store.commit(CONSUMER, step, deliveries)
            if result.committed != len(deliveries):
                raise RuntimeError(f"step {step}: committed {result.committed} of {len(deliveries)} deliveries")
            committed += result.committed
            step += 1

    timed = _timed(client, append, drain)
    stats = store.stats()
    if stats.stream_length or stats.pending or stats.counters.get("committed") != n:
        raise RuntimeError(f"longhaul pass left the stream unsettled: {stats}")
    client.delete(*(getattr(store.keys, name) for name in (
        "stream", "dead_letters", "seen", "version", "counters", "limiter", "committed_steps",
        "history_entries", "history_uses", "history_rounds")))
    return timed


def raw_pass(client: redis.Redis, payloads: Sequence[bytes], batch: int) -> Pass:
    stream = f"bench-raw-{uuid.uuid4().hex[:12]}"
    client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    n = len(payloads)

    def append() -> None:
        for payload in payloads:
            client.xadd(stream, {PAYLOAD_FIELD: payload})

    def drain() -> None:
        drained = 0
        while drained < n:
            response = client.xreadgroup(GROUP, CONSUMER, {stream: ">"}, count=batch)
            ids = [entry_id for entry_id, _ in response[0][1]] if response else []
            if not ids:
                raise RuntimeError(f"raw XREADGROUP returned nothing with {n - drained} entries outstanding")
            pipe = client.pipeline(transaction=False)
            pipe.xack(stream, GROUP, *ids)
            pipe.xdel(stream, *ids)
            pipe.execute()
            drained += len(ids)

    timed = _timed(client, append, drain)
    if client.xlen(stream):
        raise RuntimeError("raw pass left entries in its stream")
    client.delete(stream)
    return timed


def hold_aof_rewrites(client: redis.Redis) -> None:
    """Turn off Redis's automatic AOF rewrite; `settle_aof` rewrites between passes instead.

    With the defaults (rewrite at 64 MB and 100 % growth) one pass of 256 long trajectories writes 110 MB and forks a
    rewrite child part-way through, which then writes tens of MB to disk on one of only two cores: the largest single
    source of noise measured here. The rewrite costs both pipelines the same (same bytes, same dataset), so moving it
    between passes removes noise, not overhead."""
    client.config_set("auto-aof-rewrite-percentage", 0)


def settle_aof(client: redis.Redis) -> None:
    """Rewrite the AOF down to the (now empty) dataset and wait, so every pass starts from the same small file."""
    while client.info("persistence")["aof_rewrite_in_progress"]:
        time.sleep(0.02)
    client.bgrewriteaof()
    time.sleep(0.02)
    while True:
        persistence = client.info("persistence")
        if not (persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]):
            return
        time.sleep(0.02)


# ---- a size: interleaved rounds, summarised ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True, slots=True)
class PipelineFigures:
    trajectories_per_s: Spread
    mb_per_s: Spread
    append_ms_per_traj: float
    drain_ms_per_traj: float
    client_cpu_ms_per_traj: float
    server_cpu_ms_per_traj: float


@dataclass(frozen=True, slots=True)
class SizeFigures:
    label: str
    trajectories: int
    tokens: int
    turns: int
    payload_bytes: int
    """Mean encoded payload size."""
    batch: int
    repeats: int
    longhaul: PipelineFigures
    raw: PipelineFigures
    ratio: Spread
    """longhaul / raw trajectories per second, paired round by round."""
    round_rates: tuple[tuple[float, float], ...]
    """(longhaul, raw) trajectories per second of each round, in order."""
    gated: bool
    """Whether the acceptance target applies to this size (the realistic one) or it is reported for information."""

    @property
    def passed(self) -> bool:
        return self.ratio.median >= TARGET_RATIO


def _summarise(passes: Sequence[Pass], n: int, payload_bytes: float) -> PipelineFigures:
    rates = [n / p.seconds for p in passes]
    return PipelineFigures(
        trajectories_per_s=Spread.of(rates),
        mb_per_s=Spread.of([r * payload_bytes / MB for r in rates]),
        append_ms_per_traj=1e3 * statistics.median(p.append_s for p in passes) / n,
        drain_ms_per_traj=1e3 * statistics.median(p.drain_s for p in passes) / n,
        client_cpu_ms_per_traj=1e3 * statistics.median(p.client_cpu_s for p in passes) / n,
        server_cpu_ms_per_traj=1e3 * statistics.median(p.server_cpu_s for p in passes) / n,
    )


def build_pool(n: int, tokens: int, turns: int, seed: int) -> tuple[list[Trajectory], list[bytes]]:
    trajectories = [synthetic_trajectory(seed + i, turns=turns, tokens=tokens, trajectory_id=f"traj-{seed + i}")
                    for i in range(n)]
    # The raw pipeline moves exactly the bytes longhaul's append would write.
    return trajectories, [encode_trajectory(t) for t in trajectories]


def measure_size(client: redis.Redis, label: str, n: int, tokens: int, turns: int, batch: int, repeats: int,
                 seed: int, gated: bool) -> SizeFigures:
    trajectories, payloads = build_pool(n, tokens, turns, seed)
    payload_bytes = statistics.fmean(len(p) for p in payloads)
    config = BufferConfig(history=HistoryConfig(rounds=0))
    # One untimed pass of each first: script loading (EVALSHA → NOSCRIPT → SCRIPT LOAD), and both processes'
    # allocators growing to the working set, would otherwise land on round 1 only.
    longhaul_pass(client, trajectories, batch, config)
    raw_pass(client, payloads, batch)
    longhaul_passes: list[Pass] = []
    raw_passes: list[Pass] = []
    for round_ in range(repeats):
        settle_aof(client)
        longhaul_passes.append(longhaul_pass(client, trajectories, batch, config))
        settle_aof(client)
        raw_passes.append(raw_pass(client, payloads, batch))
        print(f"  {label} round {round_ + 1}/{repeats}: longhaul {n / longhaul_passes[-1].seconds:7.1f} traj/s, "
              f"raw {n / raw_passes[-1].seconds:7.1f} traj/s", flush=True)
    ratios = [r.seconds / h.seconds for h, r in zip(longhaul_passes, raw_passes, strict=True)]
    return SizeFigures(label, n, tokens, turns, round(payload_bytes), batch, repeats,
                       _summarise(longhaul_passes, n, payload_bytes), _summarise(raw_passes, n, payload_bytes),
                       Spread.of(ratios),
                       tuple((n / h.seconds, n / r.seconds) for h, r in zip(longhaul_passes, raw_passes, strict=True)),
                       gated)


# ---- codec ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodecRow:
    name: str
    us_per_traj: float
    mb_per_s: float
    bytes_per_traj: int
    speed_vs_pickle: float
    """pickle's time / this row's time: above 1 is faster than pickle."""


def _plain_dict(trajectory: Trajectory) -> dict:
    """The naive wire form: every field as is, arrays as `tobytes()` copies, no schema and no validation."""
    record = {}
    for field in fields(Trajectory):
        value = getattr(trajectory, field.name)
        record[field.name] = value.tobytes() if field.name in ARRAY_DTYPES else value
    return record


def _seconds_per_item(fn: Callable[[object], object], items: Sequence) -> float:
    gc.collect()
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items)


def measure_codec(tokens: int, turns: int, pool: int, repeats: int, seed: int) -> dict[str, list[CodecRow]]:
    trajectories, payloads = build_pool(pool, tokens, turns, seed)
    pickles = [pickle.dumps(t, protocol=5) for t in trajectories]
    plain = [msgpack.packb(_plain_dict(t), use_bin_type=True) for t in trajectories]

    def size(blobs: Sequence[bytes]) -> int:
        return round(statistics.fmean(len(b) for b in blobs))

    # (name, function, inputs, bytes per item); the first row of each direction is the baseline.
    cases = {
        "encode": [
            ("pickle.dumps (protocol 5)", lambda t: pickle.dumps(t, protocol=5), trajectories, size(pickles)),
            ("encode_trajectory", encode_trajectory, trajectories, size(payloads)),
            ("  of which structural checks", lambda t: t.validate(per_token=False), trajectories, size(payloads)),
            ("msgpack.packb(dict of tobytes())", lambda t: msgpack.packb(_plain_dict(t), use_bin_type=True),
             trajectories, size(plain)),
        ],
        "decode": [
            ("pickle.loads", pickle.loads, pickles, size(pickles)),
            ("decode_trajectory", decode_trajectory, payloads, size(payloads)),
            ("  of which the full validate()", lambda t: t.validate(), trajectories, size(payloads)),
            ("msgpack.unpackb (no validation)", lambda b: msgpack.unpackb(b, raw=False), plain, size(plain)),
        ],
    }
    # Interleaved like the buffer rounds: every case once per repeat, so a slow patch of the machine hits all alike.
    seconds: dict[str, list[float]] = {name: [] for rows in cases.values() for name, *_ in rows}
    for _ in range(repeats):
        for rows in cases.values():
            for name, fn, items, _ in rows:
                seconds[name].append(_seconds_per_item(fn, items))
    results: dict[str, list[CodecRow]] = {}
    for direction, rows in cases.items():
        baseline = statistics.median(seconds[rows[0][0]])
        results[direction] = []
        for name, _, _, nbytes in rows:
            s = statistics.median(seconds[name])
            results[direction].append(CodecRow(name, 1e6 * s, nbytes / s / MB, nbytes, baseline / s))
    return results


# ---- report -----------------------------------------------------------------------------------------------------


def _spread(s: Spread, fmt: str) -> str:
    return f"{s.median:{fmt}} [{s.min:{fmt}}–{s.max:{fmt}}]"


def print_size(f: SizeFigures) -> None:
    print(f"\nBuffer, {f.label}: {f.trajectories} trajectories × {f.tokens:,} tokens × {f.turns} turns "
          f"({f.payload_bytes / 1e3:,.1f} kB each), batch {f.batch}, {f.repeats} rounds; median [min–max]")
    header = (f"  {'':<16}{'traj/s':>24}{'MB/s':>24}{'append':>10}{'drain':>10}{'client CPU':>12}"
              f"{'server CPU':>12}")
    print(header)
    print(f"  {'':<16}{'':>24}{'':>24}{'ms/traj':>10}{'ms/traj':>10}{'ms/traj':>12}{'ms/traj':>12}")
    for name, p in (("raw redis", f.raw), ("longhaul", f.longhaul)):
        print(f"  {name:<16}{_spread(p.trajectories_per_s, '.1f'):>24}{_spread(p.mb_per_s, '.1f'):>24}"
              f"{p.append_ms_per_traj:>10.2f}{p.drain_ms_per_traj:>10.2f}{p.client_cpu_ms_per_traj:>12.2f}"
              f"{p.server_cpu_ms_per_traj:>12.2f}")
    verdict = "PASS" if f.passed else "FAIL"
    scope = "" if f.gated else ", for information: the target is set on realistic trajectories"
    print(f"  {'longhaul / raw':<16}{_spread(f.ratio, '.3f'):>24}   {verdict} (target ≥ {TARGET_RATIO:.2f}{scope})")
    print("  (ratio: longhaul traj/s over raw traj/s of the same round, median over rounds)")


def print_codec(label: str, tokens: int, rows: dict[str, list[CodecRow]]) -> None:
    print(f"\nCodec, {label} ({tokens:,} tokens); median per trajectory, speed relative to pickle (same run)")
    print(f"  {'':<36}{'µs/traj':>10}{'MB/s':>10}{'kB':>10}{'× pickle':>10}")
    for direction, table in rows.items():
        print(f"  {direction}")
        for row in table:
            print(f"    {row.name:<34}{row.us_per_traj:>10.1f}{row.mb_per_s:>10.0f}{row.bytes_per_traj / 1e3:>10.1f}"
                  f"{row.speed_vs_pickle:>10.2f}")


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {model}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=256, help="trajectories per pass, long size")
    parser.add_argument("--tokens", type=int, default=33_000, help="tokens per trajectory, long size")
    parser.add_argument("--turns", type=int, default=44, help="turns per trajectory (both sizes)")
    parser.add_argument("--short-trajectories", type=int, default=1024, help="trajectories per pass, short size")
    parser.add_argument("--short-tokens", type=int, default=4_000, help="tokens per trajectory, short size; 0 skips it")
    parser.add_argument("--batch", type=int, default=16, help="trajectories per read (learner batch)")
    # 9, not fewer: single rounds swing by ±0.1 on these VMs, and the median of 9 settles within a few hundredths.
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds of longhaul and raw")
    parser.add_argument("--codec-pool", type=int, default=16, help="distinct trajectories timed by the codec bench")
    parser.add_argument("--codec-repeats", type=int, default=9,
                        help="interleaved passes over the codec pool (median taken)")
    parser.add_argument("--appendfsync", choices=("always", "everysec", "no"), default="everysec",
                        help="AOF fsync policy of the embedded server")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="where the server's temporary data directory (its AOF) goes; default: the system temp dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if min(args.trajectories, args.tokens, args.turns, args.batch, args.repeats, args.codec_pool,
           args.codec_repeats) < 1:
        parser.error("--trajectories, --tokens, --turns, --batch, --repeats and --codec-* must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # (label, trajectories per pass, tokens, gated by the acceptance target)
    sizes = [("long", args.trajectories, args.tokens, True)]
    if args.short_tokens > 0 and args.short_trajectories > 0:
        sizes.append(("short", args.short_trajectories, args.short_tokens, False))

    started = time.perf_counter()
    buffer_figures: list[SizeFigures] = []
    with tempfile.TemporaryDirectory(prefix="longhaul-bench-", dir=args.data_dir) as data_dir, \
            EmbeddedRedis(data_dir, appendfsync=args.appendfsync) as server:
        client = connect(server.url)
        try:
            hold_aof_rewrites(client)
            for label, n, tokens, gated in sizes:
                buffer_figures.append(measure_size(client, label, n, tokens, args.turns, args.batch, args.repeats,
                                                   args.seed, gated))
            redis_version = client.info("server")["redis_version"]
        finally:
            client.close()
    codec_figures = {label: measure_codec(tokens, args.turns, args.codec_pool, args.codec_repeats, args.seed)
                     for label, _, tokens, _ in sizes}

    print(f"\n{machine()}; redis-server {redis_version} (embedded, appendfsync {args.appendfsync}); Python "
          f"{sys.version.split()[0]}; total {time.perf_counter() - started:.0f} s")
    for figures in buffer_figures:
        print_size(figures)
    for label, _, tokens, _ in sizes:
        print_codec(label, tokens, codec_figures[label])

    if args.json:
        with open(args.json, "w") as out:
            json.dump({
                "command": " ".join(["python", "bench/buffer.py", *sys.argv[1:]]) if argv is None else None,
                "machine": machine(),
                "redis_version": redis_version,
                "appendfsync": args.appendfsync,
                "aof_rewrite": "automatic rewrite off; rewritten between passes",
                "target_ratio": TARGET_RATIO,
                "buffer": [asdict(f) | {"passed": f.passed} for f in buffer_figures],
                "codec": {label: {d: [asdict(r) for r in rows] for d, rows in table.items()}
                          for label, table in codec_figures.items()},
            }, out, indent=2)
    # A miss is reported, not raised: on a noisy machine a benchmark is evidence for a person, not a gate for CI.
    return 0


if __name__ == "__main__":
    sys.exit(main())
