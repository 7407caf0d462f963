"""TOFU-format evaluation data: a directory of JSON files named as TOFU names them.

For a forget split ``forgetNN`` (``forget01``, ``forget05``, ``forget10``) the reader takes

=============================  =========================================================
``forgetNN_perturbed.json``    the forget items (answer, paraphrase, perturbed answers)
``retain_perturbed.json``      the retain items scored for utility (TOFU's ``eval_log``);
                               their questions must not be forget questions
``holdoutNN.json``             never-trained items, the non-members of the Min-K% attack
``world_facts_perturbed.json`` the world-facts utility set
``real_authors_perturbed.json`` the real-authors utility set (optional)
=============================  =========================================================

The training splits (``forgetNN.json``, ``retain{100-NN}.json``) are not read: the perturbed
files hold the same forget questions with their paraphrased and perturbed answers.

Each file is a JSON array of objects or JSON lines (one object a line, as TOFU is on disk).
Every record has string ``question`` and ``answer``; the ``*_perturbed`` files also a
``perturbed_answer`` list of strings and (forget and retain) a ``paraphrased_answer`` string.
Other keys are ignored. A malformed file is a ``ValueError`` naming the file and the record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_FORGET_SPLIT = re.compile(r"forget(\d\d)")


@dataclass(frozen=True)
class QAItem:
    """One question with its answer; ``paraphrased_answer`` and ``perturbed_answers`` (the
    wrong answers in the same template) where the file has them."""

    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalData:
    """The item sets of one TOFU-format evaluation (see the module docstring)."""

    forget: tuple[QAItem, ...]
    retain: tuple[QAItem, ...]
    holdout: tuple[QAItem, ...]
    world_facts: tuple[QAItem, ...]
    real_authors: tuple[QAItem, ...] | None = None
    forget_split: str = "forget10"


def forget_percent(forget_split: str) -> str:
    """``NN`` of a split name ``forgetNN`` (01..99); anything else is a ``ValueError``."""
    match = _FORGET_SPLIT.fullmatch(forget_split) if isinstance(forget_split, str) else None
    if match is None or not 0 < int(match.group(1)) < 100:
        raise ValueError(
            f"forget_split must be forgetNN with NN in 01..99 (e.g. forget10), got {forget_split!r}"
        )
    return match.group(1)


def read_tofu(data_dir: str | Path, forget_split: str = "forget10") -> EvalData:
    """The evaluation sets of ``forget_split`` from a TOFU-format directory (module docstring)."""
    percent = forget_percent(forget_split)
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"data_dir {str(root)!r} is not a directory")
    forget = read_items(root / f"{forget_split}_perturbed.json", paraphrased=True, perturbed=True)
    retain = read_items(root / "retain_perturbed.json", paraphrased=True, perturbed=True)
    holdout = read_items(root / f"holdout{percent}.json")
    world_facts = read_items(root / "world_facts_perturbed.json", perturbed=True)
    real_authors_file = root / "real_authors_perturbed.json"
    real_authors = (
        read_items(real_authors_file, perturbed=True) if real_authors_file.exists() else None
    )
    shared = {item.question for item in forget} & {item.question for item in retain}
    if shared:
        raise ValueError(
            f"{root}: {len(shared)} question(s) of {forget_split}_perturbed.json are also in "
            f"retain_perturbed.json (e.g. {sorted(shared)[0]!r}); the sets must be disjoint"
        )
    return EvalData(forget, retain, holdout, world_facts, real_authors, forget_split)


def read_items(
    path: str | Path, *, paraphrased: bool = False, perturbed: bool = False
) -> tuple[QAItem, ...]:
    """The items of one file; ``paraphrased`` / ``perturbed`` make those keys required."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing (a TOFU-format file of the evaluation)")
    items = tuple(
        _item(record, f"{path}{where}", paraphrased=paraphrased, perturbed=perturbed)
        for where, record in _records(path)
    )
    if not items:
        raise ValueError(f"{path} holds no record")
    return items


def _records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)``: ``[index]`` in a JSON array, ``:line`` in JSON lines."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a valid JSON array ({err})") from err
        return [(f"[{i}]", record) for i, record in enumerate(records)]
    out = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f":{line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
    return out


def _item(record: Any, name: str, *, paraphrased: bool, perturbed: bool) -> QAItem:
    if not isinstance(record, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(record).__name__}")
    required = ["question", "answer"] + (["paraphrased_answer"] if paraphrased else [])
    for key in required:
        if not isinstance(record.get(key), str):
            raise ValueError(f"{name}: {key!r} must be a string, got {record.get(key)!r}")
    wrong = record.get("perturbed_answer")
    if perturbed and not (
        isinstance(wrong, list) and wrong and all(isinstance(a, str) for a in wrong)
    ):
        raise ValueError(
            f"{name}: 'perturbed_answer' must be a non-empty list of strings, got {wrong!r}"
        )
    return QAItem(
        record["question"],
        record["answer"],
        record["paraphrased_answer"] if paraphrased else None,
        tuple(wrong) if perturbed else (),
    )
