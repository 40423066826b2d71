"""Parsing the tool call a model emitted, in the Qwen/Hermes form `<tool_call>{"name": ..., "arguments": ...}`.

The model is the least trusted input in the system: a weak policy early in training emits truncated JSON, unknown
tools, missing arguments. None of that may crash an episode. `parse_tool_call` therefore never raises: it returns
either a `ToolCall` whose arguments match the tool's schema, or a `ToolCallError` whose message is written for the
agent, which sees it as the tool's observation and can correct itself on the next turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

TOOL_CALL_START: Final = "<tool_call>"
TOOL_CALL_END: Final = "</tool_call>"

# name → (argument → type). All three tools take one string; the schema is data so the checks stay in one place.
TOOL_SCHEMAS: Final[dict[str, dict[str, type]]] = {
    "search": {"query": str},
    "open": {"doc_id": str},
    "answer": {"answer": str},
}
MAX_ARGUMENT_CHARS: Final = 1000
_CALL: Final = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|$)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: dict[str, str]


@dataclass(frozen=True, slots=True)
class ToolCallError:
    """Why the model's output is not a valid call, phrased as an observation for the model."""

    message: str


def _usage(tools: Collection[str]) -> str:
    return "; ".join(f"{name}({', '.join(args)})" for name, args in TOOL_SCHEMAS.items() if name in tools)


def parse_tool_call(text: str, tools: Collection[str] = tuple(TOOL_SCHEMAS)) -> ToolCall | ToolCallError:
    """The first tool call in `text` (a model turn, special tokens included), validated against `TOOL_SCHEMAS`;
    only the `tools` offered to the agent are known."""
    match = _CALL.search(text)
    if match is None:
        return ToolCallError(f"No tool call found. Call exactly one tool as {TOOL_CALL_START}"
                             f'{{"name": ..., "arguments": {{...}}}}{TOOL_CALL_END}. Tools: {_usage(tools)}.')
    body = match.group(1).strip()
    try:
        # strict=False admits raw control characters inside strings: models emit them, and the JSON grammar of
        # constrained decoding (xgrammar) allows them, so refusing them would reject calls it produced.
        call = json.loads(body, strict=False)
    except json.JSONDecodeError as exc:
        return ToolCallError(f"The tool call is not valid JSON ({exc.msg} at character {exc.pos}). "
                             f'Expected {{"name": ..., "arguments": {{...}}}}.')
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return ToolCallError('A tool call must be a JSON object with exactly the keys "name" and "arguments".')
    name, arguments = call["name"], call["arguments"]
    if not isinstance(name, str) or name not in TOOL_SCHEMAS or name not in tools:
        return ToolCallError(f"Unknown tool {str(name)[:40]!r}. Tools: {_usage(tools)}.")
    schema = TOOL_SCHEMAS[name]
    if not isinstance(arguments, dict):
        return ToolCallError(f'"arguments" of {name} must be an object with {", ".join(schema)}.')
    missing = [arg for arg in schema if arg not in arguments]
    extra = [arg for arg in arguments if arg not in schema]
    if missing or extra:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(map(str, extra))[:80]}"] if extra else [])
        return ToolCallError(f"Wrong arguments for {name}: {'; '.join(problems)}. Usage: {_usage(tools)}.")
    for arg, kind in schema.items():
        value = arguments[arg]
        if not isinstance(value, kind):
            return ToolCallError(f"Argument {arg} of {name} must be a {kind.__name__}, got {type(value).__name__}.")
        if len(value) > MAX_ARGUMENT_CHARS:
            return ToolCallError(f"Argument {arg} of {name} is longer than {MAX_ARGUMENT_CHARS} characters.")
        try:
            value.encode()
        except UnicodeEncodeError:  # JSON can spell lone surrogates ("\ud800"); no wire format can carry them
            return ToolCallError(f"Argument {arg} of {name} contains an invalid character escape.")
    return ToolCall(name, dict(arguments))
