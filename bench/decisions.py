"""What a warmed-up policy has learned, decision by decision: teacher-forced accuracy on held-out expert episodes.

    python bench/decisions.py MODEL_DIR [--tasks 40] [--hops 1] [--whole-vocabulary] [--json PATH]

The scripted expert (`actors/demonstrations.py`) plays `--tasks` held-out test tasks of `--hops` hops, under the
default agent settings (constrained calls, argument choices), so every turn of its episodes carries the JSON schema
that held it (`Trajectory.turn_grammars`). For each turn the model, given the episode so far, scores every call the
schema admits: the summed logprob of its compact JSON under the turn's grammar (each token's distribution
renormalised over the tokens the grammar admits there, as the engine samples and the learner scores; with
`--whole-vocabulary`, over every token). The figures are, per kind of decision:

- **tool**: the most probable tool (the sum over its calls) is the expert's (after a page: open another page, or
  answer?);
- **argument**: among the calls of the expert's tool, the best-scoring one has the expert's argument (which query,
  which page, which value).

The baseline is chance, measured on the same turns: 1 / (number of tools offered) and 1 / (number of arguments
offered). Each figure is printed as accuracy, chance, and their ratio. Beside them, the stop decision by itself:
after each page, the probability the model gives `answer` where the expert answered and where it read on, and the
AUC between the two (whether the model tells a page holding the answer from one that does not, however it sets its
threshold). No engine is involved: transformers scores the candidates, so this runs on any machine that holds the
model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
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
    parser.add_argument("--whole-vocabulary", action="store_true",
                        help="score each token over the whole vocabulary instead of under the turn's grammar")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longhaul.actors.agent_loop import ChatFormat
    from longhaul.actors.demonstrations import demonstrate
    from longhaul.actors.search_world import SearchWorld
    from longhaul.actors.tool_service import ToolClient, serve
    from longhaul.config import AgentConfig, ToolServiceConfig, WorldConfig
    from longhaul.learner.grammar_mask import GrammarMasks, unpack_bitmask

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
    grammars = GrammarMasks.for_model(args.model_dir, model.config.vocab_size)

    def score(context: list[int], schema: str, text: str) -> float:
        continuation = tokenizer.encode(text, add_special_tokens=False)
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(context) - 1:-1].float()
        if not args.whole_vocabulary:
            admitted = unpack_bitmask(grammars.bitmask(schema, continuation), logits.shape[-1])
            logits = logits.masked_fill(~admitted, -torch.inf)
        logp = torch.log_softmax(logits, -1)
        return float(logp[torch.arange(len(continuation)), torch.tensor(continuation)].sum())

    # decision kind → [turns, tool right, argument right, 1/tools offered summed, 1/arguments offered summed]
    tally: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0, 0.0])
    stop: dict[bool, list[float]] = {True: [], False: []}  # after a page: P(answer) where the expert answered, or not
    for episode in episodes:
        ids, offsets = episode.token_ids.tolist(), episode.turn_offsets.tolist()
        previous = None  # the expert's previous tool
        for turn, schema in enumerate(episode.turn_grammars):
            start = offsets[turn] + len(chat.call_prefix)
            generated = [i for i in range(start, offsets[turn + 1]) if episode.loss_mask[i]]
            expert = json.loads(tokenizer.decode([ids[i] for i in generated if ids[i] != chat.im_end]))
            calls = candidate_calls(json.loads(schema))
            context = ids[:start]
            scores = {(tool, value): score(context, schema, json.dumps(
                          {"name": tool, "arguments": {_argument(tool): value}}, separators=(",", ":")))
                      for tool, values in calls.items() for value in values}
            # A tool's probability is the sum over its calls (what the engine decides at the tool's name, before any
            # argument); the single best call would favour tools with few arguments to spread it over.
            by_tool = {tool: torch.logsumexp(torch.tensor([s for (t, _), s in scores.items() if t == tool]), 0)
                       for tool in calls}
            best_tool = max(by_tool, key=by_tool.get)
            if previous == "open" and "answer" in calls:
                p_tool = torch.softmax(torch.stack(list(by_tool.values())), 0)
                stop[expert["name"] == "answer"].append(float(p_tool[list(by_tool).index("answer")]))
            own = {value: s for (tool, value), s in scores.items() if tool == expert["name"]}
            row = tally[expert["name"]]
            row[0] += 1
            row[1] += best_tool == expert["name"]
            row[2] += max(own, key=own.get) == expert["arguments"][_argument(expert["name"])]
            row[3] += 1 / len(calls)
            row[4] += 1 / len(own)
            previous = expert["name"]

    figures = {}
    scoring = "over the whole vocabulary" if args.whole_vocabulary else "under the turns' grammars"
    print(f"{args.model_dir}: {len(episodes)} expert episodes of held-out {args.hops}-hop tasks, scored {scoring}")
    print(f"{'decision':10s} {'turns':>5s}   {'tool acc':>8s} {'chance':>6s} {'ratio':>5s}   "
          f"{'arg acc':>7s} {'chance':>6s} {'ratio':>5s}")
    for name, (n, tool_ok, arg_ok, tool_chance, arg_chance) in sorted(tally.items()):
        figures[name] = {"turns": n, "tool_accuracy": tool_ok / n, "tool_chance": tool_chance / n,
                         "argument_accuracy": arg_ok / n, "argument_chance": arg_chance / n}
        f = figures[name]
        print(f"{name:10s} {n:5d}   {f['tool_accuracy']:8.2f} {f['tool_chance']:6.2f} "
              f"{f['tool_accuracy'] / f['tool_chance']:5.2f}   {f['argument_accuracy']:7.2f} "
              f"{f['argument_chance']:6.2f} {f['argument_accuracy'] / f['argument_chance']:5.2f}")
    answered, went_on = stop[True], stop[False]
    if answered and went_on:
        # How well P(answer) after a page separates the pages that hold the answer from those that do not,
        # whatever its level: 0.5 is no reading at all, 1 a perfect reader (a badly calibrated one included).
        auc = sum((a > b) + 0.5 * (a == b) for a in answered for b in went_on) / (len(answered) * len(went_on))
        figures["stop"] = {"auc": auc, "p_answer_where_expert_answered": statistics.fmean(answered),
                           "p_answer_where_expert_went_on": statistics.fmean(went_on)}
        print(f"after a page: P(answer) {statistics.fmean(answered):.2f} where the expert answered "
              f"({len(answered)}), {statistics.fmean(went_on):.2f} where it went on ({len(went_on)}); "
              f"AUC {auc:.2f} (0.5: no reading)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def _argument(tool: str) -> str:
    from longhaul.actors.tool_calls import TOOL_SCHEMAS

    [argument] = TOOL_SCHEMAS[tool]
    return argument


if __name__ == "__main__":
    main()
