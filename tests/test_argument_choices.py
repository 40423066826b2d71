"""Argument choices: the strings an episode has shown become the only arguments its next constrained call may take."""

from __future__ import annotations

from longhaul.actors.argument_choices import ArgumentChoices, admits
from longhaul.actors.search_world import SearchHit

HITS = [SearchHit("d0965", "Raigrou College", "Raigrou College is a private university.", 5.9),
        SearchHit("d0104", "Raigrou College: History", "This page covers the history of Raigrou College.", 5.8)]
HITS_TEXT = "\n".join(f"[{h.doc_id}] {h.title}: {h.snippet}" for h in HITS)
PAGE = ("Raigrou College: History\n\nRaigrou College receives most of its funding from Buhan Holdings. "
        "Raigrou College was founded in 1521. It enrols 2,252,644 students, mostly in epic poem studies.")


def test_before_any_search_only_the_questions_names_can_be_searched_and_nothing_opened_or_answered():
    choices = ArgumentChoices("What is the founding year of Raigrou College?")
    assert choices.choices("search") == [" What", " Raigrou College"]
    assert choices.choices("open") == choices.choices("answer") == []
    schema = choices.schema(("search", "open", "answer"))
    assert [alt["properties"]["name"]["const"] for alt in schema["anyOf"]] == ["search"]


def test_a_search_offers_its_doc_ids_its_titles_and_the_names_it_showed():
    choices = ArgumentChoices("What is the founding year of Raigrou College?")
    choices.saw_hits(HITS, HITS_TEXT)
    assert choices.choices("open") == ["d0965", "d0104"]
    assert choices.choices("search") == [" What", " Raigrou College", " History", " This", " Raigrou College History"]


def test_a_page_offers_its_names_numbers_words_and_word_pairs_as_answers_and_is_not_offered_again():
    choices = ArgumentChoices("What is the founding year of Raigrou College?")
    choices.saw_hits(HITS, HITS_TEXT)
    choices.saw_page("d0104", PAGE)
    answers = choices.choices("answer")
    for value in (" 1521", " 2,252,644", " Buhan Holdings", " epic poem", " founded", " epic poem studies"):
        assert value in answers, value
    # Whole words; runs of at most three lowercase words, inside one clause, without a stopword.
    assert " aigrou" not in answers and " 2,252,644 students" not in answers and " mostly epic poem" not in answers
    assert " in epic poem" not in answers and " founded in" not in answers and " in" not in answers
    assert len(answers) == len(set(answers))
    assert choices.choices("open") == ["d0965"]
    assert " Buhan Holdings" in choices.choices("search")
    choices.saw_hits(HITS, HITS_TEXT)  # a new search: its results may all be opened again
    assert choices.choices("open") == ["d0965", "d0104"]


def test_the_schema_admits_exactly_the_offered_calls():
    choices = ArgumentChoices("What is the founding year of Raigrou College?")
    choices.saw_hits(HITS, HITS_TEXT)
    schema = choices.schema(("search", "open", "answer"))
    assert admits(schema, {"name": "open", "arguments": {"doc_id": "d0104"}})
    assert not admits(schema, {"name": "open", "arguments": {"doc_id": "d9999"}})
    assert admits(schema, {"name": "search", "arguments": {"query": " Raigrou College"}})
    assert not admits(schema, {"name": "search", "arguments": {"query": "Raigrou College"}})  # the space is the form
    assert not admits(schema, {"name": "search", "arguments": {"doc_id": "d0104"}})
    assert not admits(ArgumentChoices("no names here").schema(("open",)) or {"anyOf": []},
                      {"name": "open", "arguments": {"doc_id": "d0104"}})
