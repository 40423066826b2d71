"""Demonstrations: a scripted expert plays search-world tasks, recorded as the agent loop records a policy.

The tiny model starts from random weights and cannot form a tool call, so RL from scratch gets reward 0 and no
gradient. Like REDSearcher's mid-training, a run can first imitate an expert for a few minutes (`learner/warmup.py`).
The expert here cheats on planning only: it reads the task's evidence pages (which the agent never sees) to know the
entity each hop lands on. It acts like a careful agent without that knowledge would look:

    for each hop:  search(the current entity's name)
                   (if the search missed the page stating the hop's fact, search again with that page's title)
                   sometimes open a hit about another entity by mistake
                   open the entity's pages in the order the search lists them, until the one stating the fact
    answer(the value the last page states)

So every step is something the question or the last observation shows: the first name is in the question, each next
name is in the page just read, the answer is on the last page. A k-hop task takes about 3k tool calls; 16 hops, 40+.

The episode is played by `run_episode` itself, against the real tool server, with `ScriptedPolicy` in the engine's
place: the prompt, every observation and the chat markup are the agent loop's own, and the expert's turns are the
text a model would write, tokenized. The result is a `Trajectory` like any other: mask 1 on the expert's tokens,
their logprob 0 (the expert chose them with certainty), version 0. Everything is deterministic from the seed.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

from longhaul.actors.agent_loop import ChatFormat, run_episode
from longhaul.actors.argument_choices import IN_TEXT, admits
from longhaul.actors.engine import Generation
from longhaul.actors.search_world import SearchWorld, Task
from longhaul.actors.tool_calls import TOOL_CALL_END, TOOL_CALL_START, ToolCall
from longhaul.actors.tool_service import TaskInfo, ToolClient
from longhaul.config import AgentConfig
from longhaul.trajectory import Trajectory

MISCLICK_PROBABILITY = 0.1
"""Chance, per hop, that the expert first opens a hit about another entity (one whose page merely names the entity
searched for): a detour a real agent makes, so demonstrations also show reading a page that does not help and
moving on."""


def _page_subject(world: SearchWorld, doc_id: str) -> str:
    """The entity a page covers: its title up to the section (`Name` or `Name: Section`)."""
    title = world.open(doc_id).partition("\n\n")[0]
    return title.partition(": ")[0]


def expert_calls(world: SearchWorld, task: Task, rng: random.Random, *, top_k: int) -> list[ToolCall]:
    """The tool calls the expert makes for `task`, given the search results the tool server will return (`top_k`
    hits per search, as `tools.search_top_k`)."""
    subjects = [_page_subject(world, doc_id) for doc_id in task.evidence_doc_ids]
    calls: list[ToolCall] = []
    for subject, evidence in zip(subjects, task.evidence_doc_ids, strict=True):
        query = subject
        calls.append(ToolCall("search", {"query": IN_TEXT + query}))
        hits = world.search(query, top_k)
        if evidence not in [hit.doc_id for hit in hits]:
            # The name alone ranked other pages higher: search for the page by its title (what the first search's
            # hits suggest a page of that entity is called).
            query = world.open(evidence).partition("\n\n")[0].replace(":", "")
            calls.append(ToolCall("search", {"query": IN_TEXT + query}))
            hits = world.search(query, top_k)
        others = [hit.doc_id for hit in hits if hit.title.partition(": ")[0] != subject]
        if others and rng.random() < MISCLICK_PROBABILITY:
            calls.append(ToolCall("open", {"doc_id": rng.choice(others)}))
        for hit in hits:
            if hit.doc_id == evidence:
                break
            if hit.title.partition(": ")[0] == subject:
                calls.append(ToolCall("open", {"doc_id": hit.doc_id}))
        calls.append(ToolCall("open", {"doc_id": evidence}))
    calls.append(ToolCall("answer", {"answer": IN_TEXT + task.answer}))
    return calls


class ScriptedPolicy:
    """Stands in for `InferenceEngine` in `run_episode`: each `generate` returns the next scripted call as the ids
    a model would sample for it (the Hermes call text, or under `constrained_tool_calls` the compact JSON the grammar
    admits followed by `<|im_end|>`)."""

    def __init__(self, calls: list[ToolCall], tokenizer, chat: ChatFormat, *, constrained: bool):
        self._calls = [{"name": call.name, "arguments": call.arguments} for call in calls]
        self._turns = [self._turn_ids(call, tokenizer, chat, constrained) for call in calls]
        self._next = 0

    @staticmethod
    def _turn_ids(call: ToolCall, tokenizer, chat: ChatFormat, constrained: bool) -> list[int]:
        body = {"name": call.name, "arguments": call.arguments}
        if constrained:
            # The engine's structured outputs disable optional whitespace; the loop writes `<tool_call>\n` and
            # closes the call itself, and the model ends its turn with `<|im_end|>`.
            text = json.dumps(body, separators=(",", ":"))
            return tokenizer.encode(text, add_special_tokens=False) + [chat.im_end]
        # The chat template's own layout of an assistant call; the turn stops at `</tool_call>`, and the loop adds
        # `<|im_end|>`.
        text = f"{TOOL_CALL_START}\n{json.dumps(body)}\n{TOOL_CALL_END}"
        return tokenizer.encode(text, add_special_tokens=False)

    async def generate(self, prompt_token_ids: list[int], *, max_tokens: int, stop_token_ids: list[int],
                       structured_json_schema: dict | None = None, **_sampling) -> Generation:
        if self._next >= len(self._turns):
            raise RuntimeError("the script has no more calls: the episode should have ended at its answer")
        call, ids = self._calls[self._next], self._turns[self._next]
        self._next += 1
        if structured_json_schema is not None and not admits(structured_json_schema, call):
            # A demonstration the policy could not reproduce under the same constraints would teach it nothing.
            raise RuntimeError(f"the expert's call {call} is not one the turn's schema admits")
        if len(ids) > max_tokens:  # what an engine does at the token budget
            return Generation(ids[:max_tokens], [0.0] * max_tokens, [0] * max_tokens, "length")
        return Generation(ids, [0.0] * len(ids), [0] * len(ids), "stop")


@dataclass(frozen=True, slots=True)
class DemonstrationMix:
    """Which train tasks to demonstrate: `count` episodes, task hop counts drawn with the given relative weights
    (hop count → weight; hop counts with no weight are not drawn)."""

    count: int
    hop_weights: dict[int, float]


def choose_tasks(world: SearchWorld, mix: DemonstrationMix, seed: int) -> list[Task]:
    """`mix.count` train tasks (repeats only once every task of a hop count was used), deterministic from `seed`."""
    rng = random.Random(f"longhaul-demonstrations:{seed}:tasks")
    by_hops: dict[int, list[Task]] = {}
    for task in world.tasks("train"):
        if mix.hop_weights.get(task.hops, 0) > 0:
            by_hops.setdefault(task.hops, []).append(task)
    if not by_hops:
        raise ValueError(f"no train task has a hop count weighted in {mix.hop_weights}")
    hops = sorted(by_hops)
    weights = [mix.hop_weights[h] for h in hops]
    queues: dict[int, list[Task]] = {h: [] for h in hops}
    chosen = []
    for _ in range(mix.count):
        h = rng.choices(hops, weights)[0]
        if not queues[h]:
            queues[h] = rng.sample(by_hops[h], len(by_hops[h]))
        chosen.append(queues[h].pop())
    return chosen


async def demonstrate(world: SearchWorld, tasks: list[Task], *, tools: ToolClient, chat: ChatFormat, tokenizer,
                      agent: AgentConfig, top_k: int, seed: int = 0, first_index: int = 0,
                      concurrency: int = 32) -> list[Trajectory]:
    """Play each task with the expert through `run_episode` and the tool server behind `tools` (which must serve
    `world`); one trajectory per task, in order. Task i's detours and id come from seed and `first_index` + i
    alone, so that a list of tasks played in parts, each from its own index, gives the records played whole."""
    slots = asyncio.Semaphore(concurrency)

    async def play(index: int, task: Task) -> Trajectory:
        rng = random.Random(f"longhaul-demonstrations:{seed}:{index}")
        policy = ScriptedPolicy(expert_calls(world, task, rng, top_k=top_k), tokenizer, chat,
                                constrained=agent.constrained_tool_calls)
        info = TaskInfo(task.task_id, task.question, task.hops, task.split)
        async with slots:
            trajectory = await run_episode(info, engine=policy, tools=tools, chat=chat, config=agent,
                                           group_id=f"demo-{seed}-{index}", actor_id="expert", env="search")
        # Ids a pure function of the seed: a rerun gives the same records.
        trajectory.trajectory_id = f"demo-{seed}-{index:06d}"
        return trajectory

    return list(await asyncio.gather(*(play(i, task) for i, task in enumerate(tasks, start=first_index))))
