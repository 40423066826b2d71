"""The learner's replay of constrained turns (`learner/grammar_mask.py`) against xgrammar's, in the same run.

    python bench/grammar_replay.py [--episodes 300] [--rounds 5] [--json PATH]

The learner scores every constrained token under the mask its turn's grammar gave the engine, so it replays each
constrained turn of every trajectory it trains. Measured: `GrammarMasks.bitmask` on the constrained turns of scripted-
expert episodes of the default world and warm-up mix (argument-choices schemas, each one new). Baseline: what the
learner did before, and what vLLM does per request: xgrammar compiles the turn's JSON schema (compact separators, no
cache, since no schema repeats) and a matcher walks the generated tokens. Every mask of the two is compared bit for
bit. Rounds alternate measured and baseline (A B A B ...) because these machines are noisy; the ratio per round is
baseline time / measured time, reported as the median with the min–max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def xgrammar_bitmask(compiler, xgrammar, stops: list[int], vocab: int, schema: str, tokens: list[int]):
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":")),
                                      override_stop_tokens=stops)
    bitmask = xgrammar.allocate_token_bitmask(len(tokens), vocab)
    for row, token in enumerate(tokens):
        matcher.fill_next_token_bitmask(bitmask, row)
        if not matcher.accept_token(token):
            raise ValueError(f"xgrammar refuses token {token} at {row} of an expert's turn")
    return bitmask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=300, help="expert episodes whose constrained turns replay")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch
    import xgrammar
    from transformers import AutoConfig, AutoTokenizer

    from longhaul.actors.tiny_model import ensure_run_model
    from longhaul.config import LonghaulConfig
    from longhaul.learner.grammar_mask import GrammarMasks
    from longhaul.warm_start import play_demonstrations

    config = LonghaulConfig()
    config = config.model_copy(update={"warmup": config.warmup.model_copy(update={"demonstrations": args.episodes})})
    model_dir = ensure_run_model(config.model, config.world)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    episodes = play_demonstrations(config, model_dir)  # the warm-up's own expert, on the first of its tasks
    turns = []
    for episode in episodes:
        offsets = episode.turn_offsets
        for turn, schema in enumerate(episode.turn_grammars):
            start, end = int(offsets[turn]), int(offsets[turn + 1])
            positions = start + np.flatnonzero(episode.loss_mask[start:end])
            if schema and len(positions):
                turns.append((schema, episode.token_ids[positions].tolist()))
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    grammars = GrammarMasks.for_model(model_dir, vocab)
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    print(f"{len(turns)} constrained turns of {len(episodes)} expert episodes "
          f"({sum(len(t) for _, t in turns) / len(turns):.1f} generated tokens a turn)")

    measured, baseline, ratios = [], [], []
    for round_ in range(args.rounds):
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        started = time.perf_counter()
        ours = [grammars.bitmask(schema, tokens) for schema, tokens in turns]
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        theirs = [xgrammar_bitmask(compiler, xgrammar, grammars.stop_token_ids, vocab, schema, tokens)
                  for schema, tokens in turns]
        theirs_s = time.perf_counter() - started
        if not all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)):
            raise SystemExit("the two replays disagree on a mask: the learner would score a turn wrongly")
        measured.append(ours_s / len(turns) * 1e3)
        baseline.append(theirs_s / len(turns) * 1e3)
        ratios.append(theirs_s / ours_s)
        print(f"round {round_ + 1}: learner {measured[-1]:.3f} ms a turn, xgrammar {baseline[-1]:.3f} ms a turn, "
              f"{ratios[-1]:.1f}x", flush=True)
    figures = {"turns": len(turns), "episodes": len(episodes), "learner_ms_per_turn": statistics.median(measured),
               "xgrammar_ms_per_turn": statistics.median(baseline), "speedup": statistics.median(ratios),
               "speedup_min": min(ratios), "speedup_max": max(ratios), "masks_identical": True}
    print(f"replay of a constrained turn: {figures['learner_ms_per_turn']:.3f} ms against xgrammar's "
          f"{figures['xgrammar_ms_per_turn']:.3f} ms: {figures['speedup']:.1f}x faster "
          f"[{figures['speedup_min']:.1f}–{figures['speedup_max']:.1f}], masks identical bit for bit")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
