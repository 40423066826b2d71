"""The scripted expert's demonstrations: agent-loop episodes against a real gRPC tool server, no engine needed."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from longhaul.actors.agent_loop import ChatFormat, run_episode
from longhaul.actors.demonstrations import DemonstrationMix, choose_tasks, demonstrate, expert_calls
from longhaul.actors.engine import Generation
from longhaul.actors.search_world import SearchWorld
from longhaul.actors.tool_service import TaskInfo, ToolClient, serve
from longhaul.config import AgentConfig, ToolServiceConfig, WorldConfig
from longhaul.trajectory import decode_trajectory, encode_trajectory

# Hop counts up to 16, the long-horizon regime, in a world that still builds in a blink.
WORLD = WorldConfig(num_entities=120, num_tasks=64, max_hops=16, test_fraction=0.25)
AGENT = AgentConfig(max_turns=64, max_episode_tokens=16384, constrained_tool_calls=False)
TOP_K = ToolServiceConfig().search_top_k


@pytest.fixture(scope="module")
def world() -> SearchWorld:
    return SearchWorld.generate(WORLD)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def play(world, tasks, tokenizer, *, agent=AGENT, seed=0, first_index=0):
    async def scenario():
        server, port = await serve(ToolServiceConfig(), world)
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig()) as tools:
                return await demonstrate(world, tasks, tools=tools, chat=ChatFormat(tokenizer), tokenizer=tokenizer,
                                         agent=agent, top_k=TOP_K, seed=seed, first_index=first_index)
        finally:
            await server.stop(0)

    return asyncio.run(scenario())


def masked_spans(trajectory) -> list[list[int]]:
    """The runs of mask-1 tokens, in order."""
    spans, ids, mask = [], trajectory.token_ids.tolist(), trajectory.loss_mask.tolist()
    for i, m in enumerate(mask):
        if m and (i == 0 or not mask[i - 1]):
            spans.append([])
        if m:
            spans[-1].append(ids[i])
    return spans


def test_a_demonstration_is_the_chat_templates_rendering_of_its_conversation_with_mask_1_on_the_expert_turns(
        world, tokenizer):
    task = next(t for t in world.tasks("train") if t.hops == 3)
    [demo] = play(world, [task], tokenizer)
    calls = expert_calls(world, task, random.Random("longhaul-demonstrations:0:0"), top_k=TOP_K)
    # The conversation written out by hand: what a search returns and what a page says come from the world, in the
    # agent loop's format; the chat template renders it as a whole.
    # The question ends with its chain length (agent.state_hops).
    messages = [{"role": "system", "content": AGENT.system_prompt},
                {"role": "user", "content": f"{task.question}\nHops: 3"}]
    for call in calls:
        messages.append({"role": "assistant", "content": "",
                         "tool_calls": [{"function": {"name": call.name, "arguments": call.arguments}}]})
        if call.name == "search":
            hits = world.search(call.arguments["query"], TOP_K)
            messages.append({"role": "tool", "content": "\n".join(f"[{h.doc_id}] {h.title}: {h.snippet}"
                                                                  for h in hits)})
        elif call.name == "open":
            messages.append({"role": "tool", "content": world.open(call.arguments["doc_id"])})
    rendered = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    newline = tokenizer.encode("\n", add_special_tokens=False)
    # The episode ends on the answer turn's <|im_end|>; the template adds the newline that would follow it.
    assert demo.token_ids.tolist() + newline == rendered
    expected_turns = [tokenizer.encode(f"<tool_call>\n{json.dumps({'name': c.name, 'arguments': c.arguments})}\n"
                                       "</tool_call>", add_special_tokens=False) for c in calls]
    assert masked_spans(demo) == expected_turns
    mask = demo.loss_mask.tolist()
    span_starts = [i for i, m in enumerate(mask) if m and not mask[i - 1]]
    assert demo.turn_offsets.tolist() == span_starts + [len(mask)]  # each turn starts where the expert writes
    assert (demo.num_turns, demo.num_tool_calls, demo.finish_reason) == (len(calls), len(calls), "answer")
    assert set(demo.behavior_logprobs[demo.loss_mask == 1].tolist()) == {0.0}
    assert set(demo.versions[demo.loss_mask == 1].tolist()) == {0}
    decode_trajectory(encode_trajectory(demo))  # the buffer's reader accepts it


def test_without_state_hops_the_user_turn_is_the_bare_question(world, tokenizer):
    task = next(t for t in world.tasks("train") if t.hops == 3)
    [demo] = play(world, [task], tokenizer, agent=AGENT.model_copy(update={"state_hops": False}))
    prompt = demo.token_ids[:demo.turn_offsets[0]].tolist()
    assert prompt == ChatFormat(tokenizer).prompt_ids(AGENT.system_prompt, task.question)


def test_replaying_a_demonstrations_turns_through_the_agent_loop_rebuilds_its_tokens_exactly(world, tokenizer):
    task = next(t for t in world.tasks("train") if t.hops == 5)
    [demo] = play(world, [task], tokenizer)

    class Replay:  # keeps the engine's contract: each generate returns the next recorded turn
        def __init__(self, turns):
            self.turns = iter(turns)

        async def generate(self, prompt_token_ids, **_):
            ids = next(self.turns)
            return Generation(ids, [0.0] * len(ids), [0] * len(ids), "stop")

    async def replay():
        server, port = await serve(ToolServiceConfig(), world)
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig()) as tools:
                info = TaskInfo(task.task_id, task.question, task.hops, task.split)
                return await run_episode(info, engine=Replay(masked_spans(demo)), tools=tools,
                                         chat=ChatFormat(tokenizer), config=AGENT, group_id="g", actor_id="a")
        finally:
            await server.stop(0)

    again = asyncio.run(replay())
    assert again.token_ids.tolist() == demo.token_ids.tolist()
    assert again.loss_mask.tolist() == demo.loss_mask.tolist()
    assert again.turn_offsets.tolist() == demo.turn_offsets.tolist()


def test_demonstrations_answer_correctly_and_16_hop_tasks_take_40_or_more_tool_calls(world, tokenizer):
    tasks = choose_tasks(world, DemonstrationMix(count=12, hop_weights={1: 1, 2: 1, 16: 1}), seed=0)
    demos = play(world, tasks, tokenizer)
    assert {t.hops for t in tasks} == {1, 2, 16}
    for task, demo in zip(tasks, demos, strict=True):
        assert (demo.finish_reason, demo.reward_parts["exact_match"], demo.reward_parts["evidence_recall"]) == (
            "answer", 1.0, 1.0)
        assert demo.reward == 1.0 + AGENT.evidence_reward
        # Per hop at least a search and the open of its page, then the answer.
        assert demo.num_tool_calls >= 2 * task.hops + 1
        if task.hops == 16:
            assert demo.num_tool_calls >= 40, (task.task_id, demo.num_tool_calls)


def test_demonstrations_are_deterministic_from_the_seed_and_detours_change_with_it(world, tokenizer):
    tasks = choose_tasks(world, DemonstrationMix(count=4, hop_weights={16: 1}), seed=3)
    assert tasks == choose_tasks(world, DemonstrationMix(count=4, hop_weights={16: 1}), seed=3)
    first, second = play(world, tasks, tokenizer, seed=3), play(world, tasks, tokenizer, seed=3)
    assert [d.token_ids.tolist() for d in first] == [d.token_ids.tolist() for d in second]
    assert [d.trajectory_id for d in first] == [d.trajectory_id for d in second]
    # The mis-clicks are drawn per seed: over four 16-hop tasks another seed takes another path somewhere.
    assert any(expert_calls(world, t, random.Random(0), top_k=TOP_K) != expert_calls(world, t, random.Random(1),
                                                                                        top_k=TOP_K)
               for t in tasks)


def test_tasks_played_in_parts_from_their_own_index_give_the_records_played_whole(world, tokenizer):
    tasks = choose_tasks(world, DemonstrationMix(count=5, hop_weights={2: 1, 16: 1}), seed=3)
    whole = play(world, tasks, tokenizer, seed=3)
    parts = play(world, tasks[:2], tokenizer, seed=3) + play(world, tasks[2:], tokenizer, seed=3, first_index=2)
    assert [d.trajectory_id for d in parts] == [d.trajectory_id for d in whole]
    assert [d.token_ids.tolist() for d in parts] == [d.token_ids.tolist() for d in whole]
    # The index is what draws the detours: the tail played from index 0 is another set of records.
    assert [d.trajectory_id for d in play(world, tasks[2:], tokenizer, seed=3)] != [d.trajectory_id
                                                                                    for d in whole[2:]]


def test_constrained_demonstrations_write_compact_json_and_end_their_turn_as_the_grammar_does(world, tokenizer):
    task = next(t for t in world.tasks("train") if t.hops == 2)
    agent = AGENT.model_copy(update={"constrained_tool_calls": True})
    [demo] = play(world, [task], tokenizer, agent=agent)
    chat = ChatFormat(tokenizer)
    calls = expert_calls(world, task, random.Random("longhaul-demonstrations:0:0"), top_k=TOP_K)
    assert masked_spans(demo) == [
        tokenizer.encode(json.dumps({"name": c.name, "arguments": c.arguments}, separators=(",", ":")),
                         add_special_tokens=False) + [chat.im_end] for c in calls]
    offsets = demo.turn_offsets.tolist()
    for k in range(demo.num_turns):  # the loop's `<tool_call>\n` opens every turn, with mask 0
        assert demo.token_ids[offsets[k]:offsets[k] + len(chat.call_prefix)].tolist() == chat.call_prefix
    assert (demo.finish_reason, demo.reward_parts["exact_match"]) == ("answer", 1.0)


def test_under_argument_choices_every_expert_call_is_one_the_policy_could_write(world, tokenizer):
    """The expert plays through the same per-turn schema a constrained policy gets (ScriptedPolicy refuses a call
    the schema does not admit), over every hop count of the world, and still answers correctly."""
    tasks = choose_tasks(world, DemonstrationMix(count=32, hop_weights={h: 1 for h in range(1, 17)}), seed=0)
    agent = AGENT.model_copy(update={"constrained_tool_calls": True, "argument_choices": True})
    demos = play(world, tasks, tokenizer, agent=agent)
    assert [(d.finish_reason, d.reward_parts["exact_match"]) for d in demos] == [("answer", 1.0)] * len(tasks)


def test_an_answer_earns_its_f1_plus_evidence_reward_times_the_chain_read_and_no_answer_earns_nothing(world, tokenizer):
    from longhaul.actors.demonstrations import ScriptedPolicy
    from longhaul.actors.tool_calls import ToolCall

    task = next(t for t in world.tasks("train") if t.hops == 2)
    expert = expert_calls(world, task, random.Random(0), top_k=TOP_K)
    first_hop = expert[:expert.index(ToolCall("open", {"doc_id": task.evidence_doc_ids[0]})) + 1]
    agent = AGENT.model_copy(update={"evidence_reward": 0.5, "max_turns": len(first_hop)})
    chat = ChatFormat(tokenizer)

    async def episodes():
        server, port = await serve(ToolServiceConfig(), world)
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig()) as tools:
                info = TaskInfo(task.task_id, task.question, task.hops, task.split)

                async def play(calls, config):
                    policy = ScriptedPolicy(calls, tokenizer, chat, constrained=False)
                    return await run_episode(info, engine=policy, tools=tools, chat=chat, config=config,
                                             group_id="g", actor_id="a")

                unlimited = agent.model_copy(update={"max_turns": 64})
                return (await play(expert, unlimited),
                        await play(first_hop + [ToolCall("answer", {"answer": "wrong"})], unlimited),
                        await play(first_hop, agent))  # the turns run out before it answers
        finally:
            await server.stop(0)

    solved, half_read, unanswered = asyncio.run(episodes())
    assert (solved.reward, solved.reward_parts) == (1.5, {"exact_match": 1.0, "f1": 1.0, "evidence_recall": 1.0})
    assert (half_read.reward, half_read.reward_parts) == (0.25, {"exact_match": 0.0, "f1": 0.0,
                                                                 "evidence_recall": 0.5})
    assert (unanswered.finish_reason, unanswered.reward, unanswered.reward_parts) == (
        "max_turns", 0.0, {"exact_match": 0.0, "f1": 0.0})
