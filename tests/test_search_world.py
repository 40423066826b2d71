"""The simulated search world: determinism from the seed, answerable tasks, BM25 search, paging, grading, the split.

Most checks run on a small world; those about the default config (a 12-hop task, even hop counts, build time) build
the default world once for the module.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longhaul.actors.search_world import (
    MAX_RELATIONS_PER_ENTITY,
    Grade,
    SearchHit,
    SearchWorld,
    UnknownDocument,
    UnknownTask,
)
from longhaul.config import WorldConfig

SMALL = WorldConfig(seed=7, num_entities=60, relations_per_entity=4, docs_per_entity=3, min_hops=1, max_hops=6,
                    num_tasks=120, test_fraction=0.25)
QUERIES = ("mayor", "founded in", "the river flowing through", "university students", "sequel")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small() -> SearchWorld:
    return SearchWorld.generate(SMALL)


@pytest.fixture(scope="module")
def default() -> SearchWorld:
    return SearchWorld.generate(WorldConfig())


def subject_of(page: str) -> str:
    """The entity a page covers: its title up to an optional `: section`."""
    return page.split("\n", 1)[0].split(":", 1)[0]


def mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def world_digest(config: WorldConfig = SMALL) -> str:
    """SHA-256 over every page, every task and the hits of a few queries."""
    world = SearchWorld.generate(config)
    digest = hashlib.sha256()
    for text in world.corpus_texts():
        digest.update(text.encode() + b"\0")
    for task in world.tasks():
        digest.update(repr(task).encode())
    for query in QUERIES:
        digest.update(repr(world.search(query, k=10)).encode())
    return digest.hexdigest()


# ---- determinism ------------------------------------------------------------------------------------------------


def test_same_config_builds_an_identical_world(small):
    again = SearchWorld.generate(SMALL)
    assert list(again.corpus_texts()) == list(small.corpus_texts())
    assert again.tasks() == small.tasks()
    for query in QUERIES:
        assert again.search(query, k=10) == small.search(query, k=10)


def test_another_seed_builds_another_world(small):
    other = SearchWorld.generate(SMALL.model_copy(update={"seed": 8}))
    assert list(other.corpus_texts()) != list(small.corpus_texts())
    assert [t.question for t in other.tasks()] != [t.question for t in small.tasks()]


def test_world_is_identical_across_processes_with_different_hash_seeds():
    here = world_digest()
    for hash_seed in ("1", "4242"):
        result = subprocess.run(
            [sys.executable, "-c", "from tests.test_search_world import world_digest; print(world_digest())"],
            cwd=REPO, env={**os.environ, "PYTHONHASHSEED": hash_seed}, capture_output=True, text=True, timeout=60,
            check=True,
        )
        assert result.stdout.strip() == here


@pytest.mark.parametrize("module", ["longhaul.actors.search_world", "longhaul.actors.argument_choices"])
@pytest.mark.parametrize(("before", "after"), [(None, "cpu"), ("cuda", "cuda")])
def test_importing_bm25s_keeps_jax_off_the_gpu_unless_the_user_chose(module, before, after):
    # bm25s runs jax at import when jax is installed; on a GPU that takes 75 % of its memory from the vLLM engine.
    # Both of its importers, each first in a fresh process (the agent loop imports the argument choices first).
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | ({"JAX_PLATFORMS": before} if before else {})
    result = subprocess.run(
        [sys.executable, "-c", f"import os, sys, {module}; print(os.environ['JAX_PLATFORMS'], 'bm25s' in sys.modules)"],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == [after, "True"]


# ---- tasks ------------------------------------------------------------------------------------------------------


def test_every_answer_is_reachable_by_following_the_evidence(default):
    for task in default.tasks():
        pages = [default.open(doc_id) for doc_id in task.evidence_doc_ids]
        assert mentions(task.question, subject_of(pages[0])), task
        for page, next_page in zip(pages, pages[1:], strict=False):
            assert mentions(page, subject_of(next_page)), task  # each hop's page names the entity the next one covers
        assert task.answer in pages[-1], task


def test_a_task_has_one_distinct_evidence_page_per_hop(default):
    for task in default.tasks():
        assert task.hops == len(task.evidence_doc_ids) == len(set(task.evidence_doc_ids)), task


def test_hop_counts_span_min_to_max_evenly(default):
    counts = Counter(task.hops for task in default.tasks())
    assert sorted(counts) == list(range(1, 17))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == 20000


def test_default_world_has_16_hop_tasks_over_16_distinct_pages(default):
    """With three pages per entity, finding and reading 16 pages takes 40+ tool calls: the long-horizon regime."""
    longest = [task for task in default.tasks() if task.hops == 16]
    assert len(longest) == 1250
    assert all(len(set(task.evidence_doc_ids)) == 16 for task in longest)


def test_no_two_tasks_ask_the_same_question(default):
    questions = [task.question for task in default.tasks()]
    assert len(set(questions)) == len(questions)


def test_split_is_disjoint_sized_by_test_fraction_and_balanced_over_hops(small):
    train, test = small.tasks("train"), small.tasks("test")
    assert len(test) == round(120 * 0.25) == 30
    assert len(train) == 90
    assert {t.task_id for t in train}.isdisjoint(t.task_id for t in test)
    assert sorted(train + test, key=lambda t: t.task_id) == small.tasks()
    assert all(t.split == "test" for t in test) and all(t.split == "train" for t in train)
    assert Counter(t.hops for t in test) == {hops: 5 for hops in range(1, 7)}


def test_task_looks_up_by_id_and_unknown_task_raises_naming_it(small):
    first = small.tasks()[0]
    assert small.task(first.task_id) is first
    with pytest.raises(UnknownTask, match="t99999") as caught:
        small.task("t99999")
    assert isinstance(caught.value, KeyError)
    assert caught.value.task_id == "t99999"


# ---- search and open -----------------------------------------------------------------------------------------------


def entity_names(world: SearchWorld) -> list[str]:
    """Each entity's name: the title of its first page, the only one without a `: section`."""
    pages = list(world.corpus_texts())[: world.num_documents]
    return [title for page in pages if ":" not in (title := page.split("\n", 1)[0])]


