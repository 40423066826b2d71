"""The grammar of an argument-choices turn: a finite set of calls, and the tokens that continue them.

`ArgumentChoices.schema` (actors) offers a turn one JSON schema whose language is a finite set of compact calls,
`{"name":"open","arguments":{"doc_id":"d0002"}}` and its like. Both sides of the system walk that language token by
token, and must agree to the bit: the engine masks its logits to what the grammar admits before it samples
(`actors/choice_masks.py`), and the learner scores each generated token renormalised over the same admitted set
(`learner/grammar_mask.py`). A difference would make every importance ratio compare two distributions.

Over a finite set of strings the masks follow from the texts alone, with no grammar to compile: after `written` bytes
of the turn, a token is admitted where its bytes continue one of the calls still open, and a stop token where one is
complete. That is what xgrammar computes for these schemas, bit for bit (`tests/test_grammar_mask.py`), at a fraction
of its cost: xgrammar precomputes a mask for every state of every new schema (3-7 ms a turn, and every turn's schema
is new), while a turn visits one state per token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

# What JSON writes inside a string as it is: printable ASCII but the quote and the backslash.
_VERBATIM = re.compile(r'[ !#-\[\]-~]*')


def choice_calls(schema: str) -> list[bytes] | None:
    """Every call an argument-choices schema (`ArgumentChoices.schema`, serialised) admits, as the compact JSON the
    engine writes it in; None for a schema of any other shape, or one naming a string JSON would escape."""
    try:
        spec = json.loads(schema)
        if spec.keys() != {"anyOf"}:
            return None
        calls = []
        for alternative in spec["anyOf"]:
            properties = alternative["properties"]
            name, arguments = properties["name"]["const"], properties["arguments"]
            [argument] = arguments["required"]
            choices = arguments["properties"][argument]["enum"]
            expected = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                        "properties": {"name": {"const": name}, "arguments": {
                            "type": "object", "additionalProperties": False, "required": [argument],
                            "properties": {argument: {"enum": choices}}}}}
            strings = [name, argument, *choices]
            if alternative != expected or not all(isinstance(x, str) and _VERBATIM.fullmatch(x) for x in strings):
                return None
            calls += [f'{{"name":"{name}","arguments":{{"{argument}":"{choice}"}}}}'.encode() for choice in choices]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return calls or None


class CallTokens:
    """A vocabulary, as the bytes each token writes, for walking a finite set of calls one token at a time.

    A walk's state is the calls still open and the bytes written so far (a prefix of every open call): `admitted`
    says what may come next, `continuing` what stays open after a token."""

    def __init__(self, token_bytes: Sequence[bytes], stop_token_ids: Iterable[int]):
        self.vocab_size = len(token_bytes)
        self.stop_token_ids = sorted(set(stop_token_ids))
        stops = set(self.stop_token_ids)
        # A stop token only ends a turn: it writes nothing, whatever its text.
        self._token_bytes = [b"" if token in stops else text for token, text in enumerate(token_bytes)]
        self._tokens_by_bytes: dict[bytes, tuple[int, ...]] = {}
        for token, text in enumerate(self._token_bytes):
            if text:
                self._tokens_by_bytes[text] = (*self._tokens_by_bytes.get(text, ()), token)
        self._longest_token = max(map(len, self._tokens_by_bytes), default=1)
        self._token_prefixes = {text[:end] for text in self._tokens_by_bytes for end in range(1, len(text) + 1)}
        # The calls of one turn share their opening (`{"name":"search","arguments":{"query":" `) with every other
        # turn's, and a turn's choices repeat across the turns of an episode: the same windows come back often.
        self._window_tokens = lru_cache(maxsize=1 << 16)(self._tokens_spelling_a_prefix_of)

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> CallTokens:
        """The vocabulary of a Hugging Face tokenizer, each token's bytes as xgrammar (vLLM's grammar backend)
        decodes them, padded with empty tokens to the model's `vocab_size`."""
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        return cls([bytes(text) for text in info.decoded_vocab[:vocab_size]], stop_token_ids)

    def admitted(self, calls: Sequence[bytes], written: int) -> list[int]:
        """The tokens that may follow `written` bytes of a turn whose open calls are `calls`: those whose bytes
        continue one of them (sorted), then the stop tokens if one is complete."""
        windows = {call[written:written + self._longest_token] for call in calls}
        tokens = sorted({token for window in windows for token in self._window_tokens(window)})
        return tokens + self.stop_token_ids if b"" in windows else tokens

    @staticmethod
    def complete(calls: Sequence[bytes], written: int) -> bool:
        """Whether one of the open `calls` is written in full, so that a stop token may end the turn."""
        return any(len(call) == written for call in calls)

    def step(self, calls: Sequence[bytes], written: int, token: int) -> tuple[list[bytes], int]:
        """The calls still open after `token` follows `written` bytes, and the bytes written then; no calls if none
        continues with `token` (a stop token continues none: it ends the turn)."""
        piece = self._token_bytes[token] if 0 <= token < self.vocab_size else b""
        if not piece:
            return [], written
        return [call for call in calls if call.startswith(piece, written)], written + len(piece)

    def _tokens_spelling_a_prefix_of(self, window: bytes) -> tuple[int, ...]:
        tokens: tuple[int, ...] = ()
        for end in range(1, len(window) + 1):
            piece = window[:end]
            if piece not in self._token_prefixes:  # no longer piece can be a token either
                break
            tokens += self._tokens_by_bytes.get(piece, ())
        return tokens
