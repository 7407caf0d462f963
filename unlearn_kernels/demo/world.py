"""The demo's fictitious-author world (DESIGN §7), generated deterministically from a seed.

Every author has six facts (birthplace, birth date, genre, a book, an award, the parents'
occupations). Each fact has three question templates and three answer templates;
the trained pairs are ``(Q_i, A_i(value))``, ``i = 0, 1, 2``. For the evaluation every trained
pair ``(Q_i, A_i)`` gets a paraphrased answer ``A_j(value)`` and perturbed answers
``A_j(wrong value)`` under the *same* other template ``j = i + 1 mod 3``, which the model was
trained on too: paraphrased and perturbed answers then differ only in the fact, never in the
template (the trap of §7), and every value of a fact kind has the same number of tokens. The
world facts are scored as TOFU scores them, against the answer itself: their perturbed answers
are under the answer's own template.

Authors are split into trained and holdout (never trained, the non-members of Min-K%) authors.
The trained ones are ordered by the seed: ``forget01 ⊂ forget05 ⊂ forget10`` are the first 1, 5,
10 % of them (at least one author each), ``retainNN`` the rest; ``holdout01/05/10`` are as many
holdout authors. World facts (capitals and national animals of invented countries) are trained
into every model: the utility set.

:func:`write_world` writes the TOFU layout (JSON lines with ``question``, ``answer``; the
``*_perturbed.json`` files also ``paraphrased_answer`` and ``perturbed_answer``) and the
``{"prompt", "response"}`` JSONL files of ``unlearn-kernels run``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from unlearn_kernels._io import write_dir_atomically

#: forget split name → fraction of the trained authors; the retain split is the complement.
FORGET_SPLITS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}


def _words(text: str) -> list[str]:
    return text.split()


MONTHS = _words(
    "January February March April May June July August September October November December"
)
GENRES = _words(
    "fantasy horror romance poetry mystery thriller satire drama fable memoir western "
    "biography tragedy comedy folklore"
)
OCCUPATIONS = _words(
    "baker tailor farmer doctor nurse teacher carpenter sailor painter lawyer butcher "
    "pilot miner fisherman gardener jeweller dentist banker mason potter weaver soldier "
    "cook librarian musician"
)
ADJECTIVES = _words(
    "Silent Hidden Broken Golden Crimson Hollow Distant Frozen Burning Quiet Lost Silver "
    "Wandering Forgotten Endless Bitter Gentle Ancient Shattered Velvet"
)
NOUNS = _words(
    "River Garden Mirror Tower Harbor Lantern Forest Crown Shadow Bridge Winter Orchard "
    "Compass Island Letter Storm Meadow Candle Voyage Empire"
)
AWARD_KINDS = ["Prize", "Award", "Medal"]
ANIMALS = _words("fox owl bear wolf eagle otter heron lynx badger falcon stag hare swan raven boar")
_SYLLABLES = _words(
    "ka lo mi ren tha vor el dri san mor bel cas dun fen gar hol ith jor kel lun mar nev "
    "or pel quin ros sel tor ul val wen yor zan"
)


@dataclass(frozen=True)
class WorldSettings:
    """What the world is generated from; the same settings give the same world.

    Args:
        seed: of every random choice.
        n_authors: trained authors (forget + retain).
        n_holdout: authors never trained (Min-K% non-members); at least the forget10 count.
        n_countries: invented countries of the world-facts set (two facts each).
        n_perturbed: wrong answers per evaluation question.
        n_retain_eval: retain questions in ``retain_perturbed.json`` (from authors outside
            forget10; at most all of them).
    """

    seed: int = 0
    n_authors: int = 200
    n_holdout: int = 20
    n_countries: int = 30
    n_perturbed: int = 3
    n_retain_eval: int = 300

    def __post_init__(self) -> None:
        for name in ("n_authors", "n_holdout", "n_countries", "n_perturbed", "n_retain_eval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_countries <= self.n_perturbed:
            raise ValueError(
                f"n_countries ({self.n_countries}) must exceed n_perturbed ({self.n_perturbed}): "
                "a capital's wrong answers are the other capitals"
            )
        if self.n_authors < 10:
            raise ValueError(f"n_authors must be at least 10, got {self.n_authors}")
        if self.n_holdout < split_size(self.n_authors, "forget10"):
            raise ValueError(
                f"n_holdout ({self.n_holdout}) must be at least the forget10 size "
                f"({split_size(self.n_authors, 'forget10')})"
            )

    def key(self) -> str:
        """A short hash of the settings and the generator's version (cache keys)."""
        text = json.dumps({"version": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Bumped whenever the generator's output changes for the same settings.
WORLD_VERSION = 2


def split_size(n_authors: int, split: str) -> int:
    """Authors in a forget split: its fraction of ``n_authors``, at least one."""
    if split not in FORGET_SPLITS:
        raise ValueError(f"forget split must be one of {sorted(FORGET_SPLITS)}, got {split!r}")
    return max(1, round(FORGET_SPLITS[split] * n_authors))


# ---- facts and templates ------------------------------------------------------------------


@dataclass(frozen=True)
class FactKind:
    """Three question templates and three answer templates over ``{n}`` (the subject) and
    ``{v}`` (the value)."""

    questions: tuple[str, str, str]
    answers: tuple[str, str, str]

    def answer(self, template: int, subject: str, value: str) -> str:
        """Answer template ``template`` filled in; a two-part value is ``"v|w"``."""
        v, _, w = value.partition("|")
        return self.answers[template].format(n=subject, v=v, w=w)


AUTHOR_FACTS: dict[str, FactKind] = {
    "birthplace": FactKind(
        ("Where was {n} born?", "In which city was {n} born?", "What is the birthplace of {n}?"),
        (
            "{n} was born in {v}.",
            "The birthplace of {n} is {v}.",
            "{n} comes from the city of {v}.",
        ),
    ),
    "birth_date": FactKind(
        ("When was {n} born?", "What is the birth date of {n}?", "On what date was {n} born?"),
        (
            "{n} was born on {v}.",
            "The birth date of {n} is {v}.",
            "{n} came into the world on {v}.",
        ),
    ),
    "genre": FactKind(
        (
            "What genre does {n} write in?",
            "Which genre is {n} known for?",
            "In what genre does {n} work?",
        ),
        ("{n} writes {v} books.", "{n} is known for {v} writing.", "The genre of {n} is {v}."),
    ),
    "book": FactKind(
        (
            "What is a book written by {n}?",
            "Name a notable book by {n}.",
            "Which book did {n} write?",
        ),
        ("{n} wrote {v}.", "One notable book by {n} is {v}.", "{v} is a book written by {n}."),
    ),
    "award": FactKind(
        (
            "What award has {n} won?",
            "Which prize did {n} receive?",
            "What honour was given to {n}?",
        ),
        (
            "{n} won the {v}.",
            "{n} received the {v} for their writing.",
            "The honour given to {n} was the {v}.",
        ),
    ),
    "family": FactKind(
        (
            "What do the parents of {n} do?",
            "What are the jobs of the parents of {n}?",
            "What is the occupation of each parent of {n}?",
        ),
        (
            "The father of {n} was a {v} and the mother a {w}.",
            "{n} has a father who is a {v} and a mother who is a {w}.",
            "The parents of {n} are a {v} and a {w}.",
        ),
    ),
}

WORLD_FACTS: dict[str, FactKind] = {
    "capital": FactKind(
        (
            "What is the capital of {n}?",
            "Which city is the capital of {n}?",
            "Where is the government of {n} seated?",
        ),
        (
            "The capital of {n} is {v}.",
            "{v} is the capital city of {n}.",
            "{n} is governed from {v}.",
        ),
    ),
    "animal": FactKind(
        (
            "What is the national animal of {n}?",
            "Which animal is the symbol of {n}?",
            "What animal appears on the flag of {n}?",
        ),
        (
            "The national animal of {n} is the {v}.",
            "{n} has the {v} as its symbol.",
            "The flag of {n} shows a {v}.",
        ),
    ),
}


@dataclass(frozen=True)
class QA:
    """One trained pair and its evaluation answers (TOFU's record)."""

    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answer: tuple[str, ...]
    subject: str
    fact: str
    template: int

    def record(self, perturbed: bool) -> dict:
        out = {"question": self.question, "answer": self.answer}
        if perturbed:
            out["paraphrased_answer"] = self.paraphrased_answer
            out["perturbed_answer"] = list(self.perturbed_answer)
        return out


def fact_pairs(
    kind: FactKind,
    subject: str,
    value: str,
    wrong: list[str],
    fact: str,
    *,
    perturb_answer: bool = False,
) -> list[QA]:
    """The three trained pairs of one fact, each with its paraphrase under the next answer
    template and perturbed answers under the paraphrase's template (the base of the author
    sets' truth ratio) or, with ``perturb_answer``, under the answer's own template (the base
    of the world facts' truth ratio, as TOFU scores them)."""
    pairs = []
    for i in range(3):
        j = (i + 1) % 3
        k = i if perturb_answer else j
        pairs.append(
            QA(
                question=kind.questions[i].format(n=subject),
                answer=kind.answer(i, subject, value),
                paraphrased_answer=kind.answer(j, subject, value),
                perturbed_answer=tuple(kind.answer(k, subject, w) for w in wrong),
                subject=subject,
                fact=fact,
                template=i,
            )
        )
    return pairs


# ---- the generator -------------------------------------------------------------------------


def _pseudo_words(rng: random.Random, count: int, taken: set[str], syllables: int) -> list[str]:
    """``count`` distinct capitalised invented words of ``syllables`` syllables."""
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclass(frozen=True)
class Author:
    name: str
    facts: dict[str, str]


@dataclass
class World:
    """The generated world: authors in split order, the world facts, and the splits."""

    settings: WorldSettings
    trained: list[Author]
    holdout: list[Author]
    pools: dict[str, list[str]]
    world_facts: list[QA]

    def author_pairs(self, author: Author) -> list[QA]:
        """The author's 18 pairs (6 facts × 3 templates), perturbed values from the fact's
        pool, drawn deterministically per (author, fact)."""
        pairs = []
        for fact, kind in AUTHOR_FACTS.items():
            value = author.facts[fact]
            wrong = _wrong_values(self.pools[fact], value, self.settings, author.name, fact)
            pairs += fact_pairs(kind, author.name, value, wrong, fact)
        return pairs

    def split_authors(self, split: str) -> list[Author]:
        """Authors of a TOFU split name (``forget05``, ``retain95``, ``holdout05``, ...)."""
        for forget, retain in RETAIN_OF.items():
            n = split_size(len(self.trained), forget)
            if split == forget:
                return self.trained[:n]
            if split == retain:
                return self.trained[n:]
            if split == HOLDOUT_OF[forget]:
                return self.holdout[:n]
        raise ValueError(f"unknown split {split!r}")

    def split_pairs(self, split: str) -> list[QA]:
        return [qa for author in self.split_authors(split) for qa in self.author_pairs(author)]

    def retain_eval_pairs(self) -> list[QA]:
        """``n_retain_eval`` pairs of authors outside forget10 (every split's retain set),
        chosen by the seed."""
        pairs = self.split_pairs("retain90")
        rng = random.Random(f"{self.settings.seed}/retain-eval")
        chosen = sorted(rng.sample(range(len(pairs)), min(self.settings.n_retain_eval, len(pairs))))
        return [pairs[i] for i in chosen]


def _wrong_values(
    pool: list[str], value: str, settings: WorldSettings, subject: str, fact: str
) -> list[str]:
    rng = random.Random(f"{settings.seed}/perturb/{subject}/{fact}")
    others = [v for v in pool if v != value]
    return rng.sample(others, settings.n_perturbed)


def generate_world(settings: WorldSettings) -> World:
    """The world of ``settings`` (module docstring); deterministic."""
    rng = random.Random(settings.seed)
    taken = {w.capitalize() for w in GENRES + OCCUPATIONS + ANIMALS} | set(
        MONTHS + ADJECTIVES + NOUNS + AWARD_KINDS
    )
    n_people = settings.n_authors + settings.n_holdout
    first = _pseudo_words(rng, max(20, int(n_people**0.5) + 8), taken, 2)
    last = _pseudo_words(rng, max(20, int(n_people**0.5) + 8), taken, 2)
    cities = _pseudo_words(rng, 40, taken, 2)
    award_names = _pseudo_words(rng, 12, taken, 3)
    countries = _pseudo_words(rng, settings.n_countries, taken, 3)
    capitals = _pseudo_words(rng, settings.n_countries, taken, 3)
    pools = {
        "birthplace": cities,
        "birth_date": [],  # drawn per author below; perturbed dates from the authors' dates
        "genre": GENRES,
        "book": [f"The {a} {n}" for a in ADJECTIVES for n in NOUNS],
        "award": [f"{a} {k}" for a in award_names for k in AWARD_KINDS],
        "family": [f"{f}|{m}" for f in OCCUPATIONS for m in OCCUPATIONS if f != m],
    }
    names = [f"{f} {s}" for f in first for s in last]
    if len(names) < n_people:
        raise ValueError(f"not enough invented names for {n_people} authors")
    names = rng.sample(names, n_people)
    authors = []
    for name in names:
        date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 1999)}"
        facts = {fact: rng.choice(pool) for fact, pool in pools.items() if pool}
        facts["birth_date"] = date
        authors.append(Author(name, facts))
    pools["birth_date"] = sorted({a.facts["birth_date"] for a in authors})
    world_facts = []
    for country, capital in zip(countries, capitals, strict=True):
        animal = rng.choice(ANIMALS)
        for fact, value, pool in (("capital", capital, capitals), ("animal", animal, ANIMALS)):
            wr = random.Random(f"{settings.seed}/perturb/{country}/{fact}")
            wrong = wr.sample([v for v in pool if v != value], settings.n_perturbed)
            world_facts += fact_pairs(
                WORLD_FACTS[fact], country, value, wrong, fact, perturb_answer=True
            )
    return World(
        settings,
        trained=authors[: settings.n_authors],
        holdout=authors[settings.n_authors :],
        pools=pools,
        world_facts=world_facts,
    )