def test_searching_an_entity_name_finds_a_page_about_it_in_the_top_5(small):
    names = entity_names(small)
    assert len(names) == len(set(names)) == 60
    for name in names:
        hits = small.search(name, k=5)
        assert any(hit.title == name or hit.title.startswith(name + ":") for hit in hits), name
        for hit in hits:
            assert set(re.findall(r"\w+", hit.snippet.lower())) & set(name.lower().split()), (name, hit)


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(["mayor", "river", "founded", "students", "1950", "Holdings", "population",
                                       "capital", "zzqxv", "the", "of"]), max_size=5),
       k=st.integers(min_value=1, max_value=12))
def test_hits_are_at_most_k_best_first_and_share_a_word_with_the_query(small, words, k):
    query = " ".join(words)
    hits = small.search(query, k=k)
    assert len(hits) <= k
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    query_words = set(query.lower().split())
    for hit in hits:
        assert hit.score > 0
        assert query_words & set(re.findall(r"\w+", hit.snippet.lower())), hit
        assert small.open(hit.doc_id).startswith(hit.title + "\n\n")
        assert hit.snippet in small.open(hit.doc_id)


@pytest.mark.parametrize("query", ["", "   ", "\n\t", "the of and", "zzqxv"])
def test_blank_stopword_or_unknown_query_returns_no_hits(small, query):
    assert small.search(query) == []


def test_k_below_one_is_rejected(small):
    with pytest.raises(ValueError, match="k must be at least 1"):
        small.search("mayor", k=0)


def test_search_returns_typed_hits_with_doc_ids(small):
    hits = small.search("mayor", k=3)
    assert len(hits) == 3
    assert all(isinstance(hit, SearchHit) and re.fullmatch(r"d\d{4}", hit.doc_id) for hit in hits)


def test_open_unknown_id_raises_unknown_document_naming_it(small):
    with pytest.raises(UnknownDocument, match="d9999") as caught:
        small.open("d9999")
    assert isinstance(caught.value, KeyError)
    assert caught.value.doc_id == "d9999"


