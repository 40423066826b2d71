"""Argument choices: under `agent.argument_choices`, every argument of a constrained tool call is one of the strings
the episode has shown so far, offered to the engine as the JSON schema of the next turn.

A small model learns quickly *which* thing to do next (search, open, answer) and *which* of a few candidates is
right, but learning to copy arbitrary spans of its context token by token takes it far longer than a CPU run lasts
(measured: a 2-layer model imitating the expert for five minutes still wrote memorised names, docs/benchmarks.md,
"Learning").
Offering the spans as choices turns copying into pointing, like the valid-action lists of text-game agents; the
decision, and the reward for it, stay the policy's. The choices:

- `search(query)`: every name the episode has shown (a run of capitalised words in the question or an observation)
  and every search hit's title with its colon dropped ("Raigrou College History"), the forms the expert searches;
- `open(doc_id)`: the doc ids the latest search listed that have not been opened since (a page is opened off the
  results just read, and reading it again before the next search shows nothing new);
- `answer(answer)`: every name, number, and run of one to three lowercase words without a stopword in the latest
  observation (the answer is on the page just read: "1521", "Buhan Holdings", "short story collection"; a run like
  "covers the" is no answer to anything, and leaving such runs out halves the choices).

Each string is offered as it appears in running text, after a space (`IN_TEXT`): byte-level BPE encodes a word with
its leading space, so that is the tokenization the context already holds. A tool whose choices are empty (no
search yet, so nothing to open) is left out of that turn's schema.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

from longhaul.actors.bm25 import STOPWORDS_EN

IN_TEXT: Final = " "
"""Prefix of a query or an answer, as the expert writes them and as they are offered: the string as it appears after
a space in running text. Byte-level BPE encodes a word with its leading space, so the question's " Thedrer Nights" is
[" Thedrer", " Nights"] while a JSON string starting at its quote gives ["Th", "edrer", " Nights"]: without the
space, writing a name would mean re-spelling it. The tools ignore the space (search tokenizes, grading
normalises)."""

_NAME: Final = re.compile(r"\b[A-Z][a-z]+(?: [A-Z][a-z]+)*\b")
_NUMBER: Final = re.compile(r"\b\d(?:[\d,]*\d)?\b")
_WORD: Final = re.compile(r"\b[a-z]+(?:-[a-z]+)*\b")  # "synth-pop" is one word
_CLAUSE: Final = re.compile(r"[.,;:!?\n]")
_STOPWORDS: Final = frozenset(STOPWORDS_EN)


class ArgumentChoices:
    """What one episode has shown, as the choices of its next call."""

    def __init__(self, question: str):
        self._names: dict[str, None] = dict.fromkeys(_names(question))  # ordered and de-duplicated
        self._doc_ids: list[str] = []
        self._opened: set[str] = set()
        self._values: list[str] = []

    def saw_hits(self, hits: Sequence[Any], text: str) -> None:
        """A search answered with `hits` (`SearchHit`s), shown to the model as `text`."""
        self._names.update(dict.fromkeys(_names(text)))
        self._names.update(dict.fromkeys(hit.title.replace(":", "") for hit in hits))
        self._doc_ids = [hit.doc_id for hit in hits]
        self._opened = set()
        self._values = _values(text)

    def saw_page(self, doc_id: str, text: str) -> None:
        self._opened.add(doc_id)
        self._names.update(dict.fromkeys(_names(text)))
        self._values = _values(text)

    def choices(self, tool: str) -> list[str]:
        """The strings `tool`'s argument may be now."""
        if tool == "search":
            return [IN_TEXT + name for name in self._names]
        if tool == "open":
            return [doc_id for doc_id in self._doc_ids if doc_id not in self._opened]
        if tool == "answer":
            return [IN_TEXT + value for value in self._values]
        raise ValueError(f"no argument choices for tool {tool!r}")

    def schema(self, tools: Iterable[str]) -> dict[str, Any] | None:
        """The JSON schema of one call of one of `tools` whose argument is one of its choices; None if no tool has
        any (then any string goes)."""
        from longhaul.actors.tool_calls import TOOL_SCHEMAS

        alternatives = []
        for name in tools:
            [argument] = TOOL_SCHEMAS[name]
            if choices := self.choices(name):
                alternatives.append({
                    "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                    "properties": {"name": {"const": name}, "arguments": {
                        "type": "object", "additionalProperties": False, "required": [argument],
                        "properties": {argument: {"enum": choices}}}}})
        return {"anyOf": alternatives} if alternatives else None


def admits(schema: dict[str, Any], call: dict[str, Any]) -> bool:
    """Whether a call (`{"name": ..., "arguments": {...}}`) is one `schema` (`ArgumentChoices.schema` or the agent
    loop's free-form tool schema) lets the engine write."""
    for alternative in schema["anyOf"]:
        properties = alternative["properties"]
        if properties["name"]["const"] != call["name"]:
            continue
        arguments = properties["arguments"]["properties"]
        return set(arguments) == set(call["arguments"]) and all(
            value in spec["enum"] if "enum" in spec else len(value) <= spec["maxLength"]
            for value, spec in ((call["arguments"][a], arguments[a]) for a in arguments))
    return False


def _names(text: str) -> list[str]:
    return _NAME.findall(text)


def _values(text: str) -> list[str]:
    """Every name, number, and run of one to three lowercase words within a clause of `text` that holds no
    stopword, names first, then numbers, then runs by length, each in order of first appearance."""
    runs: list[list[str]] = [[], [], []]
    for clause in _CLAUSE.split(text):
        words = _WORD.findall(clause)
        for n, found in enumerate(runs, start=1):
            found += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)
                      if not _STOPWORDS.intersection(words[i:i + n])]
    return list(dict.fromkeys([*_names(text), *_NUMBER.findall(text), *(run for found in runs for run in found)]))
