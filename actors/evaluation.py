"""Held-out evaluation: a policy plays a fixed list of test tasks, one episode each; nothing goes to the buffer.

Training reward says how the policy does on the tasks it trains on, at its sampling temperature. Whether it learned
to search is the question for tasks it never saw: the world's `test` split, which no actor draws from
(`actor.split` is `train`). `evaluate` plays those with the same agent loop, usually greedily (temperature 0), so two
evaluations of the same weights on the same engine settings play the same episodes, and reports exact-match success,
mean F1, tool calls and how episodes ended. Per hop count too: a policy that solves 1-hop questions and none of the
16-hop ones looks very different from one that solves a few of each.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from longhaul.actors.agent_loop import ChatFormat, run_episode
from longhaul.actors.engine import InferenceEngine
from longhaul.actors.tool_service import TaskInfo, ToolClient
from longhaul.config import AgentConfig, LonghaulConfig
from longhaul.trajectory import Trajectory


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Figures of one evaluation; every mean is over `episodes`."""

    episodes: int
    success_rate: float
    """Share of episodes whose answer matched exactly (after SQuAD normalisation)."""
    mean_f1: float
    """Mean token F1 of the answers (0 for an episode that gave none): the training reward, less any evidence
    reward (`agent.evidence_reward`)."""
    mean_tool_calls: float
    max_tool_calls: int
    finish_reasons: dict[str, int]
    success_by_hops: dict[int, float]
    """Success rate per hop count of the tasks."""
    versions: tuple[int, int]
    """Oldest and newest policy version that generated a token of the episodes ((-1, -1) if none did): one version
    unless the weights changed while the evaluation ran."""
    trajectories: list[Trajectory] = field(repr=False)

    def summary(self) -> dict:
        """The figures as plain JSON-able values (no trajectories)."""
        return {"episodes": self.episodes, "success_rate": self.success_rate, "mean_f1": self.mean_f1,
                "mean_tool_calls": self.mean_tool_calls, "max_tool_calls": self.max_tool_calls,
                "finish_reasons": self.finish_reasons,
                "success_by_hops": {str(h): s for h, s in sorted(self.success_by_hops.items())},
                "versions": list(self.versions)}


async def held_out_tasks(tools: ToolClient, limit: int | None = None, *, split: str = "test",
                         hops: Collection[int] | None = None) -> list[TaskInfo]:
    """The first `limit` tasks of `split` in task id order (all of them if None), only those of the given hop counts
    if `hops`: a fixed list, the same on every call against a server of the same world. The split is balanced over
    hop counts, and so is a prefix of it only roughly; pass None for the exact balance."""
    tasks: list[TaskInfo] = []
    offset: int | None = 0
    while offset is not None and (limit is None or len(tasks) < limit):
        page = await tools.list_tasks(split, offset, 1000)
        tasks += [t for t in page.tasks if hops is None or t.hops in hops]
        offset = page.next_offset
    return tasks[:limit]


async def evaluate_model(model_dir: str | Path, config: LonghaulConfig, *,
                         split: str = "test") -> EvalResult:
    """`evaluate` a model directory on its own, as `config.evaluation` says: a tool server of the run's world and an
    engine of the model, both in this process (`longhaul evaluate`, and a run's model before its warm-up; a run
    evaluates its policy on its actors instead). `split="train"` plays training tasks instead, to tell what the
    policy generalises from what it memorised (`bench/answer_turn.py`)."""
    from transformers import AutoTokenizer

    from longhaul.actors.tool_service import serve

    server, port = await serve(config.tools.model_copy(update={"simulated_latency_s": 0.0}), config.world)
    policy = None
    try:
        policy = await InferenceEngine(str(model_dir), config.engine).start()
        async with ToolClient(f"127.0.0.1:{port}", config.tools) as client:
            return await evaluate_held_out(config, engine=policy, tools=client,
                                           chat=ChatFormat(AutoTokenizer.from_pretrained(model_dir)), split=split)
    finally:
        if policy is not None:
            policy.shutdown()
        await server.stop(0)


async def evaluate_held_out(config: LonghaulConfig, *, engine: InferenceEngine, tools: ToolClient,
                            chat: ChatFormat, split: str = "test") -> EvalResult:
    """`evaluate` the held-out tasks `config.evaluation` names (of `split`), with `config.agent` at the evaluation's
    temperature and turn limit."""
    settings = config.evaluation
    tasks = await held_out_tasks(tools, settings.tasks, split=split, hops=settings.hops)
    return await evaluate(tasks, engine=engine, tools=tools,
                          chat=chat, agent=config.agent.model_copy(update={
                              "temperature": settings.temperature,
                              "max_turns": settings.max_turns or config.agent.max_turns}),
                          concurrency=settings.concurrency)


async def evaluate(tasks: list[TaskInfo], *, engine: InferenceEngine, tools: ToolClient, chat: ChatFormat,
                   agent: AgentConfig, concurrency: int = 64) -> EvalResult:
    """Play each task once with `agent` (set `temperature=0` for a deterministic, greedy evaluation), at most
    `concurrency` episodes at a time, and grade the episodes. The trajectories are returned, never stored."""
    if not tasks:
        raise ValueError("no tasks to evaluate on")
    slots = asyncio.Semaphore(concurrency)

    async def play(task: TaskInfo) -> Trajectory:
        async with slots:
            return await run_episode(task, engine=engine, tools=tools, chat=chat, config=agent,
                                     group_id=f"eval-{task.task_id}", actor_id="evaluation")

    trajectories = list(await asyncio.gather(*(play(task) for task in tasks)))
    return grade_episodes(tasks, trajectories)


def grade_episodes(tasks: list[TaskInfo], trajectories: list[Trajectory]) -> EvalResult:
    """The figures of one episode per task (`trajectories[i]` played `tasks[i]`)."""
    n = len(trajectories)
    exact = [t.reward_parts.get("exact_match", 0.0) for t in trajectories]
    by_hops: dict[int, list[float]] = {}
    for task, score in zip(tasks, exact, strict=True):
        by_hops.setdefault(task.hops, []).append(score)
    oldest = [t.oldest_version() for t in trajectories if t.oldest_version() >= 0]
    newest = [t.newest_version() for t in trajectories]
    return EvalResult(
        episodes=n, success_rate=sum(exact) / n, mean_f1=sum(t.reward_parts.get("f1", 0.0) for t in trajectories) / n,
        mean_tool_calls=sum(t.num_tool_calls for t in trajectories) / n,
        max_tool_calls=max(t.num_tool_calls for t in trajectories),
        finish_reasons=dict(sorted(Counter(t.finish_reason for t in trajectories).items())),
        success_by_hops={h: sum(s) / len(s) for h, s in sorted(by_hops.items())},
        versions=(min(oldest), max(newest)) if oldest else (-1, -1), trajectories=trajectories)
