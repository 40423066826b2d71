"""Running `longhaul train` from a benchmark, as users run it, and reading what a run writes (bench/async_vs_sync.py,
bench/scheduler.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "longhaul.cli", "train", *overrides]


def read_jsonl(path: Path) -> list[dict]:
    """The whole lines of a JSON-lines file so far (the run may be writing the next one)."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # the last element is '' or a line still being written
    return [json.loads(line) for line in lines if line]


def kill_tree(process: subprocess.Popen) -> None:
    """End a run we started and everything it started (Ray, the engine, the tool server), by pid."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(process.pid)
        for child in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    process.wait()


def run_to_completion(command: list[str], log_path: Path, timeout_s: float, *, name: str,
                      poll: Callable[[], bool] | None = None) -> None:
    """Run `command` with its output in `log_path` until it exits (0, or RuntimeError with the log's tail) or
    `timeout_s` passes (TimeoutError; the run and its children are killed). `poll`, if given, is called every
    50 ms while it runs; once it returns True it is no longer called."""
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while process.poll() is None:
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"{name}: still running after {timeout_s:.0f} s; log: {log_path}")
                if poll is not None and poll():
                    poll = None
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                kill_tree(process)
    if process.returncode != 0:
        raise RuntimeError(f"{name}: longhaul train exited with {process.returncode}; its log:\n"
                           f"{log_path.read_text()[-4000:]}")
