"""The supervised warm-up's step time in bfloat16 (autocast) against float32, in the same run.

    python bench/warmup.py [--episodes 1024] [--steps 30] [--rounds 3] [--json PATH]

Measured: `warm_up` itself (packing with grammar replay, forward, loss, backward, AdamW) with
`warmup.compute_dtype=bfloat16`: matrix products and attention autocast to bf16, micro-batches padded to multiples of
256 tokens. Baseline: the same steps with `compute_dtype=float32`. Both fit the tiny model to the same
scripted-expert episodes of the default world and warm-up mix (1-, 2- and a few 16-hop tasks, up to ~6,000 tokens),
in the same batch order, from the same initial weights. Rounds alternate baseline and measured (A B A B ...) because
these machines are noisy; the ratio per round is float32 time / bfloat16 time, reported as the median with the
min–max, beside the absolute steps/s and expert tokens/s, and the last loss of each (the two should agree closely).
bf16 only pays on a CPU with bf16 matrix units (AMX, AVX512-BF16); the benchmark says which this one has.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=1024, help="expert episodes to fit")
    parser.add_argument("--steps", type=int, default=30, help="warm-up steps per round and dtype")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from longhaul.actors.tiny_model import ensure_run_model
    from longhaul.config import LonghaulConfig
    from longhaul.learner.batch import compute_dtype
    from longhaul.learner.warmup import warm_up
    from longhaul.warm_start import play_demonstrations

    config = LonghaulConfig()
    config = config.model_copy(update={"warmup": config.warmup.model_copy(update={"demonstrations": args.episodes})})
    model_dir = ensure_run_model(config.model, config.world)
    episodes = play_demonstrations(config, model_dir)  # the warm-up's own expert, on the first of its tasks
    native = compute_dtype("auto")
    print(f"{len(episodes)} expert episodes ({sum(e.num_tokens for e in episodes):,} tokens, up to "
          f"{max(e.num_tokens for e in episodes):,} in one); this CPU's `auto` precision: {native}")

    runs: dict[str, list] = {"float32": [], "bfloat16": []}
    ratios = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for dtype in runs:
                settings = config.warmup.model_copy(update={"compute_dtype": dtype, "max_steps": args.steps})
                runs[dtype].append(warm_up(model_dir, Path(scratch) / f"{dtype}-{round_}", episodes, settings))
            baseline, measured = runs["float32"][-1], runs["bfloat16"][-1]
            ratios.append(baseline.seconds / measured.seconds)
            print(f"round {round_ + 1}: float32 {baseline.seconds:.1f} s, bfloat16 {measured.seconds:.1f} s "
                  f"({args.steps} steps each): {ratios[-1]:.2f}x", flush=True)

    def summary(results) -> dict:
        seconds = statistics.median(r.seconds for r in results)
        return {"seconds": seconds, "steps_per_s": args.steps / seconds,
                "expert_tokens_per_s": results[0].tokens_trained / seconds, "loss_last": results[-1].loss_last}

    figures = {"episodes": len(episodes), "steps": args.steps, "rounds": args.rounds, "auto": str(native),
               "float32": summary(runs["float32"]), "bfloat16": summary(runs["bfloat16"]),
               "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios)}
    f32, b16 = figures["float32"], figures["bfloat16"]
    print(f"warm-up step: bfloat16 {b16['steps_per_s']:.2f} steps/s ({b16['expert_tokens_per_s']:,.0f} expert "
          f"tokens/s) against float32 {f32['steps_per_s']:.2f} ({f32['expert_tokens_per_s']:,.0f}): "
          f"{figures['speedup']:.2f}x [{figures['speedup_min']:.2f}–{figures['speedup_max']:.2f}]; last loss "
          f"{b16['loss_last']:.4f} against {f32['loss_last']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
