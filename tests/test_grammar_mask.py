"""The learner scores constrained turns under their grammars: admitted sets, renormalised logprobs, refused tokens."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from longhaul.actors.agent_loop import ChatFormat
from longhaul.buffer.store import Delivery
from longhaul.call_grammar import choice_calls
from longhaul.learner.batch import pack_micro_batches, token_logprobs
from longhaul.learner.grammar_mask import GrammarMasks, unpack_bitmask
from longhaul.learner.metrics import GRAMMAR_REFUSED
from longhaul.trajectory import Trajectory

# One call of `open` whose argument is one of two ids: the shape `ArgumentChoices.schema` gives a turn.
SCHEMA = {"anyOf": [{
    "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
    "properties": {"name": {"const": "open"}, "arguments": {
        "type": "object", "additionalProperties": False, "required": ["doc_id"],
        "properties": {"doc_id": {"enum": ["d0001", "d0002"]}}}}}]}
CALL = {"name": "open", "arguments": {"doc_id": "d0002"}}


@pytest.fixture(scope="module")
def setting(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    return tokenizer, ChatFormat(tokenizer), GrammarMasks.for_model(tiny_model_dir, vocab), vocab


def constrained_episode(tokenizer, chat: ChatFormat, call: dict, *, free_turn_first: bool = False) -> Trajectory:
    """A prompt, optionally a free turn, then one turn constrained by SCHEMA that generated `call` + `<|im_end|>`."""
    ids, mask, grammars, offsets = chat.prompt_ids("system", "question?"), [], [], []
    mask = [0] * len(ids)
    turns = [(None, tokenizer.encode("free text", add_special_tokens=False))] if free_turn_first else []
    turns.append((SCHEMA, tokenizer.encode(json.dumps(call, separators=(",", ":")), add_special_tokens=False)
                  + [chat.im_end]))
    for schema, generated in turns:
        offsets.append(len(ids))
        grammars.append(json.dumps(schema, separators=(",", ":")) if schema else "")
        ids += chat.call_prefix + generated + chat.call_suffix
        mask += [0] * len(chat.call_prefix) + [1] * len(generated) + [0] * len(chat.call_suffix)
    offsets.append(len(ids))
    mask = np.asarray(mask, dtype="u1")
    return Trajectory(
        trajectory_id="t1", task_id="task", group_id="g", actor_id="a", env="search",
        token_ids=np.asarray(ids, dtype="<u4"), loss_mask=mask,
        behavior_logprobs=np.where(mask == 1, -0.5, 0.0).astype("<f4"),
        versions=np.where(mask == 1, 0, -1).astype("<i4"), turn_offsets=np.asarray(offsets, dtype="<u4"),
        reward=0.0, num_turns=len(turns), num_tool_calls=len(turns), finish_reason="max_turns",
        turn_grammars=grammars)


def admitted_tokens(bitmask: torch.Tensor, vocab: int) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in unpack_bitmask(bitmask, vocab)]


def test_every_generated_token_of_a_constrained_turn_gets_its_grammars_admitted_set_and_free_turns_none(setting):
    tokenizer, chat, grammars, vocab = setting
    trajectory = constrained_episode(tokenizer, chat, CALL, free_turn_first=True)

    positions, bitmask = grammars.admitted(trajectory)

    second = int(trajectory.turn_offsets[1])
    expected = second + np.flatnonzero(trajectory.loss_mask[second:])
    assert positions.tolist() == expected.tolist()  # the free first turn contributes nothing
    admitted = admitted_tokens(bitmask, vocab)
    for position, allowed in zip(positions.tolist(), admitted, strict=True):
        assert int(trajectory.token_ids[position]) in allowed
    # After the complete call only the turn's stop tokens (the loop's and the model's EOS ids) remain.
    assert admitted[-1] == set(grammars.stop_token_ids) and chat.im_end in admitted[-1]
    # Where the argument starts, what is admitted spells the start of one of the two ids, and both ids can start.
    text = [tokenizer.decode(trajectory.token_ids[: p].tolist()) for p in positions.tolist()]
    argument = next(k for k, prefix in enumerate(text) if prefix.endswith('"doc_id":"'))
    spelled = {tokenizer.decode([t]) for t in admitted[argument]}
    assert spelled and all('d0001"'.startswith(x) or 'd0002"'.startswith(x) for x in spelled)
    for doc_id in ("d0001", "d0002"):
        assert tokenizer.encode(doc_id, add_special_tokens=False)[0] in admitted[argument]


def test_a_token_its_grammar_refuses_makes_the_trajectory_train_with_weight_zero_and_says_why(setting, caplog):
    tokenizer, chat, grammars, _ = setting
    refused = constrained_episode(tokenizer, chat, {"name": "open", "arguments": {"doc_id": "d0003"}})
    fine = constrained_episode(tokenizer, chat, CALL)
    before = GRAMMAR_REFUSED._value.get()

    with pytest.raises(ValueError, match="turn 0: token .* not admitted"):
        grammars.admitted(refused)
    with caplog.at_level(logging.WARNING, logger="longhaul.learner.batch"):
        [mb] = pack_micro_batches([Delivery(b"1-0", refused, "new", 0, 1.0), Delivery(b"2-0", fine, "new", 0, 1.0)],
                                  torch.zeros(2), 1 << 20, grammars)

    assert mb.sequence_weights.tolist() == [0.0, 1.0]
    assert GRAMMAR_REFUSED._value.get() == before + 1
    assert "trajectory t1 trains with weight 0: turn 0: token" in caplog.text
    # Only the accepted trajectory's tokens carry constraints.
    assert set(mb.constrained.rows.tolist()) == {1}


def xgrammar_bitmask(tokenizer, vocab: int, stops: list[int], schema: str, tokens: list[int]) -> torch.Tensor | str:
    """The reference: `tokens` walked through xgrammar's compiled `schema`, as vLLM masks a turn; the refusal as a
    string."""
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    matcher = xgrammar.GrammarMatcher(compiled, override_stop_tokens=stops)
    bitmask = xgrammar.allocate_token_bitmask(len(tokens), vocab)
    for row, token in enumerate(tokens):
        if matcher.is_terminated():
            return "after the stop token"
        matcher.fill_next_token_bitmask(bitmask, row)
        if not matcher.accept_token(token):
            return f"refused {row}"
    return bitmask


def test_argument_choice_turns_get_bit_for_bit_the_masks_xgrammar_computes_and_the_same_refusals(setting):
    from longhaul.actors.argument_choices import ArgumentChoices
    from longhaul.actors.search_world import SearchWorld
    from tests.conftest import SMALL_WORLD

    tokenizer, chat, grammars, vocab = setting
    world = SearchWorld.generate(SMALL_WORLD)
    task = world.tasks()[0]
    choices = ArgumentChoices(task.question)
    schemas = [choices.schema(["search", "open", "answer"])]  # only search has choices before any search
    hits = world.search(task.question)
    choices.saw_hits(hits, "\n".join(f"{hit.doc_id} {hit.title}: {hit.snippet}" for hit in hits))
    schemas.append(choices.schema(["search", "open", "answer"]))
    choices.saw_page(hits[0].doc_id, world.open(hits[0].doc_id))
    schemas.append(choices.schema(["search", "open", "answer"]))
    single_byte = {tokenizer.decode([t]): t for t in range(vocab) if len(tokenizer.decode([t]).encode()) == 1}
    checked = refused = 0
    for schema in (json.dumps(s, separators=(",", ":")) for s in schemas):
        calls = choice_calls(schema)
        assert calls is not None
        for call in calls:
            text = call.decode()
            # The tokenizer's own spelling of the call, and the same text one byte per token.
            for spelled in (tokenizer.encode(text, add_special_tokens=False), [single_byte[c] for c in text]):
                for tokens in (spelled + [chat.im_end],  # the call, then the stop: admitted
                               spelled[:-3] + [chat.im_end],  # stopped before the call is complete: refused
                               spelled + [chat.im_end, spelled[0]],  # a token after the stop: refused
                               spelled[:2] + [single_byte["x"]] + spelled[3:]):  # off every call: refused
                    expected = xgrammar_bitmask(tokenizer, vocab, grammars.stop_token_ids, schema, tokens)
                    if isinstance(expected, str):
                        with pytest.raises(ValueError):
                            grammars.bitmask(schema, tokens)
                        refused += 1
                    else:
                        assert torch.equal(grammars.bitmask(schema, tokens), expected), text
                    checked += 1
    assert checked >= 200 and refused >= checked / 2


def test_schemas_of_any_other_shape_are_left_to_xgrammar():
    from longhaul.actors.agent_loop import tool_call_schema

    def compact(schema) -> str:
        return json.dumps(schema, separators=(",", ":"))

    assert choice_calls(compact(SCHEMA)) == [b'{"name":"open","arguments":{"doc_id":"d0001"}}',
                                             b'{"name":"open","arguments":{"doc_id":"d0002"}}']
    quoted = json.loads(compact(SCHEMA))
    quoted["anyOf"][0]["properties"]["arguments"]["properties"]["doc_id"]["enum"] = ['say "hi"']
    extra = json.loads(compact(SCHEMA))
    extra["anyOf"][0]["properties"]["arguments"]["properties"]["doc_id"]["maxLength"] = 3
    for schema in (tool_call_schema(("search", "open", "answer")), quoted, extra, {**SCHEMA, "title": "call"}):
        assert choice_calls(compact(schema)) is None
    assert choice_calls("not json") is None


def test_constrained_logprobs_and_entropy_renormalise_over_the_admitted_tokens_and_pass_gradients():
    torch.manual_seed(0)
    vocab = 40
    logits = torch.randn(6, vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (6,))
    admitted = torch.zeros(2, vocab, dtype=torch.bool)
    admitted[0, [3, 7, int(targets[2])]] = True  # position 2
    admitted[1, [int(targets[4]), 11]] = True  # position 4
    indices = torch.tensor([2, 4])

    logp, entropy = token_logprobs(logits, targets, (indices, admitted))
    free_logp, free_entropy = token_logprobs(logits, targets)

    for position, allowed in zip(indices.tolist(), admitted, strict=True):
        reference = torch.log_softmax(logits[position].detach().masked_fill(~allowed, -torch.inf), -1)
        assert torch.allclose(logp[position], reference[targets[position]])
        p = reference.exp()
        assert torch.allclose(entropy[position], -(p[allowed] * reference[allowed]).sum())
    untouched = torch.tensor([True, True, False, True, False, True])
    assert torch.equal(logp[untouched], free_logp[untouched])
    assert torch.equal(entropy[untouched], free_entropy[untouched])
    logp.sum().backward()
    # A refused token's logit gets no gradient at a constrained position; an admitted one does.
    refused = next(t for t in range(vocab) if not admitted[1, t])
    assert logits.grad[4, 11] != 0 and logits.grad[4, refused] == 0
