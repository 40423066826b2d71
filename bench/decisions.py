"""What a warmed-up policy has learned, decision by decision: teacher-forced accuracy on held-out expert episodes.

    python bench/decisions.py MODEL_DIR [--tasks 40] [--hops 1] [--json PATH]

The scripted expert (`actors/demonstrations.py`) plays `--tasks` held-out test tasks of `--hops` hops, under the
default agent settings (constrained calls, argument choices), so every turn of its episodes carries the JSON schema
that held it (`Trajectory.turn_grammars`). For each turn the model, given the episode so far, scores every call the
schema admits (the summed logprob of its compact JSON); the figures are, per kind of decision:

- **tool**: the best-scoring call uses the expert's tool (after a page: open another page, or answer?);
- **argument**: among the calls of the expert's tool, the best-scoring one has the expert's argument (which query,
  which page, which value).

The baseline is chance, measured on the same turns: 1 / (number of tools offered) and 1 / (number of arguments
offered). Each figure is printed as accuracy, chance, and their ratio. No engine is involved: transformers scores the
candidates, so this runs on any machine that holds the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def candidate_calls(schema: dict) -> dict[str, list[str]]:
    """Tool name → the argument values `ArgumentChoices.schema` admits (or `tool_call_schema`'s tools, none listed)."""
    calls: dict[str, list[str]] = {}
    for alternative in schema.get("anyOf", []):
        tool = alternative["properties"]["name"]["const"]
        [argument] = alternative["properties"]["arguments"]["properties"].values()
        calls[tool] = list(argument.get("enum", []))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--hops", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longhaul.actors.agent_loop import ChatFormat
    from longhaul.actors.demonstrations import demonstrate
    from longhaul.actors.search_world import SearchWorld
    from longhaul.actors.tool_service import ToolClient, serve
    from longhaul.config import AgentConfig, ToolServiceConfig, WorldConfig

    world = SearchWorld.generate(WorldConfig())
    tasks = [t for t in world.tasks("test") if t.hops == args.hops][: args.tasks]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    chat = ChatFormat(tokenizer)
    tools_config = ToolServiceConfig(deadline_s=600.0)

    async def play():
        server, port = await serve(tools_config, world)
        try:
            async with ToolClient(f"127.0.0.1:{port}", tools_config) as tools:
                return await demonstrate(world, tasks, tools=tools, chat=chat, tokenizer=tokenizer,
                                         agent=AgentConfig(), top_k=tools_config.search_top_k)
        finally:
            await server.stop(0)

    episodes = asyncio.run(play())
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()

    def score(context: list[int], text: str) -> float:
        continuation = tokenizer.encode(text, add_special_tokens=False)
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(context) - 1:-1].float(), -1)
        return float(logp[torch.arange(len(continuation)), torch.tensor(continuation)].sum())

    # decision kind → [turns, tool right, argument right, 1/tools offered summed, 1/arguments offered summed]
    tally: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0, 0.0])
    for episode in episodes:
        ids, offsets = episode.token_ids.tolist(), episode.turn_offsets.tolist()
        for turn, schema in enumerate(episode.turn_grammars):
            start = offsets[turn] + len(chat.call_prefix)
            generated = [i for i in range(start, offsets[turn + 1]) if episode.loss_mask[i]]
            expert = json.loads(tokenizer.decode([ids[i] for i in generated if ids[i] != chat.im_end]))
            calls = candidate_calls(json.loads(schema))
            context = ids[:start]
            scores = {(tool, value): score(context, json.dumps({"name": tool, "arguments": {_argument(tool): value}},
                                                               separators=(",", ":")))
                      for tool, values in calls.items() for value in values}
            best_tool = max(scores, key=scores.get)[0]
            own = {value: s for (tool, value), s in scores.items() if tool == expert["name"]}
            row = tally[expert["name"]]
            row[0] += 1
            row[1] += best_tool == expert["name"]
            row[2] += max(own, key=own.get) == expert["arguments"][_argument(expert["name"])]
            row[3] += 1 / len(calls)
            row[4] += 1 / len(own)

    figures = {}
    print(f"{args.model_dir}: {len(episodes)} expert episodes of held-out {args.hops}-hop tasks")
    print(f"{'decision':10s} {'turns':>5s}   {'tool acc':>8s} {'chance':>6s} {'ratio':>5s}   "
          f"{'arg acc':>7s} {'chance':>6s} {'ratio':>5s}")
    for name, (n, tool_ok, arg_ok, tool_chance, arg_chance) in sorted(tally.items()):
        figures[name] = {"turns": n, "tool_accuracy": tool_ok / n, "tool_chance": tool_chance / n,
                         "argument_accuracy": arg_ok / n, "argument_chance": arg_chance / n}
        f = figures[name]
        print(f"{name:10s} {n:5d}   {f['tool_accuracy']:8.2f} {f['tool_chance']:6.2f} "
              f"{f['tool_accuracy'] / f['tool_chance']:5.2f}   {f['argument_accuracy']:7.2f} "
              f"{f['argument_chance']:6.2f} {f['argument_accuracy'] / f['argument_chance']:5.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def _argument(tool: str) -> str:
    from longhaul.actors.tool_calls import TOOL_SCHEMAS

    [argument] = TOOL_SCHEMAS[tool]
    return argument


if __name__ == "__main__":
    main()
