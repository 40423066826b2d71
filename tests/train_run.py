"""Running `longhaul train` from a test: a small, fast configuration of the whole stack, and readers of what it
writes."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from tests.conftest import SMALL_WORLD


def train_command(tmp_path: Path, model_cache: Path, *extra: str, run_name: str = "e2e",
                  warm_start: bool = False) -> list[str]:
    """`longhaul train` on SMALL_WORLD with short episodes and small batches; `extra` args go before the defaults'
    overrides, so they may add flags (`--resume`) and further `key=value` overrides. Without `warm_start`, no
    warm-up and no held-out evaluation; with it, both, a few seconds each."""
    stages = (["warmup.demonstrations=8", "warmup.max_steps=2", "evaluation.tasks=4", "evaluation.hops=null"]
              if warm_start else
              ["warmup.enabled=false", "evaluation.at_start=false", "evaluation.at_end=false"])
    return [sys.executable, "-m", "longhaul.cli", "train", *extra, *stages, f"train.run_dir={tmp_path / 'runs'}",
            f"run_name={run_name}", f"redis.data_dir={tmp_path / 'redis'}", f"model.cache_dir={model_cache}",
            "buffer.staleness.batch_size=4", "buffer.staleness.max_staleness=1", "actor.group_size=2",
            "actor.episodes_in_flight=8", "agent.max_turns=3", "agent.max_turn_tokens=64",
            "agent.max_episode_tokens=2048", "agent.constrained_tool_calls=true", "engine.max_model_len=2048",
            "engine.max_num_seqs=16", "engine.cpu_kvcache_space_gib=1", "train.status_interval_s=1",
            *(f"world.{k}={v}" for k, v in SMALL_WORLD.model_dump().items())]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


def steps(run_dir: Path) -> list[dict]:
    """The learner's step records so far (`checkpoints/steps.jsonl`)."""
    path = run_dir / "checkpoints" / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