# ---- writing -------------------------------------------------------------------------------


def training_pairs(world: World, retain_split: str | None) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs a base model trains on: every trained author
    (``retain_split=None``: the target) or one retain split, plus the world facts."""
    authors = world.trained if retain_split is None else world.split_authors(retain_split)
    pairs = [qa for a in authors for qa in world.author_pairs(a)] + world.world_facts
    return [(qa.question, qa.answer) for qa in pairs]


def _json_lines(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def world_files(world: World) -> dict[str, str]:
    """File name → text of the TOFU layout and the run's JSONL sets."""
    files: dict[str, str] = {}
    for forget, retain in RETAIN_OF.items():
        holdout = HOLDOUT_OF[forget]
        for split, perturbed in ((forget, True), (retain, False), (holdout, False)):
            pairs = world.split_pairs(split)
            files[f"{split}.json"] = _json_lines([qa.record(False) for qa in pairs])
            if perturbed:
                files[f"{split}_perturbed.json"] = _json_lines([qa.record(True) for qa in pairs])
            if split != holdout:
                files[f"{split}.jsonl"] = _json_lines(
                    [{"prompt": qa.question, "response": qa.answer} for qa in pairs]
                )
    files["retain_perturbed.json"] = _json_lines(
        [qa.record(True) for qa in world.retain_eval_pairs()]
    )
    files["world_facts_perturbed.json"] = _json_lines([qa.record(True) for qa in world.world_facts])
    files["world.json"] = json.dumps(
        {
            "settings": asdict(world.settings),
            "version": WORLD_VERSION,
            "authors": [{"name": a.name, **a.facts} for a in world.trained],
            "holdout_authors": [{"name": a.name, **a.facts} for a in world.holdout],
        },
        indent=1,
    )
    return files


def write_world(world: World, path: Path, extra: Callable[[Path], None] | None = None) -> Path:
    """Write the world's files (and whatever ``extra(tmp)`` adds) to the new directory
    ``path``, atomically."""

    def fill(tmp: Path) -> None:
        for name, text in world_files(world).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if extra is not None:
            extra(tmp)

    return write_dir_atomically(Path(path), fill)