def test_corpus_texts_are_every_page_then_every_question(small):
    texts = list(small.corpus_texts())
    assert small.num_documents == 60 * 3
    assert len(texts) == 180 + 120
    assert texts[:180] == [small.open(f"d{n:04d}") for n in range(1, 181)]
    assert texts[180:] == [task.question for task in small.tasks()]


# ---- grading -------------------------------------------------------------------------------------------------------


def task_with_answer_words(world: SearchWorld, count: int):
    return next(t for t in world.tasks() if len(t.answer.split()) == count and t.answer.replace(" ", "").isalpha())


def test_answer_with_other_case_punctuation_and_articles_is_an_exact_match(small):
    task = task_with_answer_words(small, 2)
    first, second = task.answer.split()
    assert small.grade(task.task_id, f"  The {first.upper()}, {second.lower()}!  ") == Grade(exact_match=1.0, f1=1.0)


def test_partial_answer_gets_f1_credit_only(small):
    task = task_with_answer_words(small, 2)
    first, _ = task.answer.split()
    assert small.grade(task.task_id, first) == Grade(exact_match=0.0, f1=2 / 3)  # precision 1, recall 1/2
    assert small.grade(task.task_id, f"{first} Zzqxv") == Grade(exact_match=0.0, f1=0.5)


def test_wrong_or_empty_answer_scores_zero(small):
    task = small.tasks()[0]
    assert small.grade(task.task_id, "certainly not this") == Grade(exact_match=0.0, f1=0.0)
    assert small.grade(task.task_id, "") == Grade(exact_match=0.0, f1=0.0)


def test_numbers_grade_without_their_thousands_separators(default):
    task = next(t for t in default.tasks() if "," in t.answer)
    assert default.grade(task.task_id, task.answer.replace(",", "")) == Grade(exact_match=1.0, f1=1.0)


def test_evidence_recall_is_the_share_of_the_tasks_evidence_pages_read_whatever_else_was_read(small):
    task = next(t for t in small.tasks() if t.hops == 2)
    first, last = task.evidence_doc_ids
    other = next(d.doc_id for d in small.search(task.question, 5) if d.doc_id not in task.evidence_doc_ids)
    assert small.grade(task.task_id, "wrong") == Grade(exact_match=0.0, f1=0.0, evidence_recall=0.0)
    assert small.grade(task.task_id, "wrong", [other, first, first, "no-such-page"]) == Grade(
        exact_match=0.0, f1=0.0, evidence_recall=0.5)
    assert small.grade(task.task_id, task.answer, [last, other, first]) == Grade(
        exact_match=1.0, f1=1.0, evidence_recall=1.0)


def test_grading_an_unknown_task_raises(small):
    with pytest.raises(UnknownTask, match="nope"):
        small.grade("nope", "anything")


# ---- construction ---------------------------------------------------------------------------------------------------


def test_default_world_builds_in_under_five_seconds():
    started = time.perf_counter()
    SearchWorld.generate(WorldConfig(seed=1))
    assert time.perf_counter() - started < 5.0


def test_more_relations_per_entity_than_any_type_has_is_rejected_by_the_config():
    assert WorldConfig(relations_per_entity=MAX_RELATIONS_PER_ENTITY).relations_per_entity == MAX_RELATIONS_PER_ENTITY
    with pytest.raises(ValueError, match="relations_per_entity\n  Input should be less than or equal to 6"):
        WorldConfig(relations_per_entity=MAX_RELATIONS_PER_ENTITY + 1)


def test_world_too_small_for_its_longest_tasks_is_rejected_by_the_config():
    # Eight entities cannot hold a path of thirteen distinct entities.
    with pytest.raises(ValueError, match="num_entities=8 is too small for max_hops=12"):
        WorldConfig(num_entities=8, max_hops=12, num_tasks=12)


def test_tiny_world_within_its_limits_builds():
    world = SearchWorld.generate(WorldConfig(num_entities=8, max_hops=3, num_tasks=12, test_fraction=0.25,
                                             docs_per_entity=2))
    assert world.num_documents == 16
    assert Counter(t.hops for t in world.tasks()) == {1: 4, 2: 4, 3: 4}
