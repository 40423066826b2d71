"""The engine's choice masks (`actors/choice_masks.py`) under vLLM's V1 logits-processor contract: what each request
may sample is exactly what the learner replays, as requests join, leave and move within the batch."""

from __future__ import annotations

import json
import random

import pytest
import torch
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from longhaul.actors.choice_masks import CHOICE_CALLS, ChoiceCallMasks
from longhaul.call_grammar import choice_calls
from longhaul.learner.grammar_mask import GrammarMasks, unpack_bitmask


@pytest.fixture(scope="module")
def setting(tiny_model_dir):
    from transformers import AutoConfig
    from vllm.config import ModelConfig, VllmConfig

    from longhaul.actors.argument_choices import ArgumentChoices
    from longhaul.actors.search_world import SearchWorld
    from tests.conftest import SMALL_WORLD

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    grammars = GrammarMasks.for_model(tiny_model_dir, vocab)
    world = SearchWorld.generate(SMALL_WORLD)
    schemas = []
    for task in world.tasks()[:3]:  # before any search, after one, after opening a page: each a new schema
        choices = ArgumentChoices(task.question)
        schemas.append(choices.schema(["search", "open", "answer"]))
        hits = world.search(task.question)
        choices.saw_hits(hits, "\n".join(f"{hit.doc_id} {hit.title}: {hit.snippet}" for hit in hits))
        schemas.append(choices.schema(["search", "open", "answer"]))
        choices.saw_page(hits[0].doc_id, world.open(hits[0].doc_id))
        schemas.append(choices.schema(["search", "open", "answer"]))
    schemas = [json.dumps(schema, separators=(",", ":")) for schema in schemas]
    config = VllmConfig(model_config=ModelConfig(model=str(tiny_model_dir)))
    return config, grammars, schemas, vocab


def turn_params(schema: str, grammars: GrammarMasks) -> SamplingParams:
    """A constrained turn's request as the engine sends it, stopping where the learner expects it to."""
    calls = [call.decode() for call in choice_calls(schema)]
    return SamplingParams(max_tokens=128, stop_token_ids=grammars.stop_token_ids, extra_args={CHOICE_CALLS: calls})


def admitted_rows(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


def test_each_request_samples_from_exactly_what_the_learner_replays_as_the_batch_changes(setting):
    config, grammars, schemas, vocab = setting
    processor = ChoiceCallMasks(config, torch.device("cpu"), is_pin_memory=False)
    rng = random.Random(0)
    # Batch index -> (schema or None for a free request, the live output list vLLM shares with the processor).
    batch: dict[int, tuple[str | None, list[int]]] = {}
    pending = list(schemas)
    finished_turns = steps = 0

    def add(index: int, schema: str | None) -> tuple:
        batch[index] = (schema, [])
        params = turn_params(schema, grammars) if schema else SamplingParams(max_tokens=128)
        return index, params, [1, 2, 3], batch[index][1]

    update = BatchUpdate(batch_size=4, removed=[], moved=[],
                         added=[add(0, pending.pop()), add(1, None), add(2, pending.pop()), add(3, pending.pop())])
    while batch:
        processor.update_state(update)
        logits = torch.randn(len(batch), vocab)
        free = logits.clone()
        allowed = admitted_rows(processor.apply(logits))
        steps += 1
        done = []
        for index, (schema, output) in batch.items():
            if schema is None:
                assert torch.equal(logits[index], free[index])  # an unconstrained request is untouched
                token = rng.randrange(vocab)
                if len(output) == 20:
                    done.append(index)
            else:
                # The learner's replay of the turn so far plus any next token: its last row is what may come next.
                expected = unpack_bitmask(grammars.bitmask(schema, [*output, min(allowed[index])]), vocab)[-1]
                assert allowed[index] == set(expected.nonzero().flatten().tolist())
                assert torch.equal(logits[index][expected], free[index][expected])
                token = rng.choice(sorted(allowed[index]))
                if token in grammars.stop_token_ids:
                    done.append(index)
            output.append(token)
        removed, added, moved = [], [], []
        for index in done:
            finished_turns += batch[index][0] is not None
            if pending:  # a new turn takes the slot
                added.append(add(index, pending.pop()))
            else:
                del batch[index]
                removed.append(index)
        # vLLM condenses the batch: the last request moves into a freed slot.
        for index in sorted(removed):
            last = max(batch, default=-1)
            if last > index:
                batch[index] = batch.pop(last)
                moved.append((last, index, MoveDirectionality.UNIDIRECTIONAL))
        if len(batch) >= 2 and steps % 7 == 0:  # and sometimes reorders it
            a, b = sorted(batch)[:2]
            batch[a], batch[b] = batch[b], batch[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        update = BatchUpdate(batch_size=len(batch), removed=removed, added=added, moved=moved)
    assert finished_turns == len(schemas)


def test_a_token_not_yet_known_waits_and_a_finished_turn_admits_only_its_stop_tokens(setting):
    config, grammars, schemas, vocab = setting
    processor = ChoiceCallMasks(config, torch.device("cpu"), is_pin_memory=False)
    schema = schemas[0]
    call = choice_calls(schema)[0].decode()
    from transformers import AutoTokenizer

    spelled = AutoTokenizer.from_pretrained(config.model_config.tokenizer).encode(call, add_special_tokens=False)
    output = spelled[:3] + [-1]  # async scheduling: the last sampled token is not on the host yet
    processor.update_state(BatchUpdate(batch_size=1, removed=[], moved=[],
                                       added=[(0, turn_params(schema, grammars), [1], output)]))
    [allowed] = admitted_rows(processor.apply(torch.zeros(1, vocab)))
    assert allowed == set(unpack_bitmask(grammars.bitmask(schema, spelled[:4]), vocab)[3].nonzero().flatten().tolist())

    output[3:] = spelled[3:] + [grammars.stop_token_ids[0]]  # the call, complete, and its stop
    processor.update_state(None)
    [allowed] = admitted_rows(processor.apply(torch.zeros(1, vocab)))
    assert allowed == set(grammars.stop_token_ids)  # a step vLLM may still compute for it, and drop


@pytest.mark.parametrize("calls, message", [
    ("not a list", "must be a non-empty list of ASCII strings"),
    ([], "must be a non-empty list of ASCII strings"),
    (['{"name":"open"}', 7], "must be a non-empty list of ASCII strings"),
    (["caf\u00e9"], "must be a non-empty list of ASCII strings"),
])
def test_a_request_naming_malformed_calls_is_refused_with_the_argument_named(calls, message):
    with pytest.raises(ValueError, match=message) as error:
        ChoiceCallMasks.validate_params(SamplingParams(extra_args={CHOICE_CALLS: calls}))
    assert CHOICE_CALLS in str(error.value)


def test_a_request_is_held_to_its_calls_or_to_a_grammar_not_both():
    both = SamplingParams(extra_args={CHOICE_CALLS: ['{"name":"open"}']},
                          structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    with pytest.raises(ValueError, match="not both"):
        ChoiceCallMasks.validate_params(both)
    ChoiceCallMasks.validate_params(SamplingParams(max_tokens=4))  # a request naming neither is none of its business
