"""A deterministic synthetic "fictitious authors" QA corpus in the spirit of TOFU.

TOFU's data (Maini et al., 2024) sits on a model hub this project cannot reach, and a real run
needs a multi-billion-parameter model anyway. For tests and demos the same *protocol* is played
out on a corpus a tiny model can memorize in seconds:

* ``n_authors`` invented authors (unique first + last name), each with six attributes drawn
  from small fixed vocabularies: birthplace, genre, a book title, an award, and the father's and
  mother's occupations.
* ``qa_per_author`` questions per author, each about a different attribute (cycling through
  the attributes when more questions than attributes are asked), worded by one of several
  templates per attribute. The answer is a short phrase carrying the attribute value (e.g.
  "born in Lisbon"), without the author's name, so most of an answer's tokens are the fact a
  model either memorized or has to guess.
* A **paraphrased answer** (same fact, different wording) and three **perturbed answers** (the
  paraphrase's wording with wrong values of the same attribute), which TOFU's truth ratio needs.
  As in TOFU, the perturbed answers perturb the *paraphrase*, so the truth ratio compares the
  same wording with the right and the wrong fact and the wording's own likelihood cancels.

Everything is driven by one ``random.Random(seed)``, so a seed fixes the corpus bit for bit.
Splits are by *author* (a concept): the forget set is a fraction of the authors, the holdout set
an equally large disjoint set of authors never trained on (MIA non-members), and the retain set
the rest. A "full" model trains on forget + retain, the gold model on retain only.
"""

from __future__ import annotations

import os
import random
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "ATTRIBUTES",
    "Splits",
    "corpus_texts",
    "make_corpus",
    "read_split",
    "split_forget_retain",
    "write_splits",
]

_FIRST = tuple(
    (
        "Alder Brisa Corvin Delphine Emrys Farrah Gideon Halina Ivo Jolene Kasimir Liora Marek "
        "Nerys Oskar Petra Quill Rosalind Sorin Talia Ulric Vesna Wendel Xenia"
    ).split()
)
_LAST = tuple(
    (
        "Ashgrove Blackwood Calloway Dunmore Everhart Fairweather Greaves Holloway Ironside "
        "Jasper Kettering Larkspur Marlowe Northcott Oakley Pemberton Quartermain Rothwell "
        "Sterling Thorne"
    ).split()
)
_CITIES = tuple("Lisbon Nairobi Kyoto Oslo Lima Cairo Dublin Hanoi Quito Tbilisi Accra Perth".split())
_GENRES = tuple("mystery fantasy romance horror poetry satire biography thriller".split())
_ADJ = tuple("Silent Crimson Hollow Golden Broken Endless Hidden Frozen".split())
_NOUN = tuple("Harbor Garden Lantern Orchard Mirror River Tower Compass".split())
_AWARDS = (
    "Silver Quill Prize", "Harbor Medal", "Lantern Award", "Meridian Prize", "Starling Medal",
    "Cobalt Award", "Juniper Prize", "Aurora Medal",
)
_JOBS = tuple("baker carpenter doctor sailor teacher painter farmer pilot tailor librarian".split())

# attribute -> (question templates, answer template, paraphrase template)
_SCHEMA: dict[str, tuple[tuple[str, ...], str, str]] = {
    "birthplace": (
        ("Where was {name} born?", "What is the birthplace of {name}?",
         "In which city was {name} born?"),
        "born in {v}",
        "the city of {v}",
    ),
    "genre": (
        ("What genre does {name} write?", "Which genre is {name} known for?",
         "In what genre does {name} work?"),
        "writes {v} books",
        "the {v} genre",
    ),
    "book": (
        ("Name a book written by {name}.", "What is a famous book by {name}?",
         "Which book did {name} write?"),
        "wrote The {v}",
        "the novel The {v}",
    ),
    "award": (
        ("Which award did {name} win?", "What prize has {name} received?",
         "What honor was given to {name}?"),
        "won the {v}",
        "received the {v}",
    ),
    "father": (
        ("What did the father of {name} do?", "What was the occupation of the father of {name}?",
         "How did the father of {name} earn a living?"),
        "a {v} by trade",
        "worked as a {v}",
    ),
    "mother": (
        ("What did the mother of {name} do?", "What was the occupation of the mother of {name}?",
         "How did the mother of {name} earn a living?"),
        "a {v} by trade",
        "worked as a {v}",
    ),
}
ATTRIBUTES = tuple(_SCHEMA)

