"""The warm start of `longhaul train`: a tiny policy that cannot write a tool call yet first imitates an expert.

A random model earns reward 0 on every episode, and group advantages of all-zero rewards are zero: RL alone never
starts. With `warmup.enabled`, the run first has the scripted expert (`actors/demonstrations.py`) play train tasks
against an in-process tool server of the run's world, then fits the model to those episodes for a few minutes
(`learner/warmup.py`, REDSearcher's mid-training in miniature). Actors and learner start from the result.

The warmed-up model is kept in the run's directory: a resumed run, or a rerun of the same run name, reuses it.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from longhaul.config import LonghaulConfig

# Beyond a few processes, each one's start (imports, the world) outweighs its share of the episodes.
_MAX_EXPERT_PROCESSES = 8


def warm_start(config: LonghaulConfig, base_model_dir: Path, *, report: Callable[[str], None] = print,
               before: Callable[[Path], None] | None = None) -> Path:
    """The model the run starts from: `base_model_dir` itself without a warm-up, else the warmed-up model in
    `warmup.output_dir` (built now unless a complete one is there). `report` gets one line per phase; `before`, if
    given, gets `base_model_dir` before a warm-up is built, while another process builds its demonstrations (the
    run evaluates the model there)."""
    from longhaul.actors.tiny_model import ModelDirError, validate_model_dir

    settings = config.warmup
    if not (settings.enabled if settings.enabled is not None else config.model.path is None):
        return base_model_dir
    out_dir = settings.output_dir or config.output_dir / "warmup_model"
    if out_dir.is_dir() and any(out_dir.iterdir()):
        try:
            validate_model_dir(out_dir)
        except ModelDirError as error:
            raise RuntimeError(f"{out_dir} holds something that is not a model ({error}): delete it, or point "
                               "warmup.output_dir elsewhere") from error
        report(f"  warm-up    reusing {out_dir}")
        return out_dir

    started = time.monotonic()
    # The expert plays in processes of their own, one per core, each a share of the tasks: an expert episode is
    # single-threaded Python (measured on 2 cores: 101 s in one process). `before` evaluates the base model
    # meanwhile, its engine in a process of its own too (118 s for both, against 88 s + 113 s one after the other).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parts = min(cores, _MAX_EXPERT_PROCESSES)
    with ProcessPoolExecutor(max_workers=parts, mp_context=multiprocessing.get_context("spawn")) as expert:
        pending = [expert.submit(play_demonstrations, config, base_model_dir, part, parts) for part in range(parts)]
        if before is not None:
            before(base_model_dir)
        demonstrations = [d for share in pending for d in share.result()]
    tokens = sum(d.num_tokens for d in demonstrations)
    report(f"  warm-up    {len(demonstrations)} expert episodes ({tokens:,} tokens, up to "
           f"{max(d.num_tool_calls for d in demonstrations)} tool calls) ready {time.monotonic() - started:.0f} s "
           f"after they were started; imitating them for up to {settings.max_steps} steps or "
           f"{settings.time_budget_s:.0f} s ...")
    from longhaul.learner.warmup import warm_up

    shown = [-math.inf]  # when the last progress line was written

    def progress(step: int, total: int, loss: float, seconds: float) -> None:
        if seconds - shown[0] >= 30 or step == total:
            report(f"  warm-up    step {step}/{total}  loss {loss:.3f}  {seconds:.0f} s")
            shown[0] = seconds

    result = warm_up(base_model_dir, out_dir, demonstrations, settings, on_step=progress)
    report(f"  warm-up    {result.steps} steps in {result.seconds:.0f} s: loss {result.loss_first:.3f} -> "
           f"{result.loss_last:.3f}; model {out_dir}")
    return out_dir


def play_demonstrations(config: LonghaulConfig, model_dir: Path, part: int = 0, parts: int = 1):
    """Share `part` of `parts` of the run's demonstrations (`config.warmup`): a contiguous slice of its tasks, as
    they would be played whole."""
    from transformers import AutoTokenizer

    from longhaul.actors.agent_loop import ChatFormat
    from longhaul.actors.demonstrations import DemonstrationMix, choose_tasks, demonstrate
    from longhaul.actors.search_world import SearchWorld
    from longhaul.actors.tool_service import ToolClient, serve

    settings = config.warmup
    world = SearchWorld.generate(config.world)
    hops = settings.hop_weights or {h: 1.0 for h in range(config.world.min_hops, config.world.max_hops + 1)}
    tasks = choose_tasks(world, DemonstrationMix(settings.demonstrations, hops), settings.seed)
    start, stop = len(tasks) * part // parts, len(tasks) * (part + 1) // parts
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The expert's episodes need real tool answers: not the benchmarks' simulated slowness, and no timeout while the
    # server, sharing this event loop with thousands of episodes, is slow to answer (a timed-out search would leave
    # the expert's next call outside what the episode has shown).
    tools_config = config.tools.model_copy(update={"simulated_latency_s": 0.0, "deadline_s": 600.0})

    async def play():
        server, port = await serve(tools_config, world)
        try:
            async with ToolClient(f"127.0.0.1:{port}", tools_config) as tools:
                return await demonstrate(world, tasks[start:stop], tools=tools, chat=ChatFormat(tokenizer),
                                         tokenizer=tokenizer, agent=config.agent, top_k=tools_config.search_top_k,
                                         seed=settings.seed, first_index=start)
        finally:
            await server.stop(0)

    return asyncio.run(play())
