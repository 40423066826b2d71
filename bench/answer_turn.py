"""Where a warmed-up policy loses held-out tasks: at the answer turn, or before it.

    python bench/answer_turn.py MODEL_DIR [--split test] [--hops 1] [--tasks 62] [--json PATH]

The scripted expert (`actors/demonstrations.py`) plays the first `--tasks` tasks of `--hops` hops of `--split`
against a real tool server, so every episode reaches its answer turn with the right page just read. There the model
chooses among the answer calls the turn's recorded grammar admits (`Trajectory.turn_grammars`, the
argument-choices schema the agent loop built from the real observations); each call is scored as the learner scores
a constrained turn (`GrammarMasks`, `token_logprobs`: log π renormalised over the admitted tokens at every position),
and the model's pick is the best-scored.
The figure is the pick's accuracy as a ratio to chance (the mean of 1 / number of choices), beside both. Held-out
success well below this accuracy means the episodes are lost before the answer turn, in the searching and opening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--hops", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=62)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longhaul.actors.agent_loop import ChatFormat
    from longhaul.actors.argument_choices import IN_TEXT
    from longhaul.actors.demonstrations import demonstrate
    from longhaul.actors.search_world import SearchWorld
    from longhaul.actors.tool_service import ToolClient, serve
    from longhaul.config import load_config
    from longhaul.learner.batch import token_logprobs
    from longhaul.learner.grammar_mask import GrammarMasks, choice_calls, unpack_bitmask

    config = load_config()
    world = SearchWorld.generate(config.world)
    tasks = [task for task in world.tasks(args.split) if task.hops == args.hops][:args.tasks]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    chat = ChatFormat(tokenizer)

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
    print(f"answer turn after the expert's episode, {len(tasks)} {args.split} tasks of {args.hops} hop(s): "
          f"right {right} ({figures['accuracy']:.1%}), chance {figures['chance']:.1%}, "
          f"{figures['ratio_to_chance']:.1f}x chance")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
