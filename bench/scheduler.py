"""Rollout scheduler: the time one bandit round takes to choose among many candidates, against a learner step.

    python bench/scheduler.py [--candidates 100000] [--group-size 8] [--batch 16] [--rounds 7] [--json PATH]

The scheduler's selection (`buffer.scheduler.select`: contexts of every arm, the bandit scorer's prediction and
neural-linear UCB bonus, the top-p-per-group and top-K selection) runs on `--candidates` arms: a realistic mix of
fresh rollouts of the last rounds (40 %) and replayable history (60 %, already used 1 to 3 times), in whole groups,
with rewards, lengths, entropies, tool calls and policy versions of the shapes a search agent produces. The scorer
has a full window of past selections (its exploration matrix built), so scoring costs what it costs mid-run; one
scorer update (`observe`: the fit on the window) is timed too, since a round makes one.

Two baselines run in the same rounds, alternating (A B C A B C ...):
- a learner step: a bare training step (forward, cross-entropy, backward, AdamW) of the tiny model shape
  (Qwen2, hidden 128, 2 layers, vocab 2048) on 16 episodes of 800 tokens, the batch `bench/learner.py` trains on.
  Selection must take well under this: the figure of merit is selection time / step time (median over rounds).
  A real model's step is orders of magnitude longer, so this is the strictest step there is;
- a plain top-K of precomputed scores over the same number of candidates (`np.argpartition`): the least any
  selection costs, to show what the contexts and the scorer add.

`learner_steps_to_target` is the hook for the end-to-end part of the issue (learner steps to reach a held-out
success rate with the bandit against FIFO); it needs the held-out evaluation and is not measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def make_arms(count: int, group_size: int, seed: int, learner_version: int = 40):
    """`count` arms in whole groups: 40 % fresh (never used), 60 % history (used 1-3 times)."""
    import numpy as np

    from longhaul.buffer.scheduler import Arm

    rng = np.random.default_rng(seed)
    arms = []
    groups = -(-count // group_size)
    for g in range(groups):
        fresh = g < 0.4 * groups
        version = int(learner_version - rng.integers(0, 5))
        rewards = (rng.random(group_size) < rng.random()).astype(float)  # a task's difficulty, then outcomes
        std = float(rewards.std(ddof=1))
        for m in range(min(group_size, count - len(arms))):
            arms.append(Arm(
                trajectory_id=f"t{g}-{m}", group_id=f"g{g}", reward=float(rewards[m]),
                advantage=float((rewards[m] - rewards.mean()) / std) if std > 0 else 0.0, group_std=std,
                length=int(rng.lognormal(8, 1)), entropy=float(rng.gamma(2, 0.3)), tool_calls=int(rng.integers(0, 60)),
                oldest_version=version - int(rng.integers(0, 3)),
                arrival_round=int(learner_version - rng.integers(0, 4)),
                uses=0 if fresh else int(rng.integers(1, 4)), trained_round=-1 if fresh else version))
    return arms


def learner_steps_to_target(sampler: str, target_success_rate: float) -> int:
    """Learner steps until the held-out success rate reaches `target_success_rate`, training with `sampler`
    ("bandit" or "fifo"). The end-to-end half of issue 6, waiting on the held-out evaluation."""
    raise NotImplementedError("needs the held-out evaluation (another issue); this benchmark measures selection speed")


def tiny_step_baseline(batch: int, tokens: int):
    """A bare training step of the tiny model's shape on `batch` random episodes of `tokens` tokens."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longhaul.config import ModelConfig

    shape = ModelConfig()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, max_position_embeddings=max(tokens, 1024), tie_word_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, shape.vocab_size, (batch, tokens))

    def step() -> None:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="K: trajectories selected per round")
    parser.add_argument("--top-p", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--step-batch", type=int, default=16, help="episodes in the baseline learner step")
    parser.add_argument("--step-tokens", type=int, default=800, help="tokens per episode in the baseline step")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from longhaul.buffer.scheduler import FEATURES, WINDOW, NeuralUCBScorer, context_matrix, select

    arms = make_arms(args.candidates, args.group_size, seed=0)
    scorer = NeuralUCBScorer(len(FEATURES), seed=0)
    rng = np.random.default_rng(1)
    window_arms = make_arms(WINDOW * args.batch, args.group_size, seed=2)
    for start in range(0, len(window_arms), args.batch):  # a full window: the fit and the bonus at their mid-run cost
        _, chosen = select(window_arms[start:start + args.batch], scorer, learner_version=40, round_=40,
                           k=args.batch, top_p=1.0, max_times=4, max_staleness=8)
        scorer.observe(context_matrix([window_arms[start + i] for i in chosen], 40, 40), float(rng.normal()))
    scores = rng.random(args.candidates)
    step = tiny_step_baseline(args.step_batch, args.step_tokens)
    step()  # warm-up

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def selection() -> None:
        contexts, chosen = select(arms, scorer, learner_version=40, round_=41, k=args.batch, top_p=args.top_p,
                                  max_times=4, max_staleness=8)
        assert len(chosen) == args.batch
        scorer.predicted(contexts[chosen])

    def top_k() -> None:
        np.argpartition(-scores, args.batch)[:args.batch]

    rows = []
    print(f"{args.candidates} candidates in groups of {args.group_size}, K={args.batch}, top_p={args.top_p}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for r in range(args.rounds):
        select_s = timed(selection)
        step_s = timed(step)
        top_k_s = timed(top_k)
        contexts = np.random.default_rng(r).normal(size=(args.batch, len(FEATURES))).astype(np.float32)
        update_s = timed(lambda c=contexts: scorer.observe(c, 0.0))
        rows.append({"select_s": select_s, "update_s": update_s, "step_s": step_s, "top_k_s": top_k_s,
                     "select_over_step": select_s / step_s, "select_over_top_k": select_s / top_k_s})
        print(f"  round {r + 1}/{args.rounds}: select {select_s * 1e3:8.1f} ms, scorer update {update_s * 1e3:6.1f} ms,"
              f" learner step {step_s * 1e3:8.1f} ms, plain top-K {top_k_s * 1e3:6.2f} ms", flush=True)

    def summary(key: str) -> dict:
        values = [row[key] for row in rows]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    figures = {key: summary(key) for key in rows[0]}
    print()
    for key, label in [("select_over_step", "selection / learner step"),
                       ("select_over_top_k", "selection / plain top-K")]:
        f = figures[key]
        print(f"{label:28s} median {f['median']:.4f}  [{f['min']:.4f}-{f['max']:.4f}]")
    for key in ("select_s", "update_s", "step_s", "top_k_s"):
        print(f"{key:28s} median {figures[key]['median'] * 1e3:9.2f} ms")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "rounds": rows, "figures": figures}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
