"""A seeded fictional world: the project's demo, test and benchmark data.

`generate_world(seed, n_people, n_questions)` invents people, towns, countries, organisations and
works, writes Wikipedia-style passages about them (the retrieval corpus, 40-100 words each) and asks
questions in three styles that imitate the paper's data sets:

- ``synthetic-popqa``: one fact about one entity ("What is Dorin Maskel's occupation?");
- ``synthetic-2wikimultihopqa``: two facts stated in two different passages ("Where was the founder
  of Halvren Press born?");
- ``synthetic-asqa``: a name shared by two or three people; ``qa_pairs`` holds one disambiguated
  question per person and ``answers`` is the union of their answers.

The corpus carries the noise that makes retrieval-augmented generation hard:

- near-duplicate names: families that differ by one letter or share a first name or surname
  (Dorin Maskel, Doran Maskel, Dorin Maskol, Ilsa Maskel), so a BM25 search for one finds the others;
- distractor passages: an entity's "later life" passage repeats its name and the question's wording
  ("Biographers disagree about the city where Dorin Maskel was born") without the answer, while the
  passage with the answer names the entity once, so it is often not ranked first;
- a share of questions (``no_answer_fraction``, default 0.1) whose fact is written in no passage:
  the paper's "explain from your own knowledge" case, with ``gold_passage_ids == []``.

Every name is built from syllables, so nothing collides with what a real model knows, and no name
is a substring of another name or of any word the templates use: the substring answer check
(answers.has_answer) cannot match by accident. Answers are rare in the corpus by construction.

Question rows carry, besides the QA schema's columns, helper fields for measurement that the
pipeline ignores: ``gold_passage_ids`` (passages stating the fact that answers the question; for
two-hop questions, the second hop), ``bridge_passage_ids`` (two-hop only: passages stating the first
hop), ``style`` (single-fact, two-hop or ambiguous), ``relation`` and ``entities`` (the names the
question is about; the last one is the entity the gold passages describe).

Pure standard library and deterministic: the same arguments give byte-identical files.

    python -m instructrag_ray.synthetic OUT_DIR [--seed N] [--people N] [--questions N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

POPQA = "synthetic-popqa"
TWOWIKI = "synthetic-2wikimultihopqa"
ASQA = "synthetic-asqa"
STYLE_SHARES = {POPQA: 0.60, TWOWIKI: 0.25, ASQA: 0.15}
TRAIN_PERCENT = 80
MIN_WORDS, MAX_WORDS = 40, 100


@dataclass
class World:
    """The corpus (`passages`: id, title, text) and the questions (QA rows plus helper fields)."""

    passages: list[dict]
    questions: list[dict]


# ---------------------------------------------------------------------------------------------
# Vocabulary. Every string the templates can write is listed here or in the templates below, so
# that invented names can be checked against all of it (see _Names).

_OCCUPATION_ALIASES = {
    "singer": ("singer", "vocalist"),
    "composer": ("composer",),
    "bandleader": ("bandleader",),
    "record producer": ("record producer",),
    "novelist": ("novelist", "writer"),
    "poet": ("poet",),
    "playwright": ("playwright", "dramatist"),
    "essayist": ("essayist",),
    "journalist": ("journalist", "reporter"),
    "film director": ("film director",),
    "cinematographer": ("cinematographer",),
    "film editor": ("film editor",),
    "animator": ("animator",),
    "astronomer": ("astronomer",),
    "botanist": ("botanist",),
    "chemist": ("chemist",),
    "cartographer": ("cartographer",),
    "geologist": ("geologist",),
    "linguist": ("linguist",),
    "painter": ("painter",),
    "sculptor": ("sculptor",),
    "architect": ("architect",),
    "photographer": ("photographer",),
}
# A sportsperson's occupation follows from the sport, as in real biographies.
_SPORTS = {
    "fencing": "fencer", "rowing": "rower", "curling": "curler", "handball": "handball player",
    "lacrosse": "lacrosse player", "badminton": "badminton player", "biathlon": "biathlete",
    "canoe slalom": "canoeist", "water polo": "water polo player", "ski jumping": "ski jumper",
}
for _occupation in _SPORTS.values():
    _OCCUPATION_ALIASES[_occupation] = (_occupation,)

_INSTRUMENTS = ("cello", "oboe", "harpsichord", "bassoon", "mandolin", "zither", "vibraphone",
                "theremin", "accordion", "sitar", "clarinet", "dulcimer", "marimba", "flugelhorn")

_CATEGORIES = {
    # occupations, organisation kind (employer), kind of the person's work, weight
    "music": (("singer", "composer", "bandleader", "record producer"), "label", "album", 4),
    "letters": (("novelist", "poet", "playwright", "essayist", "journalist"), "publisher", "book", 4),
    "film": (("film director", "cinematographer", "film editor", "animator"), "studio", "film", 3),
    "science": (("astronomer", "botanist", "chemist", "cartographer", "geologist", "linguist"),
                "institute", "book", 3),
    "art": (("painter", "sculptor", "architect", "photographer"), "gallery", "art", 3),
    "sport": (tuple(_SPORTS.values()), "club", "book", 3),
}
_ART_WORK = {"painter": "painting", "sculptor": "sculpture", "architect": "building",
             "photographer": "book"}

# genre -> aliases; the first alias is what passages write.
_GENRES = {
    "album": {"art rock": ("art rock",), "jazz fusion": ("jazz fusion",), "dream pop": ("dream pop",),
              "bluegrass": ("bluegrass",), "trip hop": ("trip hop", "trip-hop"),
              "chamber pop": ("chamber pop",), "synthwave": ("synthwave",), "krautrock": ("krautrock",),
              "shoegaze": ("shoegaze",), "zydeco": ("zydeco",), "bossa nova": ("bossa nova",),
              "post-punk": ("post-punk", "post punk")},
    "film": {"film noir": ("film noir",), "space western": ("space western",),
             "romantic comedy": ("romantic comedy", "romcom"), "war drama": ("war drama",),
             "mockumentary": ("mockumentary",), "heist thriller": ("heist thriller",),
             "costume drama": ("costume drama", "period drama"), "road movie": ("road movie",),
             "screwball comedy": ("screwball comedy",), "slasher film": ("slasher film", "slasher")},
    "letters": {"epistolary novel": ("epistolary novel",), "gothic novel": ("gothic novel", "gothic fiction"),
                "picaresque novel": ("picaresque novel",), "bildungsroman": ("bildungsroman",),
                "travelogue": ("travelogue",), "novella": ("novella",), "verse drama": ("verse drama",),
                "essay collection": ("essay collection",)},
    "science": {"popular science book": ("popular science book", "popular science"),
                "field guide": ("field guide",), "monograph": ("monograph",)},
    "sport": {"sports memoir": ("sports memoir",), "training manual": ("training manual",),
              "autobiography": ("autobiography",)},
    "art": {"photobook": ("photobook", "photography book")},
}

_ORG_KINDS = {
    # kind: (description, name suffixes)
    "label": ("record label", ("Records", "Sound")),
    "publisher": ("publishing house", ("Press", "Books")),
    "studio": ("film studio", ("Pictures", "Studios")),
    "institute": ("research institute", ("Institute", "Observatory", "Society")),
    "gallery": ("art gallery", ("Gallery", "Atelier")),
    "club": ("sports club", ("Athletic Club", "Sporting Union")),
}
_CATEGORY_NOUN = {"music": "musician", "letters": "literary figure", "film": "figure of the cinema",
                  "science": "scientist", "art": "visual artist", "sport": "sportsperson"}
_COUNTRY_FORMS = ("Republic of {c}", "Kingdom of {c}", "Grand Duchy of {c}", "Federation of {c}")
_TOWN_KINDS = ("town", "market town", "harbour town", "river town", "hill town", "cathedral town")

# Title words. No word is a substring of another, so no title is a substring of another title.
_TITLE_ADJECTIVES = (
    "Amber", "Ashen", "Bitter", "Brass", "Broken", "Burning", "Cobalt", "Copper", "Crimson",
    "Crooked", "Distant", "Drowned", "Dusty", "Ebony", "Emerald", "Faded", "Frozen", "Gilded",
    "Glass", "Golden", "Hidden", "Hollow", "Idle", "Iron", "Ivory", "Lonely", "Marble", "Midnight",
    "Narrow", "Pale", "Paper", "Patient", "Quiet", "Restless", "Rusted", "Scarlet", "Secret",
    "Silent", "Silver", "Sleeping", "Slow", "Sunken", "Velvet", "Wandering", "Weary", "Wild",
    "Autumn", "Dappled", "Fallow", "Gentle", "Hungry", "Mossy", "Northern", "Olive", "Radiant",
    "Sombre", "Tawny", "Umber", "Verdant", "Wistful", "Yellow",
)
_TITLE_NOUNS = (
    "Orchard", "Lantern", "Meadow", "Citadel", "Mirror", "Compass", "Ferry", "Lighthouse",
    "Tide", "Heron", "Anchor", "Furnace", "Chapel", "Carousel", "Glacier", "Quarry", "Vineyard",
    "Kestrel", "Pilgrim", "Labyrinth", "Almanac", "Sparrow", "Tapestry", "Monsoon", "Pendulum",
    "Lagoon", "Caravan", "Thicket", "Sextant", "Aviary", "Gondola", "Marsh", "Belfry", "Orchid",
    "Saddle", "Kettle", "Windmill", "Ember", "Cipher", "Lullaby", "Harvest", "Beacon", "Garnet",
    "Falcon", "Bramble", "Thimble", "Cinder", "Parasol", "Satchel", "Trellis", "Juniper", "Magpie",
    "Willow", "Hearth", "Cobweb", "Minaret", "Zephyr", "Oriole", "Quiver", "Lantana",
)

# Name syllables. A name is onset + vowel, then (coda + inner onset + vowel) per extra syllable,
# then an ending: Do-r-in, Ma-sk-el. Kept simple so that the names read as names.
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "th", "sh")
_INNER_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ei")
_INNER_CODAS = ("", "", "n", "l", "r", "s")
_ENDINGS = ("", "n", "l", "r", "s", "k", "th", "m")
_TOWN_SUFFIXES = ("mora", "heim", "ovo", "ane", "ith", "wick", "stad", "enna", "oria")
_COUNTRY_SUFFIXES = ("ia", "and", "ary", "esh", "avia", "onia", "istan")


# ---------------------------------------------------------------------------------------------
# Sentence templates. {N}: the entity's full name; {P}/{p}: he/she; {Pp}/{pp}: his/her; {o}:
# him/her; {other}: another person's name, drawn per sentence.

_P1_OPENINGS = (
    # (facts the sentence states, template)
    (("birth_year", "occupation"), "{N} (born {year}) was {a_occ}."),
    (("birth_year", "occupation"), "{N} was {a_occ}, born in {year}."),
    (("birth_year", "birthplace"), "{N} was born in {town} in {year}."),
    (("birth_year",), "{N} was born in {year}."),
    (("birth_year",), "{N} (born {year}) grew up in a large, noisy household."),
    (("occupation",), "{N} was {a_occ} whose early life is poorly documented."),
    ((), "{N} grew up in a large, noisy household."),
    ((), "Little is recorded about the early life of {N}."),
)
_P1_FACTS = {
    "birth_year": ("{P} was born in {year}.",),
    "occupation": ("{P} later worked as {a_occ}.", "{P} became {a_occ} in early adulthood."),
    "birthplace": ("{P} was born in {town}.", "The family lived in {town}, where {p} was born.",
                   "{Pp} birthplace was {town}."),
    "instrument": ("{P} took up the {skill} at the age of nine.",),
    "sport": ("{P} took up {skill} at school.",),
}
_P1_BIRTHPLACE_WITH_COUNTRY = "{P} was born in {town}, {country}."
_P1_FILLERS = (
    "{P} attended a small village school before moving away to study.",
    "{Pp} father kept a bookshop and {pp} mother taught music.",
    "As a child {p} spent summers with relatives by the coast.",
    "{Pp} earliest mentor was {other}, who lodged with the family for several years.",
    "{P} was the youngest of five children.",
    "A childhood illness kept {o} at home for most of a year.",
    "{P} later described these years as quiet and bookish.",
    "{P} learned to read from old almanacs kept in the attic.",
    "A scholarship allowed {o} to continue studying after the age of fourteen.",
    "Neighbours remembered {o} as a serious, watchful child.",
)

_P2_OPENINGS = (
    (("employer", "occupation"), "{N} worked as {a_occ} at {org}."),
    (("employer",), "{N} spent most of {pp} career at {org}."),
    (("employer",), "{N} joined {org} as a young graduate."),
    (("occupation",), "{N} made {pp} name as {a_occ}."),
    ((), "{N} began working in earnest after leaving school."),
    ((), "The working life of {N} spanned more than four decades."),
)
_P2_FACTS = {
    "employer": ("{P} was employed by {org} for many years.",),
    "occupation": ("{P} trained as {a_occ} under {other}.", "{P} worked as {a_occ} for over two decades."),
    "instrument": ("{P} played the {skill} on most of {pp} recordings.", "{Pp} main instrument was the {skill}."),
    "sport": ("{P} competed in {skill} at national level.",
              "{P} represented {pp} region in {skill} for a decade."),
    "work": ("{Pp} best-known work is {title}, {a_kind} from {work_year}.",
             "{P} is remembered chiefly for {title} ({work_year})."),
    "founded": ("In {found_year}, {p} founded {founded}.",),
}
_P2_FILLERS = (
    "{P} collaborated with {other} on several projects.",
    "Colleagues remembered {o} as meticulous and impatient.",
    "{P} travelled widely, giving lectures and workshops.",
    "{Pp} letters to {other} survive in a private collection.",
    "A falling-out with {other} ended a long partnership.",
    "{P} turned down several offers to move abroad.",
    "Much of {pp} output was produced at night.",
    "{P} kept detailed notebooks throughout {pp} career.",
    "{Pp} methods influenced a younger generation, including {other}.",
    "A period of illness interrupted {pp} work for two years.",
)

_P3_OPENINGS = (
    (("spouse",), "{N} married {spouse} in {married}."),
    (("spouse",), "In {married}, {N} married {spouse}."),
    ((), "{N} spent {pp} final years in a house near the sea."),
    ((), "In later life {N} withdrew from public view."),
)
_P3_BIRTHPLACE = "{N} was born in {town} and is buried there."
_P3_NAME_LINES = (
    "A biography of {N} appeared in {bio_year}.",
    "{N}'s papers are kept in a public archive.",
    "The {last} Medal is awarded in memory of {N}.",
    "Interest in {N} revived after a documentary about {N}'s life was broadcast.",
    "Several streets are named after {N}.",
    "Exhibitions devoted to {N} have toured regional museums.",
)
# Share the wording of the questions without their answers: BM25 rewards these passages.
_P3_WORDING = {
    "occupation": ("Early directories list {N}'s occupation inconsistently.",
                   "{N}'s occupation is given differently in census records."),
    "birthplace": ("Biographers disagree about the city where {N} was born.",
                   "Where exactly {N} was born has been debated by local historians."),
    "birth_year": ("The year in which {N} was born is given differently in several sources.",),
    "instrument": ("What instrument {N} played in the first years is not recorded.",),
    "sport": ("What sport {N} played before turning professional is not recorded.",),
    "spouse": ("Accounts of {N}'s spouse and family are sparse.",),
    "employer": ("Which organisation {N} worked for in the early years is unclear.",),
}
_P3_HATNOTES = ("{N} should not be confused with {look}.", "Not to be confused with {look}.")
_P3_FILLERS = (
    "{P} remained active in local societies until old age.",
    "{Pp} house is now a small museum.",
    "{P} corresponded for decades with {other}.",
    "{P} gave away much of {pp} savings to a children's charity.",
    "A portrait of {o} by {other} hangs in a municipal collection.",
    "{P} published a short memoir late in life.",
    "Friends described {o} as generous but guarded.",
)

_WORK_OPENINGS = {
    # kind: (with genre, without genre)
    "album": ("{T} is {a_work_year} {genre} album by {creator}.",
              "{T} is an album by {creator}, first released in {work_year}."),
    "film": ("{T} is {a_work_year} {genre} directed by {creator}.",
             "{T} is a film directed by {creator}, released in {work_year}."),
    "book": ("{T} is {a_work_year} {genre} by {creator}.",
             "{T} is a book by {creator}, first published in {work_year}."),
    "painting": (None, "{T} is {a_work_year} painting by {creator}."),
    "sculpture": (None, "{T} is {a_work_year} sculpture by {creator}."),
    "building": (None, "{T} is {a_work_year} building designed by {creator}."),
}
_WORK_PRODUCER = ("It was produced by {producer}.", "{producer} served as its producer.")
_WORK_PUBLISHER = ("It was published by {publisher}.", "{publisher} brought out the first edition.")
_WORK_FILLERS = {
    "album": ("The album was recorded over eleven days in a converted chapel.",
              "Several of its songs were later covered by {other}.",
              "It sold modestly on release but gained a devoted following.",
              "The sleeve shows a photograph of an empty railway platform.",
              "Its closing track runs for more than twelve minutes."),
    "film": ("Filming took place over a single winter.",
             "It premiered at a small festival and found its audience slowly.",
             "The score was written by {other}.",
             "Most scenes were shot on location with a small crew.",
             "It was restored from the original negative decades later."),
    "book": ("The first edition sold poorly but was reprinted twice.",
             "Its manuscript was rejected by several houses before acceptance.",
             "A translation by {other} followed some years later.",
             "The book is divided into three unequal parts.",
             "Reviewers praised its spare and precise prose."),
    "art": ("It is now held in a public collection.",
            "The work was damaged in a flood and carefully restored.",
            "A study for it was sold at auction.",
            "It was first shown alongside works by {other}.",
            "Visitors often remark on its unusual scale."),
}
_REVIEW_LINES = (
    "{T} has been reassessed several times since its release.",
    "A restored edition of {T} appeared in {bio_year}.",
    "{T} is often compared with {T2}.",
    "Opinions of {T} have shifted considerably over time.",
)
_REVIEW_WORDING = {
    "genre": "Critics have long argued about what genre {T} belongs to.",
    "producer": "The producer of {T} was not credited on early copies.",
    "creator": "Who was behind {T} was, for a time, a matter of speculation.",
}
_REVIEW_FILLERS = (
    "Later critics were kinder than the first reviewers.",
    "Several anniversary events have marked its release.",
    "It has been cited as an influence by {other}.",
    "Its reputation rests partly on a handful of memorable moments.",
)

_TOWN_OPENINGS = ("{Town} is {a_town_kind} in {country}.", "{Town} is {a_town_kind} in the {formal}.")
_TOWN_FOUNDER = ("It was founded in {town_year} by {founder}.",
                 "According to its charter, the settlement was founded by {founder} in {town_year}.",
                 "{founder} founded the settlement in {town_year}.")
_TOWN_FILLERS = (
    "The old market square is lined with timber houses.",
    "A stone bridge crosses the river at the centre of the settlement.",
    "Its economy long rested on salt, wool and river trade.",
    "The parish church holds a celebrated carved pulpit.",
    "A narrow-gauge railway once linked it to the coast.",
    "The surrounding hills are known for their orchards and vineyards.",
    "Every autumn the streets fill for a horse fair.",
    "Much of the medieval wall still stands.",
)
_TOWN2_OPENINGS = ("{Town} grew quickly during the age of the railways.",
                   "Today {Town} is a quiet place with a busy weekly market.")
_TOWN2_PEOPLE = ("Notable people born in {Town} include {people}.", "{people} were born in {Town}.")
_TOWN2_PERSON = ("{people} was born in {Town}.",)

_ORG_OPENINGS = (
    (("founder", "hq"), "{Org} is {a_org_kind} founded in {org_year} by {founder}, headquartered in {hq}."),
    (("founder",), "{Org} is {a_org_kind} founded in {org_year} by {founder}."),
    ((), "{Org} is {a_org_kind} established in {org_year}."),
)
_ORG_FACTS = {"hq": ("It is headquartered in {hq}.", "Its headquarters are in {hq}."),
              "founder": ("Its founder was {founder}.",)}
_ORG_FILLERS = (
    "It expanded steadily during its first decades.",
    "A fire destroyed its original premises and much of its archive.",
    "It has weathered several changes of ownership.",
    "Its annual report lists dozens of active projects.",
    "It once employed a full-time archivist.",
    "The building it occupies was originally a customs house.",
)
_ORG2_OPENINGS = ("Over the years {Org} has employed many notable people.",
                  "The staff of {Org} has changed considerably since its founding.")
_ORG2_PEOPLE = ("{Org} has employed, among others, {people}.",)

_DISAMBIGUATION = ("{N} may refer to:", "{N}, {a_noun} who worked for {org}",
                   "If an internal link led you here, you may wish to change the link to point "
                   "directly to the intended article.")

# Question templates.
_POPQA = {
    # relation: (weight, template)
    "occupation": (3.0, "What is {s}'s occupation?"),
    "birthplace": (3.0, "In what city was {s} born?"),
    "birth_year": (1.5, "In what year was {s} born?"),
    "instrument": (1.0, "What instrument does {s} play?"),
    "sport": (1.0, "What sport does {s} play?"),
    "spouse": (1.0, "Who is {s}'s spouse?"),
    "employer": (1.0, "Which organisation did {s} work for?"),
    "genre": (2.0, "What genre is {s}?"),
    "producer": (1.5, "Who was the producer of {s}?"),
    "director": (1.0, "Who was the director of {s}?"),
    "author": (1.0, "Who is the author of {s}?"),
    "creator": (0.5, "Who created {s}?"),
    "country": (1.0, "In what country is {s}?"),
    "town_founder": (0.5, "Who founded {s}?"),
    "org_founder": (0.5, "Who founded {s}?"),
    "headquarters": (0.5, "In what city is {s} headquartered?"),
    "publisher": (0.5, "Who published {s}?"),
}
_NO_ANSWER_POPQA = {"occupation": 3.0, "birthplace": 3.0, "birth_year": 1.5, "instrument": 1.0,
                    "sport": 1.0, "spouse": 1.0, "genre": 2.0}
_TWOWIKI = {
    # relation: (weight, template, usable for no-answer questions)
    "founder_birthplace": (1.0, "Where was the founder of {s} born?", True),
    "birthplace_country": (1.0, "Which country is the birthplace of {s} located in?", False),
    "director_spouse": (1.0, "Who is the spouse of the director of {s}?", True),
    "birthplace_founder": (0.7, "Who founded the town where {s} was born?", False),
    "employer_headquarters": (0.7, "In which city is the headquarters of the organisation {s} worked for?", False),
    "author_birth_year": (1.0, "In what year was the author of {s} born?", True),
    "producer_birthplace": (1.0, "Where was the producer of {s} born?", True),
}
_ASQA = {
    # relation: (ambiguous question, disambiguated question)
    "occupation": ("What is {s}'s occupation?", "What is the occupation of the {s} born in {year}?"),
    "birthplace": ("Where was {s} born?", "Where was {s} the {occ} born?"),
    "birth_year": ("When was {s} born?", "When was {s} the {occ} born?"),
    "employer": ("Which organisation did {s} work for?", "Which organisation did {s} the {occ} work for?"),
    "work": ("What is {s} best known for?", "What is {s} the {occ} best known for?"),
}


# ---------------------------------------------------------------------------------------------
# Entities

@dataclass(eq=False)
class _Town:
    key: str
    name: str
    country: str
    formal: str
    kind: str
    founder: str
    year: int


@dataclass(eq=False)
class _Org:
    key: str
    name: str
    kind: str
    year: int = 0
    founder: _Person | None = None
    hq: _Town | None = None


@dataclass(eq=False)
class _Work:
    key: str
    title: str
    kind: str  # album, film, book, painting, sculpture, building
    year: int
    creator: _Person
    genre: str | None = None
    producer: _Person | None = None
    publisher: _Org | None = None


@dataclass(eq=False)
class _Person:
    key: str
    first: str
    last: str
    family: int  # near-duplicate family id
    shared: bool  # the exact name belongs to two or three people
    gender: str = "f"
    year: int = 0
    town: _Town | None = None
    category: str = ""
    occupation: str = ""
    skill: str | None = None
    employer: _Org | None = None
    spouse: _Person | None = None
    married: int = 0
    work: _Work | None = None
    founded: list = field(default_factory=list)
    lookalikes: list = field(default_factory=list)
    # which passage states which fact (p1 early life, p2 career, p3 later life)
    place: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def _skill_relation(person: _Person) -> str | None:
    if person.skill is None:
        return None
    return "sport" if person.category == "sport" else "instrument"


# ---------------------------------------------------------------------------------------------
# Names

_MIN_TOKEN = 4


@lru_cache(maxsize=1)
def _fixed_words() -> tuple[frozenset, frozenset]:
    """Every word a template or vocabulary list can write, and all their substrings of length >= 4."""
    texts: list[str] = []

    def walk(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    walk([_OCCUPATION_ALIASES, _SPORTS, _INSTRUMENTS, _CATEGORIES, _GENRES, _ORG_KINDS, _CATEGORY_NOUN,
          _COUNTRY_FORMS, _TOWN_KINDS, _TITLE_ADJECTIVES, _TITLE_NOUNS, _P1_OPENINGS, _P1_FACTS,
          _P1_BIRTHPLACE_WITH_COUNTRY, _P1_FILLERS, _P2_OPENINGS, _P2_FACTS, _P2_FILLERS, _P3_OPENINGS,
          _P3_BIRTHPLACE, _P3_NAME_LINES, _P3_WORDING, _P3_HATNOTES, _P3_FILLERS, _WORK_OPENINGS,
          _WORK_PRODUCER, _WORK_PUBLISHER, _WORK_FILLERS, _REVIEW_LINES, _REVIEW_WORDING,
          _REVIEW_FILLERS, _TOWN_OPENINGS, _TOWN_FOUNDER, _TOWN_FILLERS, _TOWN2_OPENINGS,
          _TOWN2_PEOPLE, _TOWN2_PERSON, _ORG_OPENINGS, _ORG_FACTS, _ORG_FILLERS, _ORG2_OPENINGS,
          _ORG2_PEOPLE, _DISAMBIGUATION, _POPQA, _TWOWIKI, _ASQA, "he she his her him an a"])
    words = {w for text in texts for w in re.findall(r"[a-z]+", re.sub(r"\{[^}]*\}", " ", text.lower()))}
    subs = {w[i:j] for w in words for i in range(len(w)) for j in range(i + _MIN_TOKEN, len(w) + 1)}
    return frozenset(words), frozenset(subs)


class _Names:
    """Invents name tokens under one rule: no token is a substring of another token or of a template
    word, and none contains a template word of four letters or more. So an answer ("Velmora",
    "oboe") can only match where it is really written, and the near-duplicate names of a family
    (Maskel, Maskol) differ inside the word, never by a prefix or suffix that would make one a
    substring of the other."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words, fixed_subs = _fixed_words()
        self.tokens: set[str] = set()
        self.blocked: set[str] = set(fixed_subs)  # substrings of everything written so far

    def _ok(self, token: str) -> bool:
        t = token.lower()
        if len(t) < _MIN_TOKEN or t in self.blocked:
            return False
        for i in range(len(t)):
            for j in range(i + _MIN_TOKEN, len(t) + 1):
                if t[i:j] in self.tokens or t[i:j] in self.words:
                    return False
        return True

    def _add(self, token: str) -> str:
        t = token.lower()
        self.tokens.add(t)
        self.blocked.update(t[i:j] for i in range(len(t)) for j in range(i + _MIN_TOKEN, len(t) + 1))
        return token

    def fresh(self, syllables: int = 2, suffixes: tuple[str, ...] = ("",), min_len: int = 4) -> str:
        rng = self.rng
        for _ in range(10_000):
            word = rng.choice(_ONSETS) + rng.choice(_VOWELS)
            for _ in range(syllables - 1):
                word += rng.choice(_INNER_CODAS) + rng.choice(_INNER_ONSETS) + rng.choice(_VOWELS)
            suffix = rng.choice(suffixes)
            # A vowel-initial suffix needs a consonant before it (Velm-ora, not Velo-ora).
            word += rng.choice(_ENDINGS[1:] if suffix[:1] in tuple("aeiou") else _ENDINGS) + suffix
            word = word.capitalize()
            if min_len <= len(word) <= 12 and self._ok(word):
                return self._add(word)
        raise RuntimeError("name space exhausted; use fewer entities")

    def variant(self, token: str) -> str:
        """A one-letter variant: a vowel swapped or a consonant doubled inside the word."""
        rng = self.rng
        for _ in range(200):
            chars = list(token)
            if rng.random() < 0.75:
                spots = [i for i, c in enumerate(chars) if c.lower() in "aeiouy" and i > 0]
                if not spots:
                    continue
                i = rng.choice(spots)
                chars[i] = rng.choice([v for v in "aeiou" if v != chars[i]])
            else:  # double a consonant between two vowels: Dorin -> Dorrin
                spots = [i for i in range(1, len(chars) - 1) if chars[i] not in "aeiouy"
                         and chars[i - 1] in "aeiouy" and chars[i + 1] in "aeiouy"]
                if not spots:
                    continue
                i = rng.choice(spots)
                chars.insert(i, chars[i])
            word = "".join(chars)
            if self._ok(word):
                return self._add(word)
        return self.fresh(min_len=5)


