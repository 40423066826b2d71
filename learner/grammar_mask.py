"""The tokens a constrained turn's grammar admitted, position by position, so the learner scores what was sampled.

Under structured outputs vLLM masks the logits to the tokens the turn's grammar admits before it samples, and the
behaviour logprobs it reports come from those masked logits: log μ(a) = z_a − logsumexp over the admitted set. A
learner that scores the same token with a log-softmax over the whole vocabulary computes a different quantity, lower
by the log of the mass its policy puts on admitted tokens, on every constrained token; summed over an episode the
importance ratio collapses (measured on the warmed-up tiny model: log π − log μ of −50 to −130 per episode at
staleness 0). So the learner replays each constrained turn through the same grammar compiler vLLM uses (xgrammar,
compact JSON, the request's stop tokens), and renormalises its own logits over the same admitted sets.

Compiling a turn's schema is most of that replay's cost (xgrammar precomputes masks for every state of the grammar:
~6 ms for an argument-choices schema, each one new), and the learner would spend it on every constrained turn it
trains. An argument-choices schema admits a finite set of calls, and those turns are walked through
`longhaul/call_grammar.py` instead: the same walk the engine's sampler makes when it constrains them
(`actors/choice_masks.py`), bit for bit the masks xgrammar computes (`tests/test_grammar_mask.py`). Any other schema
goes through xgrammar.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from longhaul.actors.tiny_model import IM_END
from longhaul.actors.tool_calls import TOOL_CALL_END
from longhaul.call_grammar import CallTokens, choice_calls
from longhaul.trajectory import Trajectory

# What `actors/agent_loop.py` passes as the turn's `stop_token_ids`; vLLM adds the model's EOS ids to them, and the
# grammar admits all of them once the JSON is complete.
TURN_STOP_TOKENS = (IM_END, TOOL_CALL_END)


class GrammarMasks:
    """Admitted-token bitmasks of the constrained turns of trajectories, for one model's tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._calls = CallTokens([bytes(text) for text in info.decoded_vocab[:vocab_size]], self.stop_token_ids)
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=True)
        # A step's turns repeat few schemas (the plain tool-call one) among many one-off argument-choice ones.
        self._compile = lru_cache(maxsize=4096)(
            lambda schema: compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":")))

    @classmethod
    def for_model(cls, model_dir: str | Path, vocab_size: int) -> GrammarMasks:
        """The masks of the model in `model_dir`, with the stop tokens the engine gives a turn: the agent loop's and
        the tokenizer's and generation config's EOS ids (`SamplingParams.all_stop_token_ids`)."""
        from transformers import AutoTokenizer, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        stops = [tokenizer.convert_tokens_to_ids(token) for token in TURN_STOP_TOKENS]
        stops = [i for i in stops if isinstance(i, int) and i != tokenizer.unk_token_id]
        if tokenizer.eos_token_id is not None:
            stops.append(tokenizer.eos_token_id)
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        stops += [eos] if isinstance(eos, int) else list(eos or [])
        return cls(tokenizer, vocab_size, stops)

    def admitted(self, trajectory: Trajectory) -> tuple[np.ndarray, torch.Tensor]:
        """`(positions, bitmask)` over the generated tokens of `trajectory`'s constrained turns: each token's index
        in `token_ids`, and the int32 bitmask ([P, ceil(vocab/32)], xgrammar's layout: bit j of word w admits
        token 32·w + j) of what its turn's grammar admitted right before it.

        Raises ValueError naming the turn if a generated token is one the grammar refuses: the trajectory was not
        generated under that grammar, and scoring it under one would be wrong."""
        positions: list[int] = []
        masks: list[torch.Tensor] = []
        offsets, generated = trajectory.turn_offsets, trajectory.loss_mask
        for turn, schema in enumerate(trajectory.turn_grammars):
            if not schema:
                continue
            start, end = int(offsets[turn]), int(offsets[turn + 1])
            turn_positions = start + np.flatnonzero(generated[start:end])
            if len(turn_positions) == 0:
                continue
            try:
                masks.append(self.bitmask(schema, trajectory.token_ids[turn_positions].tolist()))
            except ValueError as error:
                raise ValueError(f"turn {turn}: {error}") from None
            positions += turn_positions.tolist()
        if not masks:
            return np.zeros(0, dtype=np.int64), torch.zeros(0, -(-self.vocab_size // 32), dtype=torch.int32)
        return np.asarray(positions, dtype=np.int64), torch.cat(masks)

    def bitmask(self, schema: str, tokens: list[int]) -> torch.Tensor:
        """The int32 bitmask [len(tokens), ceil(vocab/32)] of what `schema` admitted before each of `tokens`, written
        in order from the start of a turn. Raises ValueError if it refuses one of them."""
        calls = choice_calls(schema)
        return self._replay(schema, tokens) if calls is None else self._replay_calls(calls, schema, tokens)

    def _replay_calls(self, calls: list[bytes], schema: str, tokens: list[int]) -> torch.Tensor:
        """`bitmask` of a grammar whose language is the finite set `calls`."""
        rows: list[int] = []
        admitted: list[int] = []
        walk = self._calls.walk(calls)
        for row, token in enumerate(tokens):
            allowed = walk.admitted()
            rows += [row] * len(allowed)
            admitted += allowed
            if token in self.stop_token_ids:
                if not walk.complete:
                    raise self._refused(token, row, schema)
                if row + 1 < len(tokens):
                    raise ValueError("generated tokens after the grammar's stop token")
                break
            if not walk.advance(token):
                raise self._refused(token, row, schema)
        bits = np.zeros((len(tokens), -(-self.vocab_size // 32)), dtype=np.uint32)
        ids = np.asarray(admitted, dtype=np.int64)
        np.bitwise_or.at(bits, (np.asarray(rows, dtype=np.int64), ids >> 5),
                         np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)))
        return torch.from_numpy(bits.view(np.int32))

    @staticmethod
    def _refused(token: int, row: int, schema: str) -> ValueError:
        return ValueError(f"token {token}, the turn's generated token {row}, is not admitted by its grammar "
                          f"{schema:.120}")

    def _replay(self, schema: str, tokens: list[int]) -> torch.Tensor:
        """`bitmask` through xgrammar: the schema compiled, and a matcher walked along `tokens`."""
        matcher = self._xgr.GrammarMatcher(self._compile(schema), override_stop_tokens=self.stop_token_ids)
        bitmask = self._xgr.allocate_token_bitmask(len(tokens), self.vocab_size)
        for row, token in enumerate(tokens):
            if matcher.is_terminated():
                # vLLM stops constraining after the stop token: nothing follows it in a turn.
                raise ValueError("generated tokens after the grammar's stop token")
            matcher.fill_next_token_bitmask(bitmask, row)
            if not matcher.accept_token(token):
                raise self._refused(token, row, schema)
        return bitmask


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[P, words] int32 bitmask → [P, vocab_size] bool: True where the token is admitted."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab_size]

