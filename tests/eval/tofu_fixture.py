"""A small TOFU-format directory over the tiny word vocabulary of ``hf_helpers`` (no hub)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hf_helpers import WORDS

WORDS_ONLY = WORDS[4:]


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS_ONLY) for _ in range(rng.randint(low, high)))


def _record(rng: random.Random, *, perturbed: int = 0, paraphrased: bool = False) -> dict:
    record = {"question": _text(rng, 2, 6), "answer": _text(rng, 1, 7)}
    if paraphrased:
        record["paraphrased_answer"] = _text(rng, 1, 7)
    if perturbed:
        record["perturbed_answer"] = [_text(rng, 1, 7) for _ in range(perturbed)]
    return record


def write_tofu(
    root: Path,
    *,
    n: int = 6,
    seed: int = 0,
    jsonl: bool = True,
    real_authors: bool = True,
    forget_split: str = "forget10",
) -> Path:
    """The files :func:`unlearn_kernels.eval.read_tofu` reads, ``n`` records each (JSON lines
    as TOFU is on disk, or JSON arrays)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    percent = forget_split[-2:]
    files = {
        f"{forget_split}_perturbed.json": {"perturbed": 3, "paraphrased": True},
        "retain_perturbed.json": {"perturbed": 3, "paraphrased": True},
        f"holdout{percent}.json": {},
        "world_facts_perturbed.json": {"perturbed": 2},
    }
    if real_authors:
        files["real_authors_perturbed.json"] = {"perturbed": 2}
    for name, kind in files.items():
        records = [_record(rng, **kind) for _ in range(n)]
        with open(root / name, "w", encoding="utf-8") as f:
            if jsonl:
                f.writelines(json.dumps(r) + "\n" for r in records)
            else:
                json.dump(records, f)
    return root
