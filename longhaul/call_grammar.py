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
from bisect import bisect_left
from collections.abc import Iterable, Sequence

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
    """A vocabulary, as the bytes each token writes, for walking finite sets of calls (`walk`)."""

    def __init__(self, token_bytes: Sequence[bytes], stop_token_ids: Iterable[int]):
        self.vocab_size = len(token_bytes)
        self.stop_token_ids = sorted(set(stop_token_ids))
        stops = set(self.stop_token_ids)
        # A stop token only ends a turn: it writes nothing, whatever its text.
        self.token_bytes = [b"" if token in stops else text for token, text in enumerate(token_bytes)]
        self.tokens_by_bytes: dict[bytes, tuple[int, ...]] = {}
        for token, text in enumerate(self.token_bytes):
            if text:
                self.tokens_by_bytes[text] = (*self.tokens_by_bytes.get(text, ()), token)
        self.token_prefixes = {text[:end] for text in self.tokens_by_bytes for end in range(1, len(text) + 1)}

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> CallTokens:
        """The vocabulary of a Hugging Face tokenizer, each token's bytes as xgrammar (vLLM's grammar backend)
        decodes them, padded with empty tokens to the model's `vocab_size`."""
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        return cls([bytes(text) for text in info.decoded_vocab[:vocab_size]], stop_token_ids)

    def walk(self, calls: Iterable[bytes]) -> CallWalk:
        """A turn that may write any of `calls` (ASCII), at its start."""
        return CallWalk(self, calls)


class CallWalk:
    """One turn's way through its calls, a token at a time: `admitted` says what may come next, `advance` takes it.

    The calls are kept sorted, so those still open (the ones starting with the bytes written so far) are one
    contiguous range, found by bisection: a step costs the logarithm of the number of calls, not the number, and
    an episode's search turns offer every name it has seen."""

    __slots__ = ("_vocabulary", "_calls", "_lo", "_hi", "written")

    def __init__(self, vocabulary: CallTokens, calls: Iterable[bytes]):
        self._vocabulary = vocabulary
        self._calls = sorted(set(calls))
        self._lo, self._hi = 0, len(self._calls)
        self.written = 0
        """Bytes of the turn so far: a prefix of every open call."""

    @property
    def open(self) -> bool:
        """Whether some call still starts with what the turn has written."""
        return self._lo < self._hi

    @property
    def complete(self) -> bool:
        """Whether an open call is written in full, so that a stop token may end the turn."""
        # A call that is a prefix of the others sorts first among them.
        return self._lo < self._hi and len(self._calls[self._lo]) == self.written

    def admitted(self) -> list[int]:
        """The tokens that may come next: those whose bytes continue an open call, then the stop tokens if one is
        complete."""
        vocabulary, calls = self._vocabulary, self._calls
        admitted: list[int] = []
        # Depth first over the distinct continuations of the open calls, each a sub-range of them, for as long as
        # a continuation is the start of some token: an argument's first bytes branch, the JSON around it does not.
        pending = [(self._lo + self.complete, self._hi, self.written)]
        while pending:
            lo, hi, end = pending.pop()
            while lo < hi:
                piece_end = calls[lo][:end + 1]
                # Every call of the sub-range starts with `piece_end`: they sort before its successor.
                sub_hi = bisect_left(calls, piece_end + b"\xff", lo, hi)
                piece = piece_end[self.written:]
                if piece in vocabulary.token_prefixes:
                    admitted += vocabulary.tokens_by_bytes.get(piece, ())
                    # Calls of the sub-range that end right here sort first; the rest continue.
                    pending.append((lo + (len(calls[lo]) == end + 1), sub_hi, end + 1))
                lo = sub_hi
        return admitted + vocabulary.stop_token_ids if self.complete else admitted

    def advance(self, token: int) -> bool:
        """Take `token`; False if it continues no open call (the walk is then closed: nothing is open). A stop
        token continues none: it ends the turn."""
        vocabulary = self._vocabulary
        piece = vocabulary.token_bytes[token] if 0 <= token < vocabulary.vocab_size else b""
        if self.open and piece:
            prefix = self._calls[self._lo][:self.written] + piece
            self._lo = bisect_left(self._calls, prefix, self._lo, self._hi)
            self._hi = bisect_left(self._calls, prefix + b"\xff", self._lo, self._hi)
            self.written += len(piece)
        else:
            self._lo = self._hi
        return self.open
