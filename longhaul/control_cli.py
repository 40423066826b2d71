"""The control commands of the `longhaul` CLI: `status`, `scale`, `pause`, `resume` and `stop`, clients of a running
run's control server (longhaul/control.py).

Each finds the run with `--address HOST:PORT`, or else in `runs/<run_name>/control.address`, which the driver writes
at start (run_name comes from the config, e.g. `longhaul status run_name=exp1`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from longhaul.config import LonghaulConfig
from longhaul.control import ADDRESS_FILE, ControlClient, ControlError, address_file, format_status

DEFAULT_TIMEOUT_S = 5.0


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _address(config: LonghaulConfig, args: argparse.Namespace) -> str:
    if args.address:
        return args.address
    path = address_file(config.run_name, config.train.run_dir)
    try:
        address = path.read_text().strip()
    except FileNotFoundError:
        raise ControlError(
            f"no control address for run {config.run_name!r}: {path} does not exist. Pass --address HOST:PORT (the "
            "driver prints it at start), name the run with run_name=..., or run from the directory `longhaul train` "
            f"ran in (it writes runs/<run_name>/{ADDRESS_FILE} there)"
        ) from None
    if not address:
        raise ControlError(f"{path} is empty: pass --address HOST:PORT (the driver prints it at start)")
    return address


def _run(config: LonghaulConfig, args: argparse.Namespace, command: Callable[[ControlClient], str]) -> int:
    """Call the run and print what `command` returns; a ControlError goes to stderr as exit code 1."""
    try:
        with ControlClient(_address(config, args), args.timeout) as client:
            print(command(client))
    except ControlError as exc:
        print(f"longhaul {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_status(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Print a running run's status: progress, quality, buffer depth, throughput and actors."""
    return _run(config, args, lambda client: format_status(client.status()))


def cmd_scale(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Set the number of rollout actors of a running run."""

    def scale(client: ControlClient) -> str:
        previous, target = client.scale(args.actors)
        return f"actors target {previous} -> {target} (actors start or drain in the background; see `longhaul status`)"

    return _run(config, args, scale)


def cmd_pause(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Stop sampling new episodes (the learner goes on with what the buffer holds)."""
    return _run(config, args, lambda client: f"run is {client.pause()}")


def cmd_resume(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """Resume sampling after `longhaul pause`."""
    return _run(config, args, lambda client: f"run is {client.resume()}")


def cmd_stop(config: LonghaulConfig, args: argparse.Namespace) -> int:
    """End a running run: by default actors finish their episodes and the learner checkpoints first."""
    how = "without draining" if args.no_drain else "draining episodes in flight and checkpointing"
    return _run(config, args, lambda client: f"stop requested ({how}): run is {client.stop(drain=not args.no_drain)}")


def add_control_commands(commands: argparse._SubParsersAction) -> None:
    """Add `status`, `scale`, `pause`, `resume` and `stop` to the `longhaul` subcommands."""

    def add(name: str, fn: Callable[[LonghaulConfig, argparse.Namespace], int]) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        parser.add_argument("--address", metavar="HOST:PORT",
                            help=f"the run's control server (default: read runs/<run_name>/{ADDRESS_FILE})")
        parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                            help=f"give up on an unanswered call after this long (default {DEFAULT_TIMEOUT_S:g})")
        parser.set_defaults(fn=fn)
        return parser

    add("status", cmd_status)
    add("scale", cmd_scale).add_argument("--actors", type=int, required=True, metavar="N",
                                         help="actors the run should keep alive")
    add("pause", cmd_pause)
    add("resume", cmd_resume)
    add("stop", cmd_stop).add_argument("--no-drain", action="store_true",
                                       help="stop at once: episodes in flight are lost, no final checkpoint")