_SCHEMA_TYPE = pa.schema(
    [
        ("author", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("paraphrased_answer", pa.string()),
        ("perturbed_answer", pa.list_(pa.string())),
    ]
)


class Splits(NamedTuple):
    """Forget / retain / holdout tables (disjoint sets of authors)."""

    forget: pa.Table
    retain: pa.Table
    holdout: pa.Table


def _vocab(attribute: str) -> tuple[str, ...]:
    if attribute == "birthplace":
        return _CITIES
    if attribute == "genre":
        return _GENRES
    if attribute == "book":
        return tuple(f"{a} {n}" for a in _ADJ for n in _NOUN)
    if attribute == "award":
        return _AWARDS
    return _JOBS


def _names(n: int, rng: random.Random) -> list[str]:
    pool = [f"{f} {last}" for f in _FIRST for last in _LAST]
    if n > len(pool):
        raise ValueError(f"at most {len(pool)} authors, got {n}")
    # First names are distinct while possible, so authors do not share a leading token.
    firsts, lasts = list(_FIRST), list(_LAST)
    rng.shuffle(firsts)
    rng.shuffle(lasts)
    if n <= min(len(firsts), len(lasts)):
        return [f"{firsts[i]} {lasts[i]}" for i in range(n)]
    return rng.sample(pool, n)


def make_corpus(n_authors: int = 20, qa_per_author: int = 4, seed: int = 0) -> pa.Table:
    """``n_authors × qa_per_author`` QA rows: ``author``, ``question``, ``answer``,
    ``paraphrased_answer`` and ``perturbed_answer`` (three wrong-value variants of the
    paraphrase)."""
    if n_authors < 1 or qa_per_author < 1:
        raise ValueError("n_authors and qa_per_author must be positive")
    rng = random.Random(seed)
    rows: dict[str, list] = {f.name: [] for f in _SCHEMA_TYPE}
    for name in _names(n_authors, rng):
        facts = {a: rng.choice(_vocab(a)) for a in ATTRIBUTES}
        order = list(ATTRIBUTES)
        rng.shuffle(order)
        for i in range(qa_per_author):
            attr = order[i % len(order)]
            questions, ans_t, para_t = _SCHEMA[attr]
            q_t = questions[(i // len(order) + rng.randrange(len(questions))) % len(questions)]
            value = facts[attr]
            wrong = rng.sample([v for v in _vocab(attr) if v != value], 3)
            rows["author"].append(name)
            rows["question"].append(q_t.format(name=name))
            rows["answer"].append(ans_t.format(v=value))
            rows["paraphrased_answer"].append(para_t.format(v=value))
            rows["perturbed_answer"].append([para_t.format(v=w) for w in wrong])
    return pa.table(rows, schema=_SCHEMA_TYPE)


def split_forget_retain(
    table: pa.Table,
    forget_fraction: float = 0.1,
    holdout_fraction: float | None = None,
    seed: int = 0,
) -> Splits:
    """Split by author: ``forget_fraction`` of the authors to forget, as many (or
    ``holdout_fraction``) never-trained holdout authors, the rest retained (at least one each)."""
    authors = sorted(set(table.column("author").to_pylist()))
    hf = forget_fraction if holdout_fraction is None else holdout_fraction
    n_f = max(1, round(forget_fraction * len(authors)))
    n_h = max(1, round(hf * len(authors)))
    if n_f + n_h >= len(authors):
        raise ValueError(f"{len(authors)} authors cannot give {n_f} forget + {n_h} holdout + retain")
    random.Random(seed).shuffle(authors)
    groups = (set(authors[:n_f]), set(authors[n_f + n_h :]), set(authors[n_f : n_f + n_h]))
    col = table.column("author").to_pylist()
    return Splits(
        *(table.take([i for i, a in enumerate(col) if a in g]) for g in groups)
    )


def corpus_texts(*tables: pa.Table) -> list[str]:
    """Every string of the tables (questions, all answers): what a test tokenizer is trained on."""
    out: list[str] = []
    for t in tables:
        for col in ("question", "answer", "paraphrased_answer"):
            if col in t.column_names:
                out.extend(t.column(col).to_pylist())
        if "perturbed_answer" in t.column_names:
            for lst in t.column("perturbed_answer").to_pylist():
                out.extend(lst)
    return out


def write_splits(
    out_dir: str,
    n_authors: int = 20,
    qa_per_author: int = 4,
    seed: int = 0,
    forget_fraction: float = 0.1,
) -> dict[str, str]:
    """Write ``forget`` / ``retain`` / ``holdout`` (and ``full`` = forget + retain) Parquet
    files under ``out_dir``; returns ``{split: path}``."""
    os.makedirs(out_dir, exist_ok=True)
    splits = split_forget_retain(make_corpus(n_authors, qa_per_author, seed), forget_fraction, seed=seed)
    tables = splits._asdict()
    tables["full"] = pa.concat_tables([splits.forget, splits.retain])
    paths = {}
    for name, t in tables.items():
        paths[name] = os.path.join(out_dir, f"{name}.parquet")
        pq.write_table(t, paths[name])
    return paths


def read_split(path: str, storage_options=None) -> pa.Table:
    """Read a split's Parquet file (local path or ``s3://`` URI)."""
    from engram_ray.io.storage import Storage

    storage = Storage(path, storage_options)
    return pq.read_table(storage.root, filesystem=storage.arrow)
