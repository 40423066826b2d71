"""The simulated search world: a synthetic knowledge graph, pages written from it, a BM25 index, and multi-hop tasks.

Training against a live search API is slow, costly and not reproducible, so, like SearchGym and REDSearcher, the agent
searches a world we generate. `SearchWorld.generate` builds it in three stages, each from its own seeded
`random.Random`, so changing how pages are written never changes the graph:

1. The graph. Entities of eight types (person, city, country, company, river, book, university, band) with made-up,
   pronounceable names, each name holding a word no other entity's name holds. Every relation kind is functional
   (one object per subject) and typed; each entity has `relations_per_entity` of its type's kinds and every
   attribute of its type (founding year, population, ...). A few rules keep the world from contradicting itself:
   a country's capital is one of its own cities, and same-type relations (mentor, parent company, sequel, ...)
   point only at entities generated earlier, so they never form a cycle such as two books that are each other's
   sequel. No relation is stated from both ends, so nothing gives a question a second answer.
2. The corpus. `docs_per_entity` pages per entity, each a title and templated English sentences. Every fact
   (relation or attribute) is stated once, in one page of its subject, so an entity's facts are spread over its
   pages; distractor sentences name other entities so a name alone does not find the right page. Doc ids
   (`d0001`, ...) are assigned in shuffled order, so an id says nothing about which entity it covers. Every word of
   a page's title also appears in its body, so a hit's snippet always shares a word with the query that found it.
3. The tasks. A k-hop task walks k facts from a named start entity: k relations ending on an entity, or k - 1
   relations and then an attribute of the entity reached. The walk never revisits an entity, so its k facts live in
   k distinct pages and the agent needs at least k searches or opens. Hop counts cycle over min_hops..max_hops, no
   two tasks ask the same question, and the train/test split is drawn by task, balanced over hop counts.

Everything is a pure function of the `WorldConfig`: no string `hash()`, no iteration over sets, ties in search broken
by doc id. The same config gives byte-identical pages, identical tasks and identical search results in every
process, so each process may `generate` its own copy instead of shipping one. A built world is read-only, and safe to
share among threads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from longhaul.actors.bm25 import STOPWORDS_EN, bm25s
from longhaul.config import WorldConfig

# bm25s sets its logger to DEBUG and logs every index build: in every process that builds a world (the driver, the
# tool server, the warm-up), a line that tells the user nothing.
logging.getLogger("bm25s").setLevel(logging.WARNING)

Split = Literal["train", "test"]


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One result of `SearchWorld.search`: a page, its BM25 score, and the sentence of it that best matches."""

    doc_id: str
    title: str
    snippet: str
    score: float


@dataclass(frozen=True, slots=True)
class Task:
    """A multi-hop question over the world.

    Invariants: `hops == len(evidence_doc_ids)`; `evidence_doc_ids[i]` is the page that states fact i + 1 of the walk,
    a page of the entity reached after i hops (the first is a page of the entity the question names); the ids are
    distinct; `answer` appears verbatim in the page `evidence_doc_ids[-1]`.
    """

    task_id: str
    question: str
    answer: str
    hops: int
    evidence_doc_ids: tuple[str, ...]
    split: Split


@dataclass(frozen=True, slots=True)
class Grade:
    """Scores of an answer, each in [0, 1]: SQuAD-style exact match and token F1, and how much of the task's
    evidence the agent had read."""

    exact_match: float
    f1: float
    evidence_recall: float = 0.0
    """Share of the task's evidence pages (`Task.evidence_doc_ids`) among those the agent opened."""


class _UnknownKey(KeyError):
    # KeyError's str() is the repr of its argument; a lookup failure reads better as the plain sentence.
    def __str__(self) -> str:
        return str(self.args[0])


class UnknownDocument(_UnknownKey):
    """`open` was asked for a doc id the world does not have."""

    def __init__(self, doc_id: str):
        super().__init__(f"no document with id {doc_id!r}")
        self.doc_id = doc_id


class UnknownTask(_UnknownKey):
    """A task id the world does not have."""

    def __init__(self, task_id: str):
        super().__init__(f"no task with id {task_id!r}")
        self.task_id = task_id


# ---- the schema of the world --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _EntityType:
    name: str
    share: float
    """Fraction of the entities that are of this type."""
    noun: str
    name_format: str
    """How a full name is made from the entity's unique `{core}` word, a `{given}` name and a `{suffix}`."""
    suffixes: tuple[str, ...]
    adjectives: tuple[str, ...]
    sections: tuple[str, ...]
    """Titles of an entity's pages after the first; beyond these, pages are numbered."""


@dataclass(frozen=True, slots=True)
class _Relation:
    name: str
    subject: str
    object: str
    phrase: str
    """Noun phrase naming the object in a question, `{x}` standing for the phrase naming the subject."""
    sentences: tuple[str, ...]
    """Ways a page states the fact, `{s}` the subject's name, `{o}` the object's."""
    required: bool = False
    """Every entity of the subject type has it (it counts toward `relations_per_entity`)."""
    inverse_of: str | None = None
    """The object must be an entity whose `inverse_of` relation points back at the subject."""
    acyclic: bool = False
    """The object is an entity of the same type generated earlier, so chains of this relation never loop."""


