"""The `longhaul` command line."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from longhaul.config import ConfigError, LonghaulConfig, load_config


def _buffer_client(config: LonghaulConfig):
    from longhaul.buffer.redis_server import connect

    if config.redis.url is None:
        raise SystemExit("this command reads an existing buffer: pass redis.url=redis://... (or a config file with it)")
    return connect(config.redis.url)


def _stop_on_signals() -> threading.Event:
    """An event that SIGINT or SIGTERM sets: long-running commands finish their current work and stop cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def cmd_doctor(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Check the installation and the data path end to end, on a throwaway embedded Redis."""
    from longhaul.buffer.redis_server import EmbeddedRedis, connect
    from longhaul.buffer.store import TrajectoryStore
    from longhaul.synthetic import synthetic_trajectory

    failures = 0

    def check(name: str, fn) -> None:
        nonlocal failures
        start = time.perf_counter()
        try:
            detail = fn()
            print(f"  ok    {name:<44} {detail or ''} ({time.perf_counter() - start:.1f}s)")
        except Exception as exc:  # noqa: BLE001 - a diagnostic reports every failure and keeps going
            failures += 1
            print(f"  FAIL  {name:<44} {type(exc).__name__}: {exc}")

    print("longhaul doctor")
    for module in ("torch", "vllm", "transformers", "ray", "redis", "msgpack", "prometheus_client", "grpc"):
        check(f"import {module}", lambda m=module: getattr(importlib.import_module(m), "__version__", ""))
    check("transformers Qwen2 model class", lambda: importlib.import_module("transformers").Qwen2ForCausalLM.__name__)

    with tempfile.TemporaryDirectory(prefix="longhaul-doctor-") as tmp:
        server = EmbeddedRedis(Path(tmp), appendfsync="always")
        check("embedded redis-server starts", lambda: server.start().url.split("@")[1])
        if server.port is None:
            return 1
        client = connect(server.url)
        store = TrajectoryStore(client, "doctor", config.buffer)
        trajectories = [synthetic_trajectory(seed, turns=44, tokens=33_000) for seed in range(args.trajectories)]

        def round_trip() -> str:
            for trajectory in trajectories:
                store.append(trajectory)
            deliveries = store.read("doctor", len(trajectories), block_ms=1000)
            ids = sorted(d.trajectory.trajectory_id for d in deliveries)
            if ids != sorted(t.trajectory_id for t in trajectories):
                raise RuntimeError(f"appended {len(trajectories)} trajectories, read back {len(ids)}")
            store.commit("doctor", 1, deliveries)
            return f"{len(ids)} trajectories of 44 turns / 33k tokens"

        def survives_kill() -> str:
            entry = store.append(synthetic_trajectory(999, turns=44, tokens=33_000))
            server.kill()
            server.start()
            restarted = connect(server.url)
            if not restarted.xrange(store.keys.stream, min=entry, max=entry):
                raise RuntimeError("an acknowledged append was lost across SIGKILL with appendfsync always")
            restarted.close()
            return "acknowledged append recovered from the AOF"

        check("append → read → commit", round_trip)
        check("redis SIGKILL + restart keeps appends", survives_kill)
        client.close()
        server.stop()
    print("all checks passed" if not failures else f"{failures} check(s) failed: see the lines marked FAIL above")
    return 1 if failures else 0


def cmd_redis(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Run the embedded Redis in the foreground (for actors and learners started by hand)."""
    from longhaul.buffer.redis_server import EmbeddedRedis

    server = EmbeddedRedis.from_config(config.redis).start()
    print(f"redis-server pid {server.pid}, data in {server.data_dir}\nLONGHAUL_REDIS_URL={server.url}", flush=True)
    _stop_on_signals().wait()
    server.stop()
    print("redis-server stopped cleanly")
    return 0


def cmd_make_model(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Build the tiny model (tokenizer trained on the simulated corpus) if missing; print its directory."""
    from longhaul.actors.tiny_model import ensure_run_model

    print(ensure_run_model(config.model, config.world))
    return 0


def cmd_evaluate(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Play the held-out test tasks with a model (`model.path=DIR`, e.g. a checkpoint's `model/`; default: the tiny
    model `make-model` builds) and print the figures. Settings: `evaluation.*`, `agent.*`, `engine.*`."""
    import asyncio
    import json

    from longhaul.actors.evaluation import evaluate_model
    from longhaul.actors.tiny_model import ensure_run_model

    model_dir = ensure_run_model(config.model, config.world)
    result = asyncio.run(evaluate_model(model_dir, config))
    summary = result.summary()
    print(json.dumps(summary) if args.json else
          f"{model_dir}: success {result.success_rate:.1%}, F1 {result.mean_f1:.3f} on {result.episodes} test "
          f"tasks; {result.mean_tool_calls:.1f} tool calls per episode (max {result.max_tool_calls}); finished "
          f"{result.finish_reasons}; success by hops {summary['success_by_hops']}")
    return 0


def cmd_tool_server(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Serve the simulated search world's tools over gRPC until SIGTERM or Ctrl-C."""
    import asyncio

    from longhaul.actors.tool_service import serve_until_signalled

    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.host)
    asyncio.run(serve_until_signalled(config.tools, config.world, args.host, args.port))
    return 0


def cmd_learner(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Run the learner alone against a run's buffer (resuming from its newest checkpoint) until total_steps.
    Under torchrun (`torchrun --nproc-per-node N -m longhaul.cli learner ...`) the N processes shard it with FSDP2."""
    import logging

    from longhaul.actors.tiny_model import ensure_run_model
    from longhaul.buffer.store import TrajectoryStore
    from longhaul.learner import distributed
    from longhaul.learner.trainer import Learner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    distributed.init_from_environment()
    model_dir = ensure_run_model(config.model, config.world)
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    stop = _stop_on_signals()
    learner = Learner(config, model_dir, TrajectoryStore(_buffer_client(config), config.run_name, config.buffer))
    learner.run(should_stop=stop.is_set)
    if learner.world_size > 1:
        import torch.distributed

        torch.distributed.destroy_process_group()
        if learner.rank != 0:
            return 0
    print(f"learner stopped at step {learner.step} (policy version {learner.version}); "
          f"checkpoints in {config.checkpoint_dir}")
    return 0


def cmd_train(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Run the whole job: Redis, tool server, actors and learner; Ctrl-C stops it cleanly (checkpoint, drain)."""
    import logging

    from longhaul.driver import RunError, TrainingRun

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    stop = _stop_on_signals()
    try:
        summary = TrainingRun(config, resume=args.resume, stop=stop).run()
    except RunError as error:
        print(f"longhaul train: {error}", file=sys.stderr)
        return 2
    held_out = " → ".join(f"{e['success_rate']:.1%}" for e in summary["held_out"])
    print(f"run {summary['run_name']}: {summary['steps']} steps in {summary['wall_seconds']:.0f} s, reward "
          f"{summary['reward_first']:.3f} → {summary['reward_last']:.3f}, success {summary['success_first']:.0%} → "
          f"{summary['success_last']:.0%}, longest episode {summary['max_tool_calls']} tool calls"
          + (f"; held-out success {held_out}" if held_out else ""))
    return 0


def cmd_buffer_stats(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Print the state of a run's buffer."""
    from longhaul.buffer.store import TrajectoryStore

    stats = TrajectoryStore(_buffer_client(config), config.run_name, config.buffer).stats()
    print(f"run {config.run_name}: version {stats.version}, stream {stats.stream_length} "
          f"(undelivered {stats.undelivered}, pending {stats.pending}, history {stats.history_size}), "
          f"dead letters {stats.dead_letters}")
    for name, value in sorted(stats.counters.items()):
        print(f"  {name:<24} {value}")
    return 0


def cmd_dead_letters(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """List a run's dead letters: which entry, which field, why."""
    from longhaul.buffer.store import TrajectoryStore

    store = TrajectoryStore(_buffer_client(config), config.run_name, config.buffer)
    letters = store.dead_letters(args.count)
    for letter in letters:
        print(f"{letter.source_entry_id.decode()}  [{letter.field}] {letter.reason}  "
              f"({letter.payload_bytes} bytes, consumer {letter.consumer})")
    print(f"{len(letters)} dead letter(s) shown")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longhaul", description=__doc__,
                                     epilog="Config overrides: section.field=value after the command, "
                                            "e.g. `longhaul buffer-stats redis.url=redis://host:6379 run_name=exp1`.")
    parser.add_argument("--config", type=Path, help="YAML config file (see configs/)")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help=cmd_doctor.__doc__)
    doctor.add_argument("--trajectories", type=int, default=16)
    doctor.set_defaults(fn=cmd_doctor)
    commands.add_parser("redis", help=cmd_redis.__doc__).set_defaults(fn=cmd_redis)
    commands.add_parser("make-model", help=cmd_make_model.__doc__).set_defaults(fn=cmd_make_model)
    evaluate = commands.add_parser("evaluate", help=cmd_evaluate.__doc__)
    evaluate.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    evaluate.set_defaults(fn=cmd_evaluate)
    tools = commands.add_parser("tool-server", help=cmd_tool_server.__doc__)
    tools.add_argument("--host", default="127.0.0.1", help="address to bind (the server has no authentication)")
    tools.add_argument("--port", type=int, default=0, help="port (default: a free one, printed on start)")
    tools.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    tools.set_defaults(fn=cmd_tool_server)
    train = commands.add_parser("train", help=cmd_train.__doc__)
    train.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    train.set_defaults(fn=cmd_train)
    learner = commands.add_parser("learner", help=cmd_learner.__doc__)
    learner.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    learner.set_defaults(fn=cmd_learner)
    commands.add_parser("buffer-stats", help=cmd_buffer_stats.__doc__).set_defaults(fn=cmd_buffer_stats)
    dead = commands.add_parser("dead-letters", help=cmd_dead_letters.__doc__)
    dead.add_argument("--count", type=int, default=20)
    dead.set_defaults(fn=cmd_dead_letters)
    from longhaul.control_cli import add_control_commands

    add_control_commands(commands)
    # Whatever argparse does not know is a `section.field=value` override; load_config rejects anything else.
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"longhaul: invalid config: {exc}", file=sys.stderr)
        return 2
    return args.fn(config, args)


if __name__ == "__main__":
    sys.exit(main())