def _article(word) -> str:
    if isinstance(word, int):  # said aloud: "an eighteen-ninety-seven film", "a nineteen-..."
        return ("an " if str(word).startswith(("8", "11", "18")) else "a ") + str(word)
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------------------------------------
# The world


class _Builder:
    def __init__(self, seed: int, n_people: int, n_questions: int, no_answer_fraction: float):
        self.seed = seed
        self.rng = random.Random(seed)
        self.names = _Names(self.rng)
        self.n_people = n_people
        self.n_questions = n_questions
        self.no_answer_fraction = no_answer_fraction
        # style counts
        self.n_asqa = round(n_questions * STYLE_SHARES[ASQA])
        self.n_2wiki = round(n_questions * STYLE_SHARES[TWOWIKI])
        self.n_popqa = n_questions - self.n_asqa - self.n_2wiki
        n_na = round(n_questions * no_answer_fraction)
        single = self.n_popqa + self.n_2wiki
        self.n_na_2wiki = min(self.n_2wiki, round(n_na * self.n_2wiki / single)) if single else 0
        self.n_na_popqa = min(self.n_popqa, n_na - self.n_na_2wiki)

    # -- entities ------------------------------------------------------------------------------

    def build_entities(self) -> None:
        rng, names = self.rng, self.names
        n_countries = max(4, self.n_people // 20)
        countries = [names.fresh(2, _COUNTRY_SUFFIXES, min_len=6) for _ in range(n_countries)]
        formal = {c: rng.choice(_COUNTRY_FORMS).format(c=c) for c in countries}
        self.towns = []
        for i in range(max(8, self.n_people // 4)):
            country = countries[i % n_countries] if i < n_countries else rng.choice(countries)
            name = names.fresh(rng.choice((1, 2)), _TOWN_SUFFIXES, min_len=6)
            founder = f"{names.fresh(2)} {names.fresh(2, min_len=5)}"  # a historical figure, no passage
            self.towns.append(_Town(f"town:{i}", name, country, formal[country], rng.choice(_TOWN_KINDS),
                                    founder, rng.randint(1050, 1790)))
        self.people = self._make_people()
        categories = list(_CATEGORIES)
        weights = [_CATEGORIES[c][3] for c in categories]
        for person in self.people:
            person.gender = rng.choice("fm")
            person.category = rng.choices(categories, weights)[0]
            self._draw_attributes(person)
        # People who share a name must differ in what the ambiguous questions ask.
        groups: dict[str, list[_Person]] = {}
        for person in self.people:
            if person.shared:
                groups.setdefault(person.name, []).append(person)
        self.shared_groups = list(groups.values())
        for group in self.shared_groups:
            for i, person in enumerate(group):
                for _ in range(100):
                    earlier = group[:i]
                    if all(person.occupation != q.occupation and person.town is not q.town
                           and abs(person.year - q.year) > 2 for q in earlier):
                        break
                    person.category = rng.choices(categories, weights)[0]
                    self._draw_attributes(person)
        self._make_orgs()
        for group in self.shared_groups:
            for i, person in enumerate(group):
                for _ in range(20):
                    if all(person.employer is not q.employer for q in group[:i]):
                        break
                    person.employer = rng.choice(self.orgs_by_kind[_CATEGORIES[person.category][1]])
        self._make_works()
        # Half the people are married, in random couples.
        people = self._shuffled(self.people)[:len(self.people) // 2]
        for a, b in zip(people[0::2], people[1::2]):
            a.spouse, b.spouse = b, a
            a.married = b.married = max(a.year, b.year) + rng.randint(20, 34)
        for person in self.people:
            person.place = {
                "occupation": "p1" if rng.random() < 0.6 else "p2",
                "birthplace": "p1" if rng.random() < 0.85 else "p3",
                "skill": "p2" if rng.random() < 0.7 else "p1",
            }

    def _draw_attributes(self, person: _Person) -> None:
        rng = self.rng
        occupations = _CATEGORIES[person.category][0]
        person.occupation = rng.choice(occupations)
        # Recorded albums and films need their century: no film of 1861.
        person.year = rng.randint({"music": 1895, "film": 1865}.get(person.category, 1840), 1975)
        person.town = rng.choice(self.towns)
        person.skill = None
        if person.category == "music":
            person.skill = rng.choice(_INSTRUMENTS)
        elif person.category == "sport":
            person.skill = rng.choice(list(_SPORTS))
            person.occupation = _SPORTS[person.skill]

    def _make_people(self) -> list[_Person]:
        rng, names = self.rng, self.names
        # Enough shared names for the ambiguous questions (five relations each, some spare).
        n_groups = min(math.ceil(self.n_asqa * 1.2 / len(_ASQA)) + 1, self.n_people // 8)
        people: list[_Person] = []
        taken: set[str] = set()
        first_pool: list[str] = []

        def new_first() -> str:
            if first_pool and rng.random() < 0.3:
                return rng.choice(first_pool)
            first_pool.append(names.fresh(2))
            return first_pool[-1]

        def add(first: str, last: str, family: int, shared: bool = False) -> bool:
            if len(people) >= self.n_people or (f"{first} {last}" in taken and not shared):
                return False
            taken.add(f"{first} {last}")
            people.append(_Person(f"person:{len(people)}", first, last, family, shared))
            return True

        family = 0
        for _ in range(n_groups):
            first, last = new_first(), names.fresh(2, min_len=5)
            for _ in range(rng.choice((2, 2, 3))):
                add(first, last, family, shared=True)
            family += 1
        while len(people) < self.n_people:
            first, last = new_first(), names.fresh(2, min_len=5)
            add(first, last, family)
            if rng.random() < 0.45:
                # A family of look-alikes: one letter apart, or sharing a first name or a surname.
                for _ in range(rng.randint(1, 3)):
                    how = rng.random()
                    if how < 0.35:
                        add(first, names.variant(last), family)
                    elif how < 0.6:
                        add(names.variant(first), last, family)
                    elif how < 0.8:
                        add(new_first(), last, family)
                    else:
                        add(first, names.fresh(2, min_len=5), family)
            family += 1
        by_family: dict[int, list[_Person]] = {}
        for person in people:
            by_family.setdefault(person.family, []).append(person)
        for members in by_family.values():
            for person in members:
                person.lookalikes = [q for q in members if q.name != person.name]
        return people

    def _make_orgs(self) -> None:
        rng, names = self.rng, self.names
        # About six people (or books, for publishers) per organisation, so that no organisation's
        # name turns up in a large share of the corpus.
        demand = {kind: 0 for kind in _ORG_KINDS}
        for person in self.people:
            demand[_CATEGORIES[person.category][1]] += 1
            if _CATEGORIES[person.category][2] == "book" or person.occupation == "photographer":
                demand["publisher"] += 1
        self.orgs: list[_Org] = []
        self.orgs_by_kind: dict[str, list[_Org]] = {}
        for kind, (_desc, suffixes) in _ORG_KINDS.items():
            for _ in range(max(2, math.ceil(demand[kind] / 6))):
                org = _Org(f"org:{len(self.orgs)}", f"{names.fresh(2, min_len=5)} {rng.choice(suffixes)}", kind)
                org.founder = rng.choice(self.people)
                org.founder.founded.append(org)
                org.year = org.founder.year + rng.randint(24, 45)
                org.hq = rng.choice(self.towns)
                self.orgs.append(org)
                self.orgs_by_kind.setdefault(kind, []).append(org)
        for person in self.people:
            person.employer = rng.choice(self.orgs_by_kind[_CATEGORIES[person.category][1]])

    def _make_works(self) -> None:
        rng = self.rng
        adjectives, nouns = _TITLE_ADJECTIVES, _TITLE_NOUNS
        capacity = len(adjectives) * len(nouns) + 2 * len(nouns) * (len(nouns) - 1)
        if len(self.people) > capacity:
            raise ValueError(f"n_people={len(self.people)} exceeds the {capacity} distinct work titles")
        used: set[str] = set()
        self.works: list[_Work] = []
        by_category: dict[str, list[_Person]] = {}
        for person in self.people:
            by_category.setdefault(person.category, []).append(person)
        for person in self.people:
            while True:
                pattern = rng.random()
                if pattern < 0.5:
                    title = f"The {rng.choice(adjectives)} {rng.choice(nouns)}"
                else:
                    a, b = rng.sample(nouns, 2)
                    title = f"{a} {'and' if pattern < 0.75 else 'of'} {b}"
                if title not in used:
                    used.add(title)
                    break
            kind = _CATEGORIES[person.category][2]
            if kind == "art":
                kind = _ART_WORK[person.occupation]
            work = _Work(f"work:{len(self.works)}", title, kind, person.year + rng.randint(22, 48), person)
            genre_pool = {"album": "album", "film": "film"}.get(kind) or (
                person.category if kind == "book" else None)
            if genre_pool:
                work.genre = rng.choice(list(_GENRES[genre_pool]))
            if kind in ("album", "film"):
                peers = [p for p in by_category[person.category] if p is not person] or self.people
                work.producer = rng.choice(peers)
            if kind == "book":
                work.publisher = rng.choice(self.orgs_by_kind["publisher"])
            person.work = work
            self.works.append(work)

    # -- facts ---------------------------------------------------------------------------------

    @staticmethod
    def answers(entity, relation: str) -> list[str]:
        """The gold answers (the written form first) for one fact."""
        if relation == "occupation":
            return list(_OCCUPATION_ALIASES[entity.occupation])
        if relation == "birthplace":
            return [entity.town.name, f"{entity.town.name}, {entity.town.country}"]
        if relation == "birth_year":
            return [str(entity.year)]
        if relation == "skill":
            return [entity.skill]
        if relation == "spouse":
            return [entity.spouse.name]
        if relation == "employer":
            return [entity.employer.name]
        if relation == "work":
            return [entity.work.title]
        if relation == "genre":
            for pool in _GENRES.values():
                if entity.genre in pool:
                    return list(pool[entity.genre])
        if relation == "creator":
            return [entity.creator.name]
        if relation == "producer":
            return [entity.producer.name]
        if relation == "publisher":
            return [entity.publisher.name]
        if relation == "country":
            return [entity.country, entity.formal]
        if relation == "founder":
            return [entity.founder if isinstance(entity, _Town) else entity.founder.name]
        if relation == "hq":
            return [entity.hq.name, f"{entity.hq.name}, {entity.hq.country}"]
        raise KeyError(relation)

    # -- hidden facts (the no-answer questions) --------------------------------------------------

    def popqa_candidates(self, relation: str) -> list:
        """Subjects a single-fact question of this relation can ask about."""
        people = [p for p in self.people if not p.shared]
        works = self.works
        if relation in ("occupation", "birthplace", "birth_year", "employer"):
            return people
        if relation == "instrument":
            return [p for p in people if p.category == "music"]
        if relation == "sport":
            return [p for p in people if p.category == "sport"]
        if relation == "spouse":
            return [p for p in people if p.spouse is not None]
        if relation == "genre":
            return [w for w in works if w.genre]
        if relation == "producer":
            return [w for w in works if w.producer]
        if relation == "director":
            return [w for w in works if w.kind == "film"]
        if relation == "author":
            return [w for w in works if w.kind == "book"]
        if relation == "creator":
            return [w for w in works if w.kind in ("painting", "sculpture", "building")]
        if relation == "publisher":
            return [w for w in works if w.publisher]
        if relation in ("country", "town_founder"):
            return self.towns
        if relation in ("org_founder", "headquarters"):
            return self.orgs
        raise KeyError(relation)

    @staticmethod
    def popqa_fact(relation: str, subject) -> tuple[str, str]:
        fact_relation = {"instrument": "skill", "sport": "skill", "director": "creator", "author": "creator",
                         "town_founder": "founder", "org_founder": "founder", "headquarters": "hq"}
        return subject.key, fact_relation.get(relation, relation)

    def popqa_question(self, relation: str, subject) -> dict:
        entity_name = subject.title if isinstance(subject, _Work) else subject.name
        key, fact_relation = self.popqa_fact(relation, subject)
        return {"question": _POPQA[relation][1].format(s=entity_name), "answers": self.answers(subject, fact_relation),
                "fact": (key, fact_relation), "entities": [entity_name]}

    def twowiki_candidates(self, relation: str) -> list:
        people = [p for p in self.people if not p.shared]
        if relation == "founder_birthplace":
            return [o for o in self.orgs if not o.founder.shared]
        if relation in ("birthplace_country", "birthplace_founder", "employer_headquarters"):
            return people
        if relation == "director_spouse":
            return [w for w in self.works if w.kind == "film" and w.creator.spouse and not w.creator.shared]
        if relation == "author_birth_year":
            return [w for w in self.works if w.kind == "book" and not w.creator.shared]
        if relation == "producer_birthplace":
            return [w for w in self.works if w.producer and not w.producer.shared]
        raise KeyError(relation)

    def twowiki_question(self, relation: str, subject) -> dict:
        """Two facts: hop 1 leads from the subject to the bridge, hop 2 from the bridge to the answer."""
        if relation == "founder_birthplace":
            bridge, hop1, hop2 = subject.founder, (subject.key, "founder"), "birthplace"
        elif relation == "birthplace_country":
            bridge, hop1, hop2 = subject.town, (subject.key, "birthplace"), "country"
        elif relation == "director_spouse":
            bridge, hop1, hop2 = subject.creator, (subject.key, "creator"), "spouse"
        elif relation == "birthplace_founder":
            bridge, hop1, hop2 = subject.town, (subject.key, "birthplace"), "founder"
        elif relation == "employer_headquarters":
            bridge, hop1, hop2 = subject.employer, (subject.key, "employer"), "hq"
        elif relation == "author_birth_year":
            bridge, hop1, hop2 = subject.creator, (subject.key, "creator"), "birth_year"
        elif relation == "producer_birthplace":
            bridge, hop1, hop2 = subject.producer, (subject.key, "producer"), "birthplace"
        else:
            raise KeyError(relation)
        subject_name = subject.title if isinstance(subject, _Work) else subject.name
        return {"question": _TWOWIKI[relation][1].format(s=subject_name),
                "answers": self.answers(bridge, hop2), "hop1": hop1, "fact": (bridge.key, hop2),
                "entities": [subject_name, bridge.name]}

    def choose_hidden(self) -> None:
        """Pick, before any passage is written, the facts no passage will state.

        More are hidden than needed: a candidate is used only if its answer never appears next to its
        entity's name by coincidence (checked once the corpus exists)."""
        rng = self.rng
        self.hidden: set[tuple[str, str]] = set()
        self.na_popqa: list[tuple[str, object]] = []
        self.na_2wiki: list[tuple[str, object]] = []
        seen: set[tuple[str, str]] = set()
        # Shared names are ambiguous answers that turn up in many passages: never ask for one.
        shared_names = {group[0].name for group in self.shared_groups}
        relations = list(_NO_ANSWER_POPQA)
        weights = [_NO_ANSWER_POPQA[r] for r in relations]
        pools = {r: self.popqa_candidates(r) for r in relations}
        want = 2 * self.n_na_popqa + 4 if self.n_na_popqa else 0
        for _ in range(want * 20):
            if len(self.na_popqa) >= want:
                break
            relation = rng.choices(relations, weights)[0]
            if not pools[relation]:
                continue
            subject = rng.choice(pools[relation])
            fact = self.popqa_fact(relation, subject)
            if fact in seen or shared_names.intersection(self.popqa_question(relation, subject)["answers"]):
                continue
            seen.add(fact)
            self.na_popqa.append((relation, subject))
            self._hide(fact, subject)
        relations = [r for r, spec in _TWOWIKI.items() if spec[2]]
        weights = [_TWOWIKI[r][0] for r in relations]
        pools = {r: self.twowiki_candidates(r) for r in relations}
        want = 2 * self.n_na_2wiki + 4 if self.n_na_2wiki else 0
        for _ in range(want * 20):
            if len(self.na_2wiki) >= want:
                break
            relation = rng.choices(relations, weights)[0]
            if not pools[relation]:
                continue
            subject = rng.choice(pools[relation])
            row = self.twowiki_question(relation, subject)
            fact = row["fact"]
            if fact in seen or shared_names.intersection(row["answers"]):
                continue
            seen.add(fact)
            self.na_2wiki.append((relation, subject))
            bridge = next(p for p in self.people if p.key == fact[0])
            self._hide(fact, bridge)

    def _hide(self, fact: tuple[str, str], subject) -> None:
        self.hidden.add(fact)
        if fact[1] == "spouse":  # one sentence states both directions
            self.hidden.add((subject.spouse.key, "spouse"))

    # -- passages ------------------------------------------------------------------------------

    def write_passages(self) -> None:
        rng = self.rng
        self.raw: list[tuple[str, list[tuple[str, tuple]]]] = []
        natives: dict[str, list[_Person]] = {}
        staff: dict[str, list[_Person]] = {}
        for person in self.people:
            natives.setdefault(person.town.key, []).append(person)
            staff.setdefault(person.employer.key, []).append(person)
        for person in self.people:
            self._person_passages(person)
        for group in self.shared_groups:
            self._disambiguation(group)
        for work in self.works:
            self._work_passages(work)
        for town in self.towns:
            self._town_passages(town, natives.get(town.key, []))
        for org in self.orgs:
            self._org_passages(org, staff.get(org.key, []))
        # Shuffle so that a passage's id says nothing about its entity or its role.
        rng.shuffle(self.raw)
        self.passages: list[dict] = []
        self.fact_pids: dict[tuple[str, str], list[str]] = {}
        for i, (title, sentences) in enumerate(self.raw):
            pid = f"p{i:06d}"
            self.passages.append({"id": pid, "title": title, "text": " ".join(s for s, _ in sentences)})
            for _, facts in sentences:
                for fact in facts:
                    pids = self.fact_pids.setdefault(fact, [])
                    if not pids or pids[-1] != pid:
                        pids.append(pid)

    def _emit(self, title: str, sentences: list[tuple[str, tuple]], fillers: tuple[str, ...], fmt: dict,
              target: tuple[int, int] = (50, 82)) -> None:
        """One passage: the fact sentences (those stating a hidden fact left out), then fillers
        interleaved after the opening until the passage reaches its drawn length."""
        rng = self.rng
        kept = [(text, facts) for text, facts in sentences if not any(f in self.hidden for f in facts)]
        words = sum(len(text.split()) for text, _ in kept)
        goal = rng.randint(*target)
        pool = list(fillers)
        rng.shuffle(pool)
        for template in pool:
            if words >= goal:
                break
            text = self._fill(template, fmt)
            n = len(text.split())
            if words + n > MAX_WORDS:
                continue
            kept.insert(rng.randint(1, len(kept)), (text, ()))
            words += n
        self.raw.append((title, kept))

    def _fill(self, template: str, fmt: dict, **extra) -> str:
        values = {**fmt, **extra}
        if "{other}" in template:  # another person, drawn afresh for each sentence
            values["other"] = self._other(fmt.get("_self"))
        return template.format(**values)

    def _other(self, exclude) -> str:
        while True:
            person = self.rng.choice(self.people)
            if person is not exclude:
                return person.name

    def _person_fmt(self, person: _Person) -> dict:
        she = person.gender == "f"
        town = person.town
        work = person.work
        return {"_self": person, "N": person.name, "last": person.last,
                "P": "She" if she else "He", "p": "she" if she else "he",
                "Pp": "Her" if she else "His", "pp": "her" if she else "his", "o": "her" if she else "him",
                "year": person.year, "a_occ": _article(_OCCUPATION_ALIASES[person.occupation][
                    0 if self.rng.random() < 0.75 else -1]),
                "town": town.name, "country": town.country, "org": person.employer.name,
                "skill": person.skill, "title": work.title,
                "a_kind": _article({"book": "book"}.get(work.kind, work.kind)), "work_year": work.year,
                "spouse": person.spouse.name if person.spouse else "", "married": person.married,
                "bio_year": self.rng.randint(person.year + 40, max(person.year + 41, 2024))}

    def _pick_opening(self, openings, available: set[str]):
        options = [(req, t) for req, t in openings if set(req) <= available]
        weights = [len(req) * 2 + 1 for req, _ in options]
        return self.rng.choices(options, weights)[0]

    def _person_passages(self, person: _Person) -> None:
        rng, hidden = self.rng, self.hidden
        fmt = self._person_fmt(person)
        key = person.key
        fact = {"birth_year": (key, "birth_year"), "occupation": (key, "occupation"),
                "birthplace": (key, "birthplace"), "employer": (key, "employer"), "spouse": (key, "spouse"),
                "skill": (key, "skill"), "work": (person.work.key, "creator")}
        skill_rel = _skill_relation(person)
        place = person.place

        # p1: early life. Names the person once, then says he or she.
        want = {"birth_year"} | {r for r in ("occupation", "birthplace") if place[r] == "p1"}
        available = {r for r in want if fact[r] not in hidden}
        req, opening = self._pick_opening(_P1_OPENINGS, available)
        sentences = [(self._fill(opening, fmt), tuple(fact[r] for r in req))]
        for relation in sorted(available - set(req)):
            if relation == "birthplace" and rng.random() < 0.2:
                sentences.append((self._fill(_P1_BIRTHPLACE_WITH_COUNTRY, fmt),
                                  (fact["birthplace"], (person.town.key, "country"))))
            else:
                sentences.append((self._fill(rng.choice(_P1_FACTS[relation]), fmt), (fact[relation],)))
        if skill_rel and place["skill"] == "p1":
            sentences.append((self._fill(rng.choice(_P1_FACTS[skill_rel]), fmt), (fact["skill"],)))
        self._emit(person.name, sentences, _P1_FILLERS, fmt)

        # p2: career.
        want = {"employer"} | ({"occupation"} if place["occupation"] == "p2" else set())
        available = {r for r in want if fact[r] not in hidden}
        req, opening = self._pick_opening(_P2_OPENINGS, available)
        sentences = [(self._fill(opening, fmt), tuple(fact[r] for r in req))]
        for relation in sorted(available - set(req)):
            sentences.append((self._fill(rng.choice(_P2_FACTS[relation]), fmt), (fact[relation],)))
        if skill_rel and place["skill"] == "p2":
            sentences.append((self._fill(rng.choice(_P2_FACTS[skill_rel]), fmt), (fact["skill"],)))
        sentences.append((self._fill(rng.choice(_P2_FACTS["work"]), fmt), (fact["work"],)))
        for org in person.founded[:2]:
            sentences.append((self._fill(_P2_FACTS["founded"][0], fmt, found_year=org.year, founded=org.name),
                              ((org.key, "founder"),)))
        self._emit(person.name, sentences, _P2_FILLERS, fmt)

        # p3: later life and legacy. Repeats the name and the questions' wording, mostly without
        # the answers: the distractor that outranks p1 and p2 for a name-heavy query.
        has_spouse = person.spouse is not None and fact["spouse"] not in hidden
        req, opening = self._pick_opening(_P3_OPENINGS, {"spouse"} if has_spouse else set())
        # A marriage is one fact seen from both sides.
        sentences = [(self._fill(opening, fmt), (fact["spouse"], (person.spouse.key, "spouse")) if req else ())]
        if place["birthplace"] == "p3":
            sentences.append((self._fill(_P3_BIRTHPLACE, fmt), (fact["birthplace"],)))
        for line in rng.sample(_P3_NAME_LINES, 2):
            sentences.append((self._fill(line, fmt), ()))
        topics = ["occupation", "birthplace", "birth_year", "employer"] + ([skill_rel] if skill_rel else [])
        if person.spouse:
            topics.append("spouse")
        for topic in rng.sample(topics, rng.choice((1, 2))):
            sentences.append((self._fill(rng.choice(_P3_WORDING[topic]), fmt), ()))
        if person.lookalikes:
            looks = rng.sample(person.lookalikes, min(2, len(person.lookalikes)))
            hatnote = rng.choice(_P3_HATNOTES) if len(looks) == 1 else _P3_HATNOTES[1]
            sentences.append((self._fill(hatnote, fmt, look=" or ".join(q.name for q in looks)), ()))
        self._emit(person.name, sentences, _P3_FILLERS, fmt, target=(55, 85))

    def _disambiguation(self, group: list[_Person]) -> None:
        name = group[0].name
        entries = [_DISAMBIGUATION[1].format(N=name, a_noun=_article(_CATEGORY_NOUN[p.category]),
                                             org=p.employer.name) for p in group]
        text = f"{_DISAMBIGUATION[0].format(N=name)} {'; '.join(entries)}. {_DISAMBIGUATION[2]}"
        # Shared-name people never have hidden facts (see choose_hidden), so every entry is written.
        self.raw.append((f"{name} (disambiguation)", [(text, tuple((p.key, "employer") for p in group))]))

    def _work_passages(self, work: _Work) -> None:
        rng = self.rng
        genre = work.genre
        fmt = {"_self": work.creator, "T": work.title, "work_year": work.year, "a_work_year": _article(work.year),
               "creator": work.creator.name,
               "genre": genre, "producer": work.producer.name if work.producer else "",
               "publisher": work.publisher.name if work.publisher else "",
               "bio_year": rng.randint(work.year + 5, max(work.year + 6, 2024))}
        creator, has_genre = (work.key, "creator"), (work.key, "genre")
        with_genre, without = _WORK_OPENINGS[work.kind]
        if genre and has_genre not in self.hidden:
            sentences = [(self._fill(with_genre, fmt), (creator, has_genre))]
        else:
            sentences = [(self._fill(without, fmt), (creator,))]
        if work.producer:
            sentences.append((self._fill(rng.choice(_WORK_PRODUCER), fmt), ((work.key, "producer"),)))
        if work.publisher:
            sentences.append((self._fill(rng.choice(_WORK_PUBLISHER), fmt), ((work.key, "publisher"),)))
        fillers = _WORK_FILLERS.get(work.kind, _WORK_FILLERS["art"])
        self._emit(work.title, sentences, fillers, fmt)
        # A review passage for some works: repeats the title and the question's wording only.
        if rng.random() < 0.4:
            other = rng.choice(self.works)
            fmt["T2"] = other.title if other is not work else "its predecessors"
            sentences = [(self._fill(line, fmt), ()) for line in rng.sample(_REVIEW_LINES, 2)]
            relations = ["creator"] + (["genre"] if genre else []) + (["producer"] if work.producer else [])
            for relation in rng.sample(relations, min(2, len(relations))):
                sentences.append((self._fill(_REVIEW_WORDING[relation], fmt), ()))
            self._emit(work.title, sentences, _REVIEW_FILLERS, fmt, target=(45, 70))

    def _town_passages(self, town: _Town, natives: list[_Person]) -> None:
        rng = self.rng
        fmt = {"Town": town.name, "a_town_kind": _article(town.kind), "country": town.country,
               "formal": town.formal, "founder": town.founder, "town_year": town.year}
        sentences = [(self._fill(rng.choice(_TOWN_OPENINGS), fmt), ((town.key, "country"),)),
                     (self._fill(rng.choice(_TOWN_FOUNDER), fmt), ((town.key, "founder"),))]
        if (town.key, "country") in self.hidden:  # never chosen today; keeps the opening honest
            sentences[0] = (f"{town.name} is {_article(town.kind)}.", ())
        self._emit(town.name, sentences, _TOWN_FILLERS, fmt)
        listed = [p for p in natives if (p.key, "birthplace") not in self.hidden]
        if listed:
            listed = rng.sample(listed, min(3, len(listed)))
            names = _join_names([p.name for p in listed])
            template = rng.choice(_TOWN2_PEOPLE) if len(listed) > 1 else _TOWN2_PERSON[0]
            sentences = [(self._fill(rng.choice(_TOWN2_OPENINGS), fmt), ()),
                         (self._fill(template, fmt, people=names), tuple((p.key, "birthplace") for p in listed))]
            self._emit(town.name, sentences, _TOWN_FILLERS, fmt, target=(45, 70))

    def _org_passages(self, org: _Org, staff: list[_Person]) -> None:
        rng = self.rng
        fmt = {"Org": org.name, "a_org_kind": _article(_ORG_KINDS[org.kind][0]), "org_year": org.year,
               "founder": org.founder.name, "hq": org.hq.name}
        facts = {"founder": (org.key, "founder"), "hq": (org.key, "hq")}
        available = {r for r in facts if facts[r] not in self.hidden}
        req, opening = self._pick_opening(_ORG_OPENINGS, available)
        sentences = [(self._fill(opening, fmt), tuple(facts[r] for r in req))]
        for relation in sorted(available - set(req)):
            sentences.append((self._fill(rng.choice(_ORG_FACTS[relation]), fmt), (facts[relation],)))
        self._emit(org.name, sentences, _ORG_FILLERS, fmt)
        listed = [p for p in staff if (p.key, "employer") not in self.hidden]
        if len(listed) >= 2:
            listed = rng.sample(listed, min(3, len(listed)))
            sentences = [(self._fill(rng.choice(_ORG2_OPENINGS), fmt), ()),
                         (self._fill(_ORG2_PEOPLE[0], fmt, people=_join_names([p.name for p in listed])),
                          tuple((p.key, "employer") for p in listed))]
            self._emit(org.name, sentences, _ORG_FILLERS, fmt, target=(45, 70))

    # -- questions -----------------------------------------------------------------------------

    def _mentioning(self, name: str) -> list[int]:
        """Indexes of passages whose title or text names `name` as whole words."""
        words = name.split()
        candidates = set(self.capital_index.get(words[0], ()))
        for word in words[1:]:
            candidates &= self.capital_index.get(word, set())
        pattern = re.compile(r"\b" + re.escape(name) + r"\b")
        return [i for i in sorted(candidates) if pattern.search(self.searchable[i])]

    def _answer_near_entity(self, entities: list[str], answers: list[str]) -> bool:
        lowered = [a.lower() for a in answers]
        for name in entities:
            for i in self._mentioning(name):
                text = self.searchable[i].lower()
                if any(a in text for a in lowered):
                    return True
        return False

    def make_questions(self) -> list[dict]:
        rng = self.rng
        self.searchable = [f"{p['title']} {p['text']}" for p in self.passages]
        self.capital_index: dict[str, set[int]] = {}
        for i, text in enumerate(self.searchable):
            for word in set(re.findall(r"[A-Z][a-z]+", text)):
                self.capital_index.setdefault(word, set()).add(i)
        self._rows: list[dict] = []
        self._used: set[str] = set()
        # A name shared by several people is an ambiguous answer and turns up in many passages.
        self._shared_names = {group[0].name for group in self.shared_groups}
        n_popqa_na, n_2wiki_na = self._no_answer_questions()
        self._ambiguous_questions()
        self._two_hop_questions(n_2wiki_na)
        self._single_fact_questions(n_popqa_na)
        rows = self._rows
        if len(rows) < self.n_questions:
            raise ValueError(f"n_people={self.n_people} is too small for n_questions={self.n_questions}: "
                             f"only {len(rows)} distinct questions; use more people or fewer questions")
        rng.shuffle(rows)
        return [{"id": f"syn-{self.seed}-{i:05d}", **row} for i, row in enumerate(rows)]

    def _add(self, row: dict, dataset: str, style: str, relation: str, gold, bridge=()) -> None:
        self._used.add(row["question"])
        out = {"dataset": dataset, "question": row["question"], "answers": row["answers"]}
        if "qa_pairs" in row:
            out["qa_pairs"] = row["qa_pairs"]
        out.update({"gold_passage_ids": sorted(gold), "bridge_passage_ids": sorted(bridge),
                    "style": style, "relation": relation, "entities": row["entities"]})
        self._rows.append(out)

    def _no_answer_questions(self) -> tuple[int, int]:
        """No-answer questions: the fact is hidden and its answer never sits next to the names."""
        n_popqa_na = 0
        for relation, subject in self.na_popqa:
            if n_popqa_na >= self.n_na_popqa:
                break
            row = self.popqa_question(relation, subject)
            if row["question"] in self._used or self._answer_near_entity(row["entities"], row["answers"]):
                continue
            self._add(row, POPQA, "single-fact", relation, [])
            n_popqa_na += 1
        n_2wiki_na = 0
        for relation, subject in self.na_2wiki:
            if n_2wiki_na >= self.n_na_2wiki:
                break
            row = self.twowiki_question(relation, subject)
            if row["question"] in self._used or not self.fact_pids.get(row["hop1"]) \
                    or self._answer_near_entity(row["entities"], row["answers"]):
                continue
            self._add(row, TWOWIKI, "two-hop", relation, [], self.fact_pids[row["hop1"]])
            n_2wiki_na += 1
        return n_popqa_na, n_2wiki_na

    def _ambiguous_questions(self) -> None:
        """Ambiguous questions: one per (shared name, relation); all people's facts are written."""
        n_asqa = 0
        combos = [(group, relation) for group in self.shared_groups for relation in _ASQA]
        self.rng.shuffle(combos)
        for group, relation in combos:
            if n_asqa >= self.n_asqa:
                break
            name = group[0].name
            ambiguous, disambiguated = _ASQA[relation]
            pairs, gold = [], set()
            for person in group:
                fact = (person.work.key, "creator") if relation == "work" else (person.key, relation)
                pids = self.fact_pids.get(fact)
                if not pids:
                    break
                gold.update(pids)
                pairs.append({"question": disambiguated.format(s=name, year=person.year, occ=person.occupation),
                              "answers": self.answers(person, relation)})
            else:
                answers = list(dict.fromkeys(a for pair in pairs for a in pair["answers"]))
                self._add({"question": ambiguous.format(s=name), "answers": answers, "qa_pairs": pairs,
                           "entities": [name]}, ASQA, "ambiguous", relation, gold)
                n_asqa += 1

    def _two_hop_questions(self, n_2wiki: int) -> None:
        """Answerable two-hop questions: both hops written, in disjoint sets of passages."""
        relations = list(_TWOWIKI)
        pools = {r: self._shuffled(self.twowiki_candidates(r)) for r in relations}
        while n_2wiki < self.n_2wiki and any(pools.values()):
            live = [r for r in relations if pools[r]]
            relation = self.rng.choices(live, [_TWOWIKI[r][0] for r in live])[0]
            row = self.twowiki_question(relation, pools[relation].pop())
            hop1, hop2 = self.fact_pids.get(row["hop1"], []), self.fact_pids.get(row["fact"], [])
            if row["question"] in self._used or not hop1 or not hop2 or set(hop1) & set(hop2) \
                    or self._shared_names.intersection(row["answers"]):
                continue
            self._add(row, TWOWIKI, "two-hop", relation, hop2, hop1)
            n_2wiki += 1

    def _single_fact_questions(self, n_popqa: int) -> None:
        """Answerable single-fact questions fill the rest (and any shortfall of the other styles)."""
        target = self.n_questions - len(self._rows) + n_popqa
        relations = list(_POPQA)
        pools = {r: self._shuffled(self.popqa_candidates(r)) for r in relations}
        while n_popqa < target and any(pools.values()):
            live = [r for r in relations if pools[r]]
            relation = self.rng.choices(live, [_POPQA[r][0] for r in live])[0]
            row = self.popqa_question(relation, pools[relation].pop())
            pids = self.fact_pids.get(row["fact"])
            if row["question"] in self._used or not pids or self._shared_names.intersection(row["answers"]):
                continue
            self._add(row, POPQA, "single-fact", relation, pids)
            n_popqa += 1

    def _shuffled(self, items: list) -> list:
        items = list(items)
        self.rng.shuffle(items)
        return items


def generate_world(seed: int = 0, n_people: int = 120, n_questions: int = 300, *,
                   no_answer_fraction: float = 0.1) -> World:
    """Invent a world of `n_people` people (plus towns, organisations and works) and ask
    `n_questions` questions about it: ~60% synthetic-popqa, ~25% synthetic-2wikimultihopqa, ~15%
    synthetic-asqa, of which `no_answer_fraction` (single-fact and two-hop only) have a fact that
    no passage states. Deterministic for the arguments."""
    if n_people < 20:
        raise ValueError(f"n_people={n_people}: use at least 20")
    if n_questions < 1:
        raise ValueError(f"n_questions={n_questions}: use at least 1")
    if not 0.0 <= no_answer_fraction <= 0.5:
        raise ValueError(f"no_answer_fraction={no_answer_fraction}: use a value in [0, 0.5]")
    builder = _Builder(seed, n_people, n_questions, no_answer_fraction)
    builder.build_entities()
    builder.choose_hidden()
    builder.write_passages()
    questions = builder.make_questions()
    return World(passages=builder.passages, questions=questions)


def is_train(question_id: str) -> bool:
    """The deterministic ~80/20 split: a question is in train when its id's hash says so."""
    return int(hashlib.sha1(question_id.encode("utf-8")).hexdigest()[:8], 16) % 100 < TRAIN_PERCENT


def write_world(out_dir, seed: int = 0, n_people: int = 120, n_questions: int = 300, *,
                no_answer_fraction: float = 0.1) -> dict[str, Path]:
    """Write corpus.jsonl, qa.jsonl, qa_train.jsonl and qa_test.jsonl under `out_dir`; return their paths."""
    world = generate_world(seed, n_people, n_questions, no_answer_fraction=no_answer_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.jsonl", "qa": out / "qa.jsonl",
             "train": out / "qa_train.jsonl", "test": out / "qa_test.jsonl"}
    _write_jsonl(paths["corpus"], world.passages)
    _write_jsonl(paths["qa"], world.questions)
    _write_jsonl(paths["train"], [q for q in world.questions if is_train(q["id"])])
    _write_jsonl(paths["test"], [q for q in world.questions if not is_train(q["id"])])
    return paths


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instructrag_ray.synthetic",
                                     description="Write a synthetic corpus and QA files (see the module docstring).")
    parser.add_argument("out_dir", help="directory for corpus.jsonl, qa.jsonl, qa_train.jsonl, qa_test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=120)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--no-answer-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    paths = write_world(args.out_dir, args.seed, args.people, args.questions,
                        no_answer_fraction=args.no_answer_fraction)
    for name, path in paths.items():
        with path.open(encoding="utf-8") as f:
            count = sum(1 for _ in f)
        print(f"{name:7s} {count:6d} rows  {path}")


if __name__ == "__main__":
    main()