@dataclass(frozen=True, slots=True)
class _Attribute:
    name: str
    subject: str
    label: str
    """Noun phrase of the value in a question: "What is the {label} of ...?"."""
    sentences: tuple[str, ...]
    """Ways a page states the value, `{v}` the value, `{va}` the value after "a"/"an"."""
    value: Callable[[random.Random], str]


def _year(low: int, high: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(low, high))


def _count(low: int, high: int) -> Callable[[random.Random], str]:
    return lambda rng: f"{rng.randint(low, high):,}"


def _one_of(options: tuple[str, ...]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(options)


def _currency(rng: random.Random) -> str:
    return _word(rng, 2).lower()


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


_TYPES: Final = (
    _EntityType("person", 0.28, "figure", "{given} {core}", (), ("noted", "celebrated", "little-known", "respected"),
                ("Early life", "Career", "Later life", "Legacy")),
    _EntityType("city", 0.14, "city", "{core}", (), ("small", "historic", "busy", "old"),
                ("History", "Geography", "Economy", "Culture")),
    _EntityType("country", 0.06, "country", "{core}", (), ("small", "mountainous", "coastal", "landlocked"),
                ("History", "Politics", "Geography", "Economy")),
    _EntityType("company", 0.12, "company", "{core} {suffix}",
                ("Holdings", "Works", "Group", "Industries", "Trading", "Systems"),
                ("private", "family-owned", "listed", "venerable"),
                ("History", "Operations", "Ownership", "Reception")),
    _EntityType("river", 0.08, "river", "{core} River", (), ("long", "slow", "winding", "cold"),
                ("Course", "Hydrology", "History", "Ecology")),
    _EntityType("book", 0.12, "book", "{core} {suffix}",
                ("Nights", "Letters", "Chronicle", "Songs", "Tales", "Winter", "Harbour", "Garden"),
                ("famous", "forgotten", "influential", "slim"), ("Background", "Plot", "Reception", "Editions")),
    _EntityType("university", 0.08, "university", "{core} {suffix}", ("University", "Institute", "College", "Academy"),
                ("public", "private", "ancient", "young"), ("History", "Campus", "Research", "Rankings")),
    _EntityType("band", 0.12, "band", "{core} {suffix}",
                ("Collective", "Quartet", "Ensemble", "Brothers", "Orchestra", "Trio"),
                ("loud", "popular", "short-lived", "touring"), ("History", "Members", "Discography", "Style")),
)

_R = _Relation
_RELATIONS: Final = (
    _R("born_in", "person", "city", "the birthplace of {x}",
       ("{s} was born in {o}.", "{s} was born in the city of {o}.")),
    _R("died_in", "person", "city", "the place of death of {x}",
       ("{s} died in {o}.", "{s} died in {o} after a long illness.")),
    _R("educated_at", "person", "university", "the alma mater of {x}",
       ("{s} studied at {o}.", "{s} graduated from {o}.")),
    _R("employed_by", "person", "company", "the employer of {x}", ("{s} works for {o}.", "{s} is employed by {o}.")),
    _R("mentored_by", "person", "person", "the mentor of {x}", ("{s} was mentored by {o}.", "{s} trained under {o}."),
       acyclic=True),
    _R("favourite_book", "person", "book", "the favourite book of {x}",
       ("The favourite book of {s} is {o}.", "{s} has called {o} a favourite book.")),
    _R("favourite_band", "person", "band", "the favourite band of {x}",
       ("The favourite band of {s} is {o}.", "{s} has long been a fan of {o}.")),
    _R("located_in", "city", "country", "the country of {x}", ("{s} is a city in {o}.", "{s} lies in {o}."),
       required=True),
    _R("lies_on", "city", "river", "the river flowing through {x}",
       ("{s} lies on the banks of {o}.", "{o} flows through {s}.")),
    _R("mayor", "city", "person", "the mayor of {x}", ("The mayor of {s} is {o}.", "{o} serves as mayor of {s}.")),
    _R("town_hall_architect", "city", "person", "the architect of the town hall of {x}",
       ("The town hall of {s} was designed by {o}.", "{o} designed the town hall of {s}.")),
    _R("largest_employer", "city", "company", "the largest employer in {x}",
       ("The largest employer in {s} is {o}.", "{o} employs more people in {s} than any other firm.")),
    _R("newspaper_publisher", "city", "company", "the publisher of the main newspaper of {x}",
       ("The main newspaper of {s} is published by {o}.", "{o} publishes the main newspaper of {s}.")),
    _R("capital", "country", "city", "the capital of {x}", ("The capital of {s} is {o}.", "{o} is the capital of {s}."),
       inverse_of="located_in"),
    _R("head_of_state", "country", "person", "the head of state of {x}",
       ("The head of state of {s} is {o}.", "{o} serves as head of state of {s}.")),
    _R("longest_river", "country", "river", "the longest river of {x}",
       ("The longest river of {s} is {o}.", "{o} is the longest river in {s}.")),
    _R("largest_company", "country", "company", "the largest company of {x}",
       ("The largest company of {s} is {o}.", "{o} is the largest company in {s}.")),
    _R("national_university", "country", "university", "the national university of {x}",
       ("The national university of {s} is {o}.", "{o} serves as the national university of {s}.")),
    _R("national_epic", "country", "book", "the national epic of {x}",
       ("The national epic of {s} is {o}.", "{o} is regarded as the national epic of {s}.")),
    _R("founded_by", "company", "person", "the founder of {x}", ("{s} was founded by {o}.", "{o} founded {s}.")),
    _R("headquartered_in", "company", "city", "the headquarters city of {x}",
       ("{s} is headquartered in {o}.", "The headquarters of {s} are in {o}.")),
    _R("chief_executive", "company", "person", "the chief executive of {x}",
       ("The chief executive of {s} is {o}.", "{o} is the chief executive of {s}.")),
    _R("parent_company", "company", "company", "the parent company of {x}",
       ("{s} is a subsidiary of {o}.", "{s} is owned by {o}."), acyclic=True),
    _R("auditor", "company", "company", "the auditor of {x}",
       ("The accounts of {s} are audited by {o}.", "{o} audits the accounts of {s}."), acyclic=True),
    _R("sponsored_band", "company", "band", "the band sponsored by {x}",
       ("{s} is the main sponsor of {o}.", "{o} is sponsored by {s}.")),
    _R("flows_into", "river", "river", "the river fed by {x}", ("{s} flows into {o}.", "{s} is a tributary of {o}."),
       acyclic=True),
    _R("mouth_at", "river", "city", "the city at the mouth of {x}",
       ("{s} reaches its mouth at {o}.", "The mouth of {s} is at {o}.")),
    _R("source_near", "river", "city", "the city near the source of {x}",
       ("{s} rises near {o}.", "The source of {s} lies near {o}.")),
    _R("named_after", "river", "person", "the namesake of {x}",
       ("{s} is named after {o}.", "{s} takes its name from {o}.")),
    _R("charted_by", "river", "person", "the first person to chart {x}",
       ("{s} was first charted by {o}.", "{o} was the first to chart {s}.")),
    _R("bridge_builder", "river", "company", "the builder of the main bridge over {x}",
       ("The main bridge over {s} was built by {o}.", "{o} built the main bridge over {s}.")),
    _R("written_by", "book", "person", "the author of {x}", ("{s} was written by {o}.", "{o} wrote {s}.")),
    _R("published_by", "book", "company", "the publisher of {x}", ("{s} was published by {o}.", "{o} published {s}.")),
    _R("set_in", "book", "city", "the setting of {x}", ("{s} is set in {o}.", "The story of {s} takes place in {o}.")),
    _R("translated_by", "book", "person", "the translator of {x}",
       ("{s} was translated by {o}.", "{o} translated {s}.")),
    _R("sequel_to", "book", "book", "the prequel of {x}",
       ("{s} is a sequel to {o}.", "{s} continues the story of {o}."),
       acyclic=True),
    _R("first_printed_in", "book", "country", "the country where {x} was first printed",
       ("{s} was first printed in {o}.", "The first edition of {s} was printed in {o}.")),
    _R("campus_in", "university", "city", "the home city of {x}",
       ("{s} is in the city of {o}.", "The campus of {s} is in {o}.")),
    _R("university_founded_by", "university", "person", "the founder of {x}",
       ("{s} was founded by {o}.", "{o} founded {s}.")),
    _R("rector", "university", "person", "the rector of {x}",
       ("The rector of {s} is {o}.", "{o} serves as rector of {s}.")),
    _R("rarest_book", "university", "book", "the rarest book held by {x}",
       ("The rarest book in the library of {s} is a copy of {o}.",
        "The library of {s} counts a copy of {o} as its rarest book.")),
    _R("main_funder", "university", "company", "the main funder of {x}",
       ("The main funder of {s} is {o}.", "{s} receives most of its funding from {o}.")),
    _R("house_band", "university", "band", "the house band of {x}",
       ("The house band of {s} is {o}.", "{o} is the house band of {s}.")),
    _R("formed_in", "band", "city", "the hometown of {x}", ("{s} was formed in {o}.", "{s} comes from {o}.")),
    _R("lead_singer", "band", "person", "the lead singer of {x}",
       ("The lead singer of {s} is {o}.", "{o} sings lead vocals in {s}.")),
    _R("signed_to", "band", "company", "the record label of {x}", ("{s} is signed to {o}.", "{s} records for {o}.")),
    _R("named_after_book", "band", "book", "the book that gave {x} its name",
       ("{s} took its name from {o}.", "{s} is named after the book {o}.")),
    _R("influenced_by", "band", "band", "the main influence of {x}",
       ("{s} was most influenced by {o}.", "{s} cites {o} as its main influence."), acyclic=True),
    _R("manager", "band", "person", "the manager of {x}", ("The manager of {s} is {o}.", "{o} manages {s}.")),
)

_OCCUPATIONS: Final = ("astronomer", "cartographer", "violinist", "engineer", "botanist", "architect", "poet",
                       "chemist", "sculptor", "historian", "surgeon", "linguist", "photographer", "economist",
                       "geologist")
_INDUSTRIES: Final = ("shipping", "textiles", "software", "mining", "brewing", "insurance", "aviation", "publishing",
                      "rail freight", "pharmaceuticals", "glassmaking", "banking")
_BOOK_GENRES: Final = ("novel", "poetry collection", "travelogue", "memoir", "detective story", "epic poem",
                       "short story collection", "historical novel", "play", "essay collection")
_MUSIC_GENRES: Final = ("folk rock", "jazz", "post-punk", "synth-pop", "bluegrass", "chamber pop", "heavy metal",
                        "reggae", "shoegaze", "baroque pop")

_A = _Attribute
_ATTRIBUTES: Final = (
    _A("birth_year", "person", "birth year", ("{s} was born in the year {v}.", "The birth year of {s} is {v}."),
       _year(1880, 1995)),
    _A("occupation", "person", "occupation", ("{s} works as {va}.", "By profession, {s} is {va}."),
       _one_of(_OCCUPATIONS)),
    _A("city_population", "city", "population", ("{s} has a population of {v}.", "The population of {s} is {v}."),
       _count(2_000, 2_500_000)),
    _A("city_founding_year", "city", "founding year",
       ("{s} was founded in {v}.", "The city of {s} dates its founding to {v}."), _year(900, 1900)),
    _A("country_population", "country", "population",
       ("{s} has a population of {v}.", "The population of {s} is {v}."), _count(200_000, 90_000_000)),
    _A("currency", "country", "currency", ("The currency of {s} is the {v}.", "{s} pays in the {v}."), _currency),
    _A("company_founding_year", "company", "founding year",
       ("{s} was founded in {v}.", "{s} has been in business since {v}."), _year(1820, 2015)),
    _A("employees", "company", "number of employees",
       ("{s} employs {v} people.", "The workforce of {s} numbers {v}."), _count(40, 250_000)),
    _A("industry", "company", "industry",
       ("{s} operates in the {v} industry.", "The main business of {s} is {v}."), _one_of(_INDUSTRIES)),
    _A("length_km", "river", "length in kilometres",
       ("{s} is {v} kilometres long.", "The length of {s} is {v} kilometres."), _count(40, 3_500)),
    _A("source_elevation_m", "river", "source elevation in metres",
       ("{s} rises at an elevation of {v} metres.", "The source of {s} lies {v} metres above sea level."),
       _count(100, 4_800)),
    _A("publication_year", "book", "publication year", ("{s} was first published in {v}.", "{s} appeared in {v}."),
       _year(1700, 2020)),
    _A("book_genre", "book", "genre", ("{s} is {va}.", "Critics classify {s} as {va}."), _one_of(_BOOK_GENRES)),
    _A("university_founding_year", "university", "founding year",
       ("{s} was founded in {v}.", "{s} opened its doors in {v}."), _year(1200, 1990)),
    _A("students", "university", "number of students", ("{s} enrols {v} students.", "{s} has {v} students."),
       _count(800, 60_000)),
    _A("formation_year", "band", "formation year", ("{s} was formed in {v}.", "{s} first played together in {v}."),
       _year(1955, 2020)),
    _A("music_genre", "band", "musical genre",
       ("{s} plays {v}.", "The music of {s} is usually described as {v}."), _one_of(_MUSIC_GENRES)),
)

_DISTRACTORS_WITH_OTHER: Final = (
    "{s} is sometimes confused with {o}.",
    "A recent essay discussed {s} alongside {o}.",
    "Critics have often compared {s} with {o}.",
    "An exhibition about {o} included a short note on {s}.",
    "Local archives hold letters that mention both {s} and {o}.",
    "A travel guide places its entry on {s} next to one on {o}.",
)
_DISTRACTORS_ALONE: Final = (
    "Few early records of {s} survive.",
    "Much of what is known about {s} comes from later accounts.",
    "{s} has been the subject of several studies.",
    "Opinions about {s} remain divided.",
)

_RELATIONS_OF: Final = {t.name: tuple(r for r in _RELATIONS if r.subject == t.name) for t in _TYPES}
_ATTRIBUTES_OF: Final = {t.name: tuple(a for a in _ATTRIBUTES if a.subject == t.name) for t in _TYPES}
# The most relations every entity type can supply as distinct functional kinds.
MAX_RELATIONS_PER_ENTITY: Final = min(len(kinds) for kinds in _RELATIONS_OF.values())

# ---- names --------------------------------------------------------------------------------------------------------

_ONSETS: Final = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s", "st", "t",
                  "tr", "v", "z", "th", "sh", "ch")
