"""Supervised warm-up on demonstrations: the loss it minimises, what it writes, and when it stops."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from longhaul.config import ToolServiceConfig, WarmupConfig
from longhaul.learner.warmup import cross_entropy, pack_demonstrations, sft_loss, warm_up
from tests.conftest import SMALL_WORLD


@pytest.fixture(scope="module")
def demos(tiny_model_dir):
    """24 expert episodes on SMALL_WORLD's 1- and 2-hop train tasks."""
    from transformers import AutoTokenizer

    from longhaul.actors.agent_loop import ChatFormat
    from longhaul.actors.demonstrations import DemonstrationMix, choose_tasks, demonstrate
    from longhaul.actors.search_world import SearchWorld
    from longhaul.actors.tool_service import ToolClient, serve
    from longhaul.config import AgentConfig

    world = SearchWorld.generate(SMALL_WORLD)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tasks = choose_tasks(world, DemonstrationMix(count=24, hop_weights={1: 1, 2: 1}), seed=0)

    async def scenario():
        server, port = await serve(ToolServiceConfig(), world)
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig()) as tools:
                return await demonstrate(world, tasks, tools=tools, chat=ChatFormat(tokenizer), tokenizer=tokenizer,
                                         agent=AgentConfig(), top_k=ToolServiceConfig().search_top_k)
        finally:
            await server.stop(0)

    return asyncio.run(scenario())


def test_the_loss_is_the_mean_cross_entropy_of_masked_tokens_whatever_the_micro_batching(tiny_model_dir, demos):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = demos[:5]
    expected_sum, expected_count = 0.0, 0
    with torch.no_grad():
        for demo in batch:  # one sequence at a time, by hand: −log π of every token whose mask is 1
            ids = torch.from_numpy(demo.token_ids.astype("int64"))[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
            mask = torch.from_numpy(demo.loss_mask[1:].astype(bool))
            expected_sum -= float(picked[mask].sum())
            expected_count += int(mask.sum())
    for micro_batch_tokens in (64, 4096, 1 << 20):  # one sequence per pass, a few, all at once
        loss, count = sft_loss(model, pack_demonstrations(batch, micro_batch_tokens), backward=False)
        assert count == expected_count == sum(int(d.loss_mask.sum()) for d in batch)
        assert loss == pytest.approx(expected_sum / expected_count, rel=1e-4)


def test_grammar_scored_loss_renormalises_each_constrained_token_over_what_its_grammar_admits(tiny_model_dir, demos):
    from transformers import AutoModelForCausalLM

    from longhaul.learner.grammar_mask import GrammarMasks, unpack_bitmask

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    grammars = GrammarMasks.for_model(tiny_model_dir, model.config.vocab_size)
    batch = demos[:3]
    expected_sum, expected_count, forced = 0.0, 0, 0
    with torch.no_grad():
        for demo in batch:
            ids = torch.from_numpy(demo.token_ids.astype("int64"))[None]
            logits = model(input_ids=ids).logits[0].float()
            positions, bitmask = grammars.admitted(demo)
            admitted = dict(zip(positions.tolist(), unpack_bitmask(bitmask, logits.shape[-1]), strict=True))
            for position in map(int, np.flatnonzero(demo.loss_mask)):
                scores = logits[position - 1]
                if position in admitted:
                    scores = scores.masked_fill(~admitted[position], -torch.inf)
                    forced += int(admitted[position].sum()) == 1
                expected_sum -= float(torch.log_softmax(scores, -1)[ids[0, position]])
                expected_count += 1
    loss, count = sft_loss(model, pack_demonstrations(batch, 4096, grammars), backward=False)
    assert count == expected_count
    assert loss == pytest.approx(expected_sum / expected_count, rel=1e-4)
    # Every demonstrated call is constrained, and a third of its tokens are the only token the JSON around the
    # decisions admits: they cost nothing, so the loss is spent on which tool and which argument.
    assert len(admitted) == int(batch[-1].loss_mask.sum()) and forced > expected_count / 4
    assert loss < sft_loss(model, pack_demonstrations(batch, 4096), backward=False)[0] / 2


def test_a_bfloat16_pass_pads_micro_batches_to_256_and_scores_them_as_float32_does(tiny_model_dir, demos):
    from transformers import AutoModelForCausalLM

    from longhaul.learner.grammar_mask import GrammarMasks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    grammars = GrammarMasks.for_model(tiny_model_dir, model.config.vocab_size)
    batch = demos[:8]
    exact = pack_demonstrations(batch, 4096, grammars)
    padded = pack_demonstrations(batch, 4096, grammars, torch.bfloat16)
    assert {mb.input_ids.shape[1] % 256 for mb in padded} == {0}
    assert any(mb.input_ids.shape[1] % 256 for mb in exact)  # the padding is the bf16 path's own
    assert sorted(i for mb in padded for i in mb.indices) == list(range(8))

    def loss_and_gradient(micro_batches, dtype):
        loss, count = sft_loss(model, micro_batches, backward=True, dtype=dtype)
        gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return loss, count, gradient

    loss32, count32, gradient32 = loss_and_gradient(exact, torch.float32)
    loss16, count16, gradient16 = loss_and_gradient(padded, torch.bfloat16)
    assert count16 == count32  # padding adds no trained token
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(gradient16, gradient32, dim=0) > 0.99
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay float32


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_warm_up_lowers_the_cross_entropy_of_the_expert_tokens_and_writes_a_model_dir_with_the_base_tokenizer(
        tiny_model_dir, demos, tmp_path, compute_dtype):
    from transformers import AutoTokenizer

    from longhaul.actors.tiny_model import validate_model_dir

    train, held_out = demos[:20], demos[20:]
    config = WarmupConfig(enabled=True, max_steps=30, epochs=30, learning_rate=3e-3, batch_tokens=8192, seed=0,
                          compute_dtype=compute_dtype)
    result = warm_up(tiny_model_dir, tmp_path / "warm", train, config)
    assert result.steps == 30 and len(result.losses) == 30
    assert result.loss_last < result.loss_first / 3
    # It generalises past the episodes it saw: held-out demonstrations are imitated better too.
    assert cross_entropy(result.model_dir, held_out) < cross_entropy(tiny_model_dir, held_out) / 3
    validate_model_dir(result.model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (result.model_dir / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["dtype"] == json.loads((tiny_model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert tokenizer.encode(tokenizer.decode(demos[0].token_ids.tolist()),
                            add_special_tokens=False) == demos[0].token_ids.tolist()


def test_warm_up_stops_after_the_step_that_crosses_its_time_budget(tiny_model_dir, demos, tmp_path):
    config = WarmupConfig(max_steps=1000, epochs=10, time_budget_s=1e-3, batch_tokens=4096)
    result = warm_up(tiny_model_dir, tmp_path / "warm", demos, config)
    assert result.steps == 1


def test_warm_up_refuses_to_overwrite_a_non_empty_directory_and_needs_masked_tokens(tiny_model_dir, demos, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        warm_up(tiny_model_dir, occupied, demos[:2], WarmupConfig(max_steps=1))
    assert (occupied / "keep.txt").read_text() == "mine"
    unmasked = demos[0]
    blank = type(unmasked)(**{**{f: getattr(unmasked, f) for f in unmasked.__slots__},
                              "loss_mask": np.zeros_like(unmasked.loss_mask)})
    with pytest.raises(ValueError, match="no masked token"):
        warm_up(tiny_model_dir, tmp_path / "blank", [blank], WarmupConfig(max_steps=1))
    assert not (tmp_path / "blank").exists()
