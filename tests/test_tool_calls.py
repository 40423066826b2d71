"""Tool calls as the model writes them: valid ones parse exactly, anything else becomes a message for the agent."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longhaul.actors.tool_calls import (
    MAX_ARGUMENT_CHARS,
    TOOL_SCHEMAS,
    ToolCall,
    ToolCallError,
    parse_tool_call,
)


def call(body: str, before: str = "", after: str = "</tool_call>") -> str:
    return f"{before}<tool_call>\n{body}\n{after}"


@pytest.mark.parametrize(("text", "expected"), [
    (call('{"name": "search", "arguments": {"query": "river north of Kelmora"}}'),
     ToolCall("search", {"query": "river north of Kelmora"})),
    (call('{"name": "open", "arguments": {"doc_id": "d0042"}}', before="I should read it. "),
     ToolCall("open", {"doc_id": "d0042"})),
    (call('{"name": "answer", "arguments": {"answer": "1877"}}'), ToolCall("answer", {"answer": "1877"})),
    # Generation stops at </tool_call>, and a stop string may be cut from the text: the call still counts.
    (call('{"name": "answer", "arguments": {"answer": "Varo"}}', after=""), ToolCall("answer", {"answer": "Varo"})),
    # A raw control character inside a string, as constrained decoding's JSON grammar allows.
    (call('{"name": "search", "arguments": {"query": "a\tb\x08"}}'), ToolCall("search", {"query": "a\tb\x08"})),
    # Only the first call of a turn is executed.
    (call('{"name": "open", "arguments": {"doc_id": "d1"}}') + call('{"name": "open", "arguments": {"doc_id": "d2"}}'),
     ToolCall("open", {"doc_id": "d1"})),
])
def test_a_valid_call_parses_to_its_name_and_arguments(text, expected):
    assert parse_tool_call(text) == expected


@pytest.mark.parametrize(("text", "message_contains"), [
    ("The answer is 1877.", "No tool call found"),
    (call('{"name": "search", "arguments": {"query": "x"'), "not valid JSON"),
    (call("search(query='x')"), "not valid JSON"),
    (call('["search", {"query": "x"}]'), 'exactly the keys "name" and "arguments"'),
    (call('{"name": "search", "args": {"query": "x"}}'), 'exactly the keys "name" and "arguments"'),
    (call('{"name": "browse", "arguments": {"url": "x"}}'), "Unknown tool 'browse'"),
    (call('{"name": 7, "arguments": {}}'), "Unknown tool '7'"),
    (call('{"name": "search", "arguments": "x"}'), '"arguments" of search must be an object with query'),
    (call('{"name": "search", "arguments": {}}'), "Wrong arguments for search: missing query"),
    (call('{"name": "open", "arguments": {"doc_id": "d1", "page": 2}}'), "unexpected page"),
    (call('{"name": "open", "arguments": {"doc_id": 42}}'), "Argument doc_id of open must be a str, got int"),
    (call(json.dumps({"name": "search", "arguments": {"query": "x" * (MAX_ARGUMENT_CHARS + 1)}})),
     f"longer than {MAX_ARGUMENT_CHARS} characters"),
    (call('{"name": "search", "arguments": {"query": "a\\ud800b"}}'), "contains an invalid character escape"),
])
def test_an_invalid_call_becomes_an_error_that_tells_the_agent_what_to_fix(text, message_contains):
    result = parse_tool_call(text)
    assert isinstance(result, ToolCallError)
    assert message_contains in result.message


def test_every_error_lists_the_available_tools_where_the_tool_is_in_doubt():
    result = parse_tool_call(call('{"name": "browse", "arguments": {}}'))
    assert all(f"{name}(" in result.message for name in TOOL_SCHEMAS)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200) | st.builds(call, st.text(max_size=120)))
def test_no_model_output_makes_the_parser_raise(text):
    result = parse_tool_call(text)
    assert isinstance(result, ToolCall | ToolCallError)
    if isinstance(result, ToolCall):
        assert set(result.arguments) == set(TOOL_SCHEMAS[result.name])
        assert all(isinstance(v, str) for v in result.arguments.values())


def test_a_tool_not_offered_to_the_agent_is_an_unknown_tool():
    result = parse_tool_call(call('{"name": "answer", "arguments": {"answer": "x"}}'), tools=("search", "open"))
    assert isinstance(result, ToolCallError)
    assert result.message.startswith("Unknown tool 'answer'. Tools: search(query); open(doc_id).")