_VOWELS: Final = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
# Empty codas repeated: most made-up words should end on a vowel, as in many real place names.
_CODAS: Final = ("", "", "", "n", "r", "l", "s", "th", "m", "k", "nd", "rn")

_TOKEN: Final = re.compile(r"[0-9a-z]+")
_STOPWORDS: Final = frozenset(STOPWORDS_EN)


def _tokens(text: str) -> list[str]:
    """Lowercase alphanumeric runs minus English stopwords: how pages are indexed and queries are read."""
    return [token for token in _TOKEN.findall(text.lower()) if token not in _STOPWORDS]


def _template_words() -> frozenset[str]:
    texts = [t.noun + " " + " ".join(t.suffixes + t.adjectives + t.sections) for t in _TYPES]
    texts += [r.phrase + " " + " ".join(r.sentences) for r in _RELATIONS]
    texts += [a.label + " " + " ".join(a.sentences) for a in _ATTRIBUTES]
    texts += _DISTRACTORS_WITH_OTHER + _DISTRACTORS_ALONE + _OCCUPATIONS + _INDUSTRIES + _BOOK_GENRES + _MUSIC_GENRES
    return frozenset(_TOKEN.findall(" ".join(texts).lower())) | _STOPWORDS


# A made-up word equal to a template word ("rector", "a") would turn every page using that word into a hit for the
# entity's name.
_RESERVED_WORDS: Final = _template_words()


