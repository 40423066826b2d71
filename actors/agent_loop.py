"""One episode of the search agent: generate, parse the tool call, call the tool, append the observation, repeat.

The episode is kept as token ids from first to last. Generated ids are exactly what the engine sampled (mask 1,
with their behaviour logprobs and policy versions); everything else (the prompt, observations, and the chat markup
the loop writes itself) is rendered by the model's chat template and carries mask 0, logprob 0, version -1. Text is
decoded only to parse a call; nothing generated is ever re-encoded.

Turn k is one model generation and the observation that answers it: `turn_offsets[k]` is where the model starts
writing, and the chat markup that closes the assistant turn (`<|im_end|>`, when the model stopped at
`</tool_call>`) counts as part of the observation side. Every defect of the model's output — no call, bad JSON,
unknown tool, wrong arguments — and every tool failure becomes the observation the model sees next; only an
unreachable tool service ends the episode (`tool_error`), since no turn could succeed after it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longhaul.actors.argument_choices import ArgumentChoices
from longhaul.actors.engine import Generation, InferenceEngine
from longhaul.actors.tool_calls import TOOL_CALL_END, TOOL_CALL_START, TOOL_SCHEMAS, ToolCall, parse_tool_call
from longhaul.actors.tool_service import TaskInfo, ToolClient, ToolError
from longhaul.config import AgentConfig
from longhaul.trajectory import Trajectory

IM_END = "<|im_end|>"

# A query, a doc id or an answer is short; bounding it keeps a weak policy from filling its turn with one string.
MAX_CONSTRAINED_ARGUMENT_CHARS = 64
def tool_call_schema(tools: tuple[str, ...]) -> dict[str, Any]:
    """The JSON a constrained turn must produce: exactly one call of one offered tool, with its arguments."""
    return {"anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
         "properties": {"name": {"const": name},
                        "arguments": {"type": "object", "additionalProperties": False, "required": list(args),
                                      "properties": {arg: {"type": "string",
                                                           "maxLength": MAX_CONSTRAINED_ARGUMENT_CHARS}
                                                     for arg in args}}}}
        for name, args in TOOL_SCHEMAS.items() if name in tools
    ]}


class ChatFormat:
    """The model's chat template at the token level: the prompt, observations, and the ids the loop stops on."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.im_end = self._single_id(IM_END)
        self.tool_call_end = self._single_id(TOOL_CALL_END)
        # Tokens that end a turn (the stops, and any special token the model's EOS may be): they stay in the
        # trajectory, since the model sampled them, but not in the text the call is parsed from.
        self.turn_enders = {self.im_end, self.tool_call_end, *tokenizer.all_special_ids}
        self.newline = tokenizer.encode("\n", add_special_tokens=False)
        # What the loop writes around a constrained call (the template's own layout of an assistant tool call).
        self.call_prefix = tokenizer.encode(f"{TOOL_CALL_START}\n", add_special_tokens=False)
        self.call_suffix = tokenizer.encode(f"\n{TOOL_CALL_END}{IM_END}", add_special_tokens=False)

    def _single_id(self, token: str) -> int:
        ids = self._tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the model's tokenizer splits {token!r} into {len(ids)} ids; the agent loop needs it as "
                             "one id (build the model with `longhaul make-model` or use a Qwen/Hermes tokenizer)")
        return ids[0]

    def prompt_ids(self, system: str, question: str) -> list[int]:
        return self._render([{"role": "system", "content": system}, {"role": "user", "content": question}])

    def observation_ids(self, content: str) -> list[int]:
        """The tool result as the template renders it after a finished assistant turn, up to the next
        `<|im_start|>assistant\\n`. The newline that follows `<|im_end|>` in the template belongs here, because the
        engine stops at `<|im_end|>`."""
        return self.newline + self._render([{"role": "tool", "content": content}])

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))

    def turn_text(self, ids: list[int]) -> str:
        """The text of a model turn for the tool-call parser, without the token that ended it."""
        if ids and ids[-1] in self.turn_enders:
            ids = ids[:-1]
        return self._tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class _Tokens:
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turn_offsets: list[int] = field(default_factory=list)
    grammars: list[str] = field(default_factory=list)
    """One per turn when the turns are constrained (`Trajectory.turn_grammars`), else none."""

    def context(self, ids: list[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)

    def generated(self, generation: Generation) -> None:
        self.ids += generation.token_ids
        self.mask += [1] * len(generation.token_ids)
        self.logprobs += generation.logprobs
        self.versions += generation.versions


def _format_hits(hits) -> str:
    if not hits:
        return "No results."
    return "\n".join(f"[{hit.doc_id}] {hit.title}: {hit.snippet}" for hit in hits)


async def run_episode(task: TaskInfo, *, engine: InferenceEngine, tools: ToolClient, chat: ChatFormat,
                      config: AgentConfig, group_id: str, actor_id: str, env: str = "search") -> Trajectory:
    """Play `task` to the end (an answer, `max_turns`, `max_episode_tokens`, or an unreachable tool service)."""
    started = time.perf_counter()
    tokens = _Tokens()
    question = f"{task.question}\nHops: {task.hops}" if config.state_hops else task.question
    tokens.context(chat.prompt_ids(config.system_prompt, question))
    choices = ArgumentChoices(task.question) if config.constrained_tool_calls and config.argument_choices else None
    finish, reward_parts, tool_calls = "max_turns", {"exact_match": 0.0, "f1": 0.0}, 0
    read: list[str] = []  # pages opened, in order: the evidence an answer is graded on
    timings = {"generate_s": 0.0, "tool_s": 0.0}
    for _ in range(config.max_turns):
        closing = len(chat.call_prefix) + len(chat.call_suffix) if config.constrained_tool_calls else 1
        budget = min(config.max_turn_tokens, config.max_episode_tokens - len(tokens.ids) - closing)
        if budget < 1:
            finish = "max_tokens"
            break
        tokens.turn_offsets.append(len(tokens.ids))
        if config.constrained_tool_calls:
            tokens.context(chat.call_prefix)
        schema = None
        if config.constrained_tool_calls:
            schema = (choices.schema(config.tools) if choices else None) or tool_call_schema(config.tools)
            tokens.grammars.append(json.dumps(schema, separators=(",", ":")))
        t0 = time.perf_counter()
        generation = await engine.generate(
            tokens.ids, max_tokens=budget, stop_token_ids=[chat.im_end, chat.tool_call_end],
            temperature=config.temperature, structured_json_schema=schema)
        timings["generate_s"] += time.perf_counter() - t0
        tokens.generated(generation)
        text = chat.turn_text(generation.token_ids)
        if config.constrained_tool_calls:
            text = f"{TOOL_CALL_START}\n{text}\n{TOOL_CALL_END}"
            tokens.context(chat.call_suffix)
        elif not generation.token_ids or generation.token_ids[-1] != chat.im_end:
            tokens.context([chat.im_end])  # the model stopped at </tool_call> or ran out: close its turn for it
        call = parse_tool_call(text, config.tools)
        if isinstance(call, ToolCall):
            tool_calls += 1
            t0 = time.perf_counter()
            try:
                observation = await _call(tools, task, call, choices, read)
            except ToolError as error:
                if error.kind == "unavailable":
                    finish = "tool_error"
                    break
                observation = str(error)  # written for the agent (ToolError's contract)
            finally:
                timings["tool_s"] += time.perf_counter() - t0
            if isinstance(observation, dict):  # the graded answer ends the episode
                finish, reward_parts = "answer", observation
                break
        else:
            observation = call.message
        observed = chat.observation_ids(observation)
        if len(tokens.ids) + len(observed) > config.max_episode_tokens:
            finish = "max_tokens"
            break
        tokens.context(observed)
    timings["total_s"] = time.perf_counter() - started
    tokens.turn_offsets.append(len(tokens.ids))
    return Trajectory(
        trajectory_id=uuid.uuid4().hex, task_id=task.task_id, group_id=group_id, actor_id=actor_id, env=env,
        token_ids=np.asarray(tokens.ids, dtype="<u4"), loss_mask=np.asarray(tokens.mask, dtype="u1"),
        behavior_logprobs=np.asarray(tokens.logprobs, dtype="<f4"), versions=np.asarray(tokens.versions, dtype="<i4"),
        turn_offsets=np.asarray(tokens.turn_offsets, dtype="<u4"),
        reward=float(reward_parts["f1"] + config.evidence_reward * reward_parts.get("evidence_recall", 0.0)),
        num_turns=len(tokens.turn_offsets) - 1, num_tool_calls=tool_calls, finish_reason=finish,
        reward_parts=reward_parts, timings=timings, turn_grammars=tokens.grammars,
    )


async def _call(tools: ToolClient, task: TaskInfo, call: ToolCall, choices: ArgumentChoices | None,
                read: list[str]) -> str | dict[str, float]:
    """The observation of `call` (the grade, for an answer); what it shows joins the episode's `choices`, and a page
    it opens joins `read`."""
    if call.name == "search":
        hits = await tools.search(call.arguments["query"])
        observation = _format_hits(hits)
        if choices is not None:
            choices.saw_hits(hits, observation)
        return observation
    if call.name == "open":
        page = await tools.open(call.arguments["doc_id"])
        read.append(page.doc_id)
        if choices is not None:
            choices.saw_page(page.doc_id, page.text)
        return page.text
    grade = await tools.answer(task.task_id, call.arguments["answer"], read)
    return {"exact_match": grade.exact_match, "f1": grade.f1, "evidence_recall": grade.evidence_recall}
