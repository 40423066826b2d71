"""Where a warmed-up policy loses held-out tasks: at the answer turn, or before it.

    python bench/answer_turn.py MODEL_DIR [--split test] [--hops 1] [--tasks 62] [--json PATH]

The scripted expert (`actors/demonstrations.py`) plays the first `--tasks` tasks of `--hops` hops of `--split`
against a real tool server, so every episode reaches its answer turn with the right page just read. There the model
chooses among the answer choices the constrained loop offers (`actors/argument_choices.py`, computed here from the
evidence page's text); each choice is scored as grammar-constrained decoding scores it, renormalising at every
token over the tokens some choice with the same prefix continues with, and the model's pick is the best-scored.
The figure is the pick's accuracy as a ratio to chance (the mean of 1 / number of choices), beside both. Held-out
success well below this accuracy means the episodes are lost before the answer turn, in the searching and opening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path


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
    from longhaul.actors.argument_choices import IN_TEXT, ArgumentChoices
    from longhaul.actors.demonstrations import demonstrate
    from longhaul.actors.search_world import SearchWorld
    from longhaul.actors.tool_service import ToolClient, serve
    from longhaul.config import load_config

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

    def answer_turn(answer: str) -> list[int]:
        text = json.dumps({"name": "answer", "arguments": {"answer": answer}}, separators=(",", ":"))
        return tokenizer.encode(text, add_special_tokens=False) + [chat.im_end]

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    right, chance, picks = 0, 0.0, []
    for task, trajectory in zip(tasks, asyncio.run(play()), strict=True):
        ids, mask = trajectory.token_ids.tolist(), trajectory.loss_mask.tolist()
        start = max(i for i in range(len(ids)) if mask[i] and (i == 0 or not mask[i - 1]))
        end = start
        while end < len(ids) and mask[end]:
            end += 1
        if answer_turn(IN_TEXT + task.answer) != ids[start:end]:
            raise RuntimeError(f"{task.task_id}: the demonstration's last expert turn is not its answer")
        prefix = ids[:start]
        choices = ArgumentChoices(task.question)
        evidence = task.evidence_doc_ids[-1]
        choices.saw_page(evidence, world.open(evidence))
        options = choices.choices("answer")
        turns = [answer_turn(option) for option in options]
        scores = []
        with torch.no_grad():
            for turn in turns:
                logits = model(torch.tensor([prefix + turn])).logits[0, len(prefix) - 1:-1].float()
                logprobs = torch.log_softmax(logits, -1)
                score = 0.0
                for j, token in enumerate(turn):
                    allowed = sorted({other[j] for other in turns if len(other) > j and other[:j] == turn[:j]})
                    score += (logprobs[j, token] - torch.logsumexp(logprobs[j, allowed], 0)).item()
                scores.append(score)
        pick = options[max(range(len(options)), key=scores.__getitem__)].strip()
        right += pick == task.answer
        chance += 1 / len(options)
        picks.append({"task_id": task.task_id, "answer": task.answer, "pick": pick, "choices": len(options)})

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