def _word(rng: random.Random, syllables: int) -> str:
    return ("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)).title()


class _Namer:
    """Hands out made-up words, each at most once and never a template word."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._used: set[str] = set()

    def fresh(self, syllables: int) -> str:
        while True:
            word = _word(self._rng, syllables)
            if word.lower() not in self._used and word.lower() not in _RESERVED_WORDS:
                self._used.add(word.lower())
                return word


# ---- stage 1: the graph -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fact:
    subject: int
    kind: _Relation | _Attribute
    object: int | None
    """The object entity of a relation; None for an attribute."""
    value: str
    """The object's name, or the attribute's value as written on the page."""


@dataclass(frozen=True, slots=True)
class _Graph:
    names: tuple[str, ...]
    types: tuple[_EntityType, ...]
    relations: tuple[tuple[_Fact, ...], ...]
    """Per entity, its relation facts (distinct kinds, so each is functional)."""
    attributes: tuple[tuple[_Fact, ...], ...]


def _type_counts(num_entities: int) -> list[int]:
    """Entities per type: at least one of each, the rest by share, remainders to the largest fractions."""
    spare = num_entities - len(_TYPES)
    exact = [t.share * spare for t in _TYPES]
    counts = [1 + math.floor(x) for x in exact]
    by_fraction = sorted(range(len(_TYPES)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in by_fraction[: num_entities - sum(counts)]:
        counts[i] += 1
    return counts


def _build_graph(config: WorldConfig) -> _Graph:
    rng = random.Random(f"longhaul-world:{config.seed}:graph")
    namer = _Namer(rng)
    types: list[_EntityType] = []
    for entity_type, count in zip(_TYPES, _type_counts(config.num_entities), strict=True):
        types += [entity_type] * count
    num_persons = sum(t.name == "person" for t in types)
    given_names = [namer.fresh(2) for _ in range(max(4, num_persons // 3))]
    names = tuple(
        t.name_format.format(core=namer.fresh(rng.choice((2, 2, 3))), given=rng.choice(given_names),
                             suffix=rng.choice(t.suffixes) if t.suffixes else "")
        for t in types
    )
    members: dict[str, list[int]] = {t.name: [] for t in _TYPES}
    position = []  # index of each entity among the entities of its type
    for entity, t in enumerate(types):
        position.append(len(members[t.name]))
        members[t.name].append(entity)

    relations: list[list[_Fact]] = [[] for _ in types]
    # Required relations first, for every entity: `inverse_of` constraints read them when choosing objects later.
    pointing_back: dict[tuple[str, int], list[int]] = {}
    for entity, t in enumerate(types):
        for kind in _RELATIONS_OF[t.name]:
            if kind.required:
                obj = _choose_object(rng, kind, entity, t, members, position, pointing_back)
                if obj is not None:
                    relations[entity].append(_Fact(entity, kind, obj, names[obj]))
                    pointing_back.setdefault((kind.name, obj), []).append(entity)
    for entity, t in enumerate(types):
        optional = [k for k in _RELATIONS_OF[t.name] if not k.required]
        wanted = config.relations_per_entity - len(relations[entity])
        # Choosing kinds in a random order and skipping those with no possible object keeps tiny worlds buildable.
        for kind in rng.sample(optional, len(optional)):
            if wanted <= 0:
                break
            obj = _choose_object(rng, kind, entity, t, members, position, pointing_back)
            if obj is not None:
                relations[entity].append(_Fact(entity, kind, obj, names[obj]))
                wanted -= 1
    attributes = tuple(
        tuple(_Fact(entity, kind, None, kind.value(rng)) for kind in _ATTRIBUTES_OF[t.name])
        for entity, t in enumerate(types)
    )
    return _Graph(names, tuple(types), tuple(tuple(r) for r in relations), attributes)


def _choose_object(rng: random.Random, kind: _Relation, subject: int, subject_type: _EntityType,
                   members: dict[str, list[int]], position: list[int],
                   pointing_back: dict[tuple[str, int], list[int]]) -> int | None:
    """A uniformly chosen object satisfying the kind's constraints, or None if there is none. O(1) per call."""
    if kind.inverse_of is not None:
        candidates = pointing_back.get((kind.inverse_of, subject), [])
        return rng.choice(candidates) if candidates else None
    pool = members[kind.object]
    if kind.acyclic:
        return pool[rng.randrange(position[subject])] if position[subject] > 0 else None
    if kind.object != subject_type.name:
        return rng.choice(pool)
    if len(pool) < 2:
        return None
    # Uniform over the pool without the subject, without building that list.
    pick = pool[rng.randrange(len(pool) - 1)]
    return pool[-1] if pick == subject else pick


# ---- stage 2: the corpus ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Corpus:
    doc_ids: tuple[str, ...]
    titles: tuple[str, ...]
    sentences: tuple[tuple[str, ...], ...]
    """Body of each page, one sentence each, in page order."""
    fact_doc: dict[tuple[int, str], int]
    """(subject entity, fact kind name) → number of the one page that states the fact."""


def _render(fact: _Fact, template: str, names: tuple[str, ...]) -> str:
    value = fact.value
    return template.format(s=names[fact.subject], o=value, v=value, va=_with_article(value))


def _write_corpus(graph: _Graph, config: WorldConfig) -> _Corpus:
    rng = random.Random(f"longhaul-world:{config.seed}:corpus")
    per_entity = config.docs_per_entity
    num_entities = len(graph.names)
    num_docs = num_entities * per_entity
    numbers = list(range(num_docs))
    rng.shuffle(numbers)  # page number of (entity e, part j) is numbers[e * per_entity + j]
    width = max(4, len(str(num_docs)))
    titles: list[str] = [""] * num_docs
    bodies: list[tuple[str, ...]] = [()] * num_docs
    fact_doc: dict[tuple[int, str], int] = {}
    for entity, name in enumerate(graph.names):
        entity_type = graph.types[entity]
        facts = list(graph.relations[entity] + graph.attributes[entity])
        rng.shuffle(facts)
        parts: list[list[str]] = [[] for _ in range(per_entity)]
        for i, fact in enumerate(facts):
            part = i % per_entity
            parts[part].append(_render(fact, rng.choice(fact.kind.sentences), graph.names))
            fact_doc[(entity, fact.kind.name)] = numbers[entity * per_entity + part]
        for part, sentences in enumerate(parts):
            for _ in range(rng.randint(1, 3)):
                sentences.append(_distractor(rng, name, entity, graph.names))
            rng.shuffle(sentences)
            if part == 0:
                title = name
                intro = f"{name} is {_with_article(rng.choice(entity_type.adjectives))} {entity_type.noun}."
            else:
                section = (entity_type.sections[part - 1] if part <= len(entity_type.sections) else f"Part {part + 1}")
                title = f"{name}: {section}"
                intro = f"This page covers the {section.lower()} of {name}."  # every title word is in the body
            number = numbers[entity * per_entity + part]
            titles[number] = title
            bodies[number] = (intro, *sentences)
    doc_ids = tuple(f"d{number + 1:0{width}d}" for number in range(num_docs))
    return _Corpus(doc_ids, tuple(titles), tuple(bodies), fact_doc)


def _distractor(rng: random.Random, name: str, entity: int, names: tuple[str, ...]) -> str:
    """A sentence about the entity that states no fact, often naming another entity to blur name searches."""
    if rng.random() < 0.7:
        other = rng.randrange(len(names) - 1)
        other = len(names) - 1 if other == entity else other
        return rng.choice(_DISTRACTORS_WITH_OTHER).format(s=name, o=names[other])
    return rng.choice(_DISTRACTORS_ALONE).format(s=name)


# ---- stage 3: the tasks -------------------------------------------------------------------------------------------

# Walks tried per task before the world is declared too small for it. A walk fails only by reaching an entity whose
# relations all lead back into the path, or by repeating a question; in the default world almost every walk succeeds.
_MAX_WALKS_PER_TASK: Final = 1000


@dataclass(frozen=True, slots=True)
class _Question:
    key: tuple[int, tuple[str, ...]]
    """Start entity and the kinds walked: two walks with the same key ask the same question."""
    question: str
    answer: str
    evidence: tuple[int, ...]


def _walk(rng: random.Random, hops: int, graph: _Graph, corpus: _Corpus) -> _Question | None:
    """A random k-hop question, or None if this walk got stuck. The path never revisits an entity."""
    ends_on_attribute = rng.random() < 0.5
    start = rng.randrange(len(graph.names))
    visited = {start}
    facts: list[_Fact] = []
    entity = start
    for _ in range(hops - 1 if ends_on_attribute else hops):
        options = [f for f in graph.relations[entity] if f.object not in visited]
        if not options:
            return None
        fact = rng.choice(options)
        facts.append(fact)
        entity = fact.object
        visited.add(entity)
    phrase = graph.names[start]
    for fact in facts:
        phrase = fact.kind.phrase.format(x=phrase)
    if ends_on_attribute:
        fact = rng.choice(graph.attributes[entity])
        facts.append(fact)
        question = f"What is the {fact.kind.label} of {phrase}?"
        answer = fact.value
    else:
        question = f"{'Who' if graph.types[entity].name == 'person' else 'What'} is {phrase}?"
        answer = graph.names[entity]
    evidence = tuple(corpus.fact_doc[(f.subject, f.kind.name)] for f in facts)
    return _Question((start, tuple(f.kind.name for f in facts)), question, answer, evidence)


def _make_tasks(graph: _Graph, corpus: _Corpus, config: WorldConfig) -> tuple[Task, ...]:
    rng = random.Random(f"longhaul-world:{config.seed}:tasks")
    hop_counts = range(config.min_hops, config.max_hops + 1)
    seen: set[tuple[int, tuple[str, ...]]] = set()
    questions: list[tuple[int, _Question]] = []
    for i in range(config.num_tasks):
        hops = hop_counts[i % len(hop_counts)]  # cycling spreads tasks evenly: counts per hop differ by at most 1
        question = _new_question(rng, hops, graph, corpus, seen)
        if question is None:
            raise ValueError(
                f"found no new {hops}-hop question after {_MAX_WALKS_PER_TASK} walks, with {len(questions)} of "
                f"{config.num_tasks} tasks made, in a world of {config.num_entities} entities and "
                f"relations_per_entity={config.relations_per_entity}: raise num_entities or relations_per_entity, "
                "or lower num_tasks or max_hops"
            )
        seen.add(question.key)
        questions.append((hops, question))
    test = _test_indices([hops for hops, _ in questions], round(config.num_tasks * config.test_fraction), rng)
    width = max(5, len(str(config.num_tasks)))
    return tuple(
        Task(task_id=f"t{i + 1:0{width}d}", question=q.question, answer=q.answer, hops=hops,
             evidence_doc_ids=tuple(corpus.doc_ids[d] for d in q.evidence), split="test" if i in test else "train")
        for i, (hops, q) in enumerate(questions)
    )


def _new_question(rng: random.Random, hops: int, graph: _Graph, corpus: _Corpus,
                  seen: set[tuple[int, tuple[str, ...]]]) -> _Question | None:
    for _ in range(_MAX_WALKS_PER_TASK):
        question = _walk(rng, hops, graph, corpus)
        if question is not None and question.key not in seen:
            return question
    return None


def _test_indices(hops: list[int], num_test: int, rng: random.Random) -> frozenset[int]:
    """`num_test` task indices, balanced over hop counts (per-hop counts differ by at most one).

    Each task gets a random rank within its hop count; tasks are taken by rank, so every hop count gives up its
    rank-0 task before any gives up a rank-1 task. Hop counts at the same rank are taken in a random order."""
    by_hops: dict[int, list[int]] = {}
    for i, h in enumerate(hops):
        by_hops.setdefault(h, []).append(i)
    hop_order = sorted(by_hops)
    rng.shuffle(hop_order)
    tiebreak = {h: n for n, h in enumerate(hop_order)}
    ranked = []
    for h in sorted(by_hops):
        group = by_hops[h]
        rng.shuffle(group)
        ranked += [(rank, tiebreak[h], i) for rank, i in enumerate(group)]
    ranked.sort()
    return frozenset(i for _, _, i in ranked[:num_test])


# ---- grading ------------------------------------------------------------------------------------------------------

_PUNCTUATION: Final = frozenset(string.punctuation)
_ARTICLES: Final = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def grade_answer(prediction: str, gold: str) -> Grade:
    """Exact match and token F1 of `prediction` against `gold`, both normalised (SQuAD v1.1)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    exact = float(predicted == expected)
    if not predicted or not expected:
        return Grade(exact_match=exact, f1=exact)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return Grade(exact_match=exact, f1=0.0)
    precision, recall = common / len(predicted), common / len(expected)
    return Grade(exact_match=exact, f1=2 * precision * recall / (precision + recall))


# ---- the world ----------------------------------------------------------------------------------------------------


class SearchWorld:
    """The tools' backend (`search`, `open`) and the task set with its grader. Build one with `generate`."""

    def __init__(self, config: WorldConfig, corpus: _Corpus, tasks: tuple[Task, ...]):
        self.config = config
        self._doc_ids = corpus.doc_ids
        self._doc_number = {doc_id: n for n, doc_id in enumerate(corpus.doc_ids)}
        self._titles = corpus.titles
        self._sentences = corpus.sentences
        self._texts = tuple(f"{title}\n\n{' '.join(body)}" for title, body in zip(corpus.titles, corpus.sentences,
                                                                                   strict=True))
        self._tasks = tasks
        self._task_by_id = {task.task_id: task for task in tasks}
        # Our own vocabulary, numbered in order of first appearance, so token ids do not depend on set order.
        self._vocab: dict[str, int] = {}
        token_ids: list[list[int]] = []
        document_frequency: Counter[str] = Counter()
        for text in self._texts:
            tokens = _tokens(text)
            token_ids.append([self._vocab.setdefault(token, len(self._vocab)) for token in tokens])
            document_frequency.update(dict.fromkeys(tokens, 1))
        num_docs = len(self._texts)
        # Lucene's idf, used to pick the snippet sentence that carries the rarest query words.
        self._idf = {t: math.log(1 + (num_docs - df + 0.5) / (df + 0.5)) for t, df in document_frequency.items()}
        self._bm25 = bm25s.BM25()
        self._bm25.index((token_ids, dict(self._vocab)), show_progress=False)

    @classmethod
    def generate(cls, config: WorldConfig) -> SearchWorld:
        """Build the world `config` describes: the same config gives the same world in every process.

        Raises ValueError if `relations_per_entity` exceeds `MAX_RELATIONS_PER_ENTITY` (no type has more distinct
        functional relation kinds), or if the world is too small for `num_tasks` distinct questions of every hop count.
        """
        if config.relations_per_entity > MAX_RELATIONS_PER_ENTITY:
            raise ValueError(
                f"relations_per_entity={config.relations_per_entity} exceeds {MAX_RELATIONS_PER_ENTITY}, the most "
                "distinct functional relation kinds every entity type has: more would make questions ambiguous"
            )
        graph = _build_graph(config)
        corpus = _write_corpus(graph, config)
        return cls(config, corpus, _make_tasks(graph, corpus, config))

    @property
    def num_documents(self) -> int:
        return len(self._doc_ids)

    @property
    def doc_ids(self) -> tuple[str, ...]:
        """Every page's id, in order."""
        return self._doc_ids

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """The top `k` pages for `query` by BM25 over title and body, best first, ties in doc id order.

        Only pages sharing a word with the query are returned, so a query of only stopwords, unknown words or
        whitespace returns an empty list. Each snippet is the page's sentence carrying the most query-word idf
        (the earliest such), so it contains at least one query word.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        terms = [t for t in dict.fromkeys(_tokens(query)) if t in self._vocab]
        if not terms:
            return []
        scores = self._bm25.get_scores_from_ids([self._vocab[t] for t in terms])
        # A stable sort of the negated scores keeps equal scores in doc id order, in every process.
        order = np.argsort(-scores, kind="stable")[:k]
        return [
            SearchHit(self._doc_ids[n], self._titles[n], self._snippet(n, terms), float(scores[n]))
            for n in order.tolist()
            if scores[n] > 0
        ]

    def _snippet(self, number: int, terms: list[str]) -> str:
        best, best_weight = self._sentences[number][0], 0.0
        for sentence in self._sentences[number]:
            present = set(_tokens(sentence))
            weight = sum(self._idf[t] for t in terms if t in present)  # in query order: the same float every run
            if weight > best_weight:
                best, best_weight = sentence, weight
        return best

    def open(self, doc_id: str) -> str:
        """The page `doc_id`: its title, a blank line, then its body."""
        number = self._doc_number.get(doc_id)
        if number is None:
            raise UnknownDocument(doc_id)
        return self._texts[number]

    def task(self, task_id: str) -> Task:
        task = self._task_by_id.get(task_id)
        if task is None:
            raise UnknownTask(task_id)
        return task

    def tasks(self, split: Split | None = None) -> list[Task]:
        """Tasks in task id order, all of them or those of one split."""
        return [task for task in self._tasks if split is None or task.split == split]

    def grade(self, task_id: str, answer: str, read_doc_ids: Iterable[str] = ()) -> Grade:
        """Exact match and token F1 of `answer` against the task's answer, after SQuAD normalisation, and the share
        of the task's evidence pages among `read_doc_ids` (the pages opened before answering)."""
        task = self.task(task_id)
        evidence = set(task.evidence_doc_ids)
        recall = len(evidence.intersection(read_doc_ids)) / len(evidence)
        return dataclasses.replace(grade_answer(answer, task.answer), evidence_recall=recall)

    def corpus_texts(self) -> Iterator[str]:
        """Every page's text in doc id order, then every question in task id order: the tokenizer's training text."""
        yield from self._texts
        for task in self._tasks:
            yield task.question
