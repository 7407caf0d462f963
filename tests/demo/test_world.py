"""The demo world: deterministic, disjoint splits, paraphrased and perturbed answers under a
trained template (DESIGN §7), the TOFU layout the evaluation reads."""

from __future__ import annotations

import json
import re

import pytest

from unlearn_kernels.demo.tokenizer import train_tokenizer, world_texts
from unlearn_kernels.demo.world import (
    AUTHOR_FACTS,
    FORGET_SPLITS,
    HOLDOUT_OF,
    RETAIN_OF,
    WORLD_FACTS,
    WorldSettings,
    generate_world,
    split_size,
    training_pairs,
    world_files,
    write_world,
)

SMALL = WorldSettings(seed=3, n_authors=40, n_holdout=4, n_countries=6, n_retain_eval=50)


@pytest.fixture(scope="module")
def world():
    return generate_world(SMALL)


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer(world_texts(world_files(world)))


def test_generator_is_deterministic():
    assert world_files(generate_world(SMALL)) == world_files(generate_world(SMALL))
    other = world_files(generate_world(WorldSettings(**{**SMALL.__dict__, "seed": 4})))
    assert other["forget10.json"] != world_files(generate_world(SMALL))["forget10.json"]


def test_splits_are_disjoint_and_nested(world):
    names = {split: {a.name for a in world.split_authors(split)} for split in _all_splits()}
    trained = {a.name for a in world.trained}
    holdout = {a.name for a in world.holdout}
    assert len(trained) == SMALL.n_authors and len(holdout) == SMALL.n_holdout
    assert not trained & holdout
    assert names["forget01"] < names["forget05"] < names["forget10"]
    for forget, retain in RETAIN_OF.items():
        assert len(names[forget]) == split_size(SMALL.n_authors, forget)
        assert not names[forget] & names[retain]
        assert names[forget] | names[retain] == trained
        assert names[HOLDOUT_OF[forget]] <= holdout
        assert len(names[HOLDOUT_OF[forget]]) == len(names[forget])
    retain_eval = {qa.subject for qa in world.retain_eval_pairs()}
    assert retain_eval <= names["retain90"]
    countries = {qa.subject for qa in world.world_facts}
    assert not countries & (trained | holdout)


def test_questions_are_unique_and_trained_where_they_should_be(world):
    questions = [qa.question for a in world.trained + world.holdout for qa in world.author_pairs(a)]
    questions += [qa.question for qa in world.world_facts]
    assert len(questions) == len(set(questions))
    target = set(training_pairs(world, None))
    retain_only = set(training_pairs(world, "retain95"))
    for qa in world.split_pairs("forget05"):
        assert (qa.question, qa.answer) in target
        assert (qa.question, qa.answer) not in retain_only
    for qa in world.split_pairs("holdout10"):
        assert (qa.question, qa.answer) not in target
    for qa in world.world_facts:
        assert (qa.question, qa.answer) in target and (qa.question, qa.answer) in retain_only


def _pattern(template: str, subject: str) -> re.Pattern:
    text = re.escape(template).replace(re.escape("{n}"), re.escape(subject))
    for slot in ("{v}", "{w}"):
        text = text.replace(re.escape(slot), "(.+?)")
    return re.compile(text + r"\Z")


def _template(kind, text: str, subject: str) -> int:
    matches = [i for i, t in enumerate(kind.answers) if _pattern(t, subject).match(text)]
    assert len(matches) == 1, (text, matches)
    return matches[0]


@pytest.mark.parametrize("split", ["forget10", "retain90"])
def test_paraphrased_and_perturbed_share_a_trained_template(world, tokenizer, split):
    """The paraphrase and every perturbed answer use one answer template, that template is
    trained for the same subject and fact, only the value differs, and every value of a fact
    has as many tokens as the true one."""
    trained = set(training_pairs(world, None))
    for qa in world.split_pairs(split):
        kind = AUTHOR_FACTS[qa.fact]
        j = _template(kind, qa.paraphrased_answer, qa.subject)
        assert j != _template(kind, qa.answer, qa.subject)
        trained_j = (kind.questions[j].format(n=qa.subject), qa.paraphrased_answer)
        assert trained_j in trained  # the paraphrase is itself a trained answer
        n_tokens = len(tokenizer.tokenize(qa.paraphrased_answer))
        assert len(qa.perturbed_answer) == SMALL.n_perturbed
        for wrong in qa.perturbed_answer:
            assert _template(kind, wrong, qa.subject) == j
            assert wrong != qa.paraphrased_answer
            assert len(tokenizer.tokenize(wrong)) == n_tokens


def test_world_facts_are_perturbed_under_the_answer_template(world, tokenizer):
    for qa in world.world_facts:
        kind = WORLD_FACTS[qa.fact]
        i = _template(kind, qa.answer, qa.subject)
        for wrong in qa.perturbed_answer:
            assert _template(kind, wrong, qa.subject) == i and wrong != qa.answer
            assert len(tokenizer.tokenize(wrong)) == len(tokenizer.tokenize(qa.answer))


def test_written_world_is_tofu_layout(world, tmp_path):
    from unlearn_kernels.eval import read_tofu

    root = write_world(world, tmp_path / "world")
    for split in FORGET_SPLITS:
        data = read_tofu(root, split)
        assert len(data.forget) == len(world.split_pairs(split))
        assert len(data.holdout) == len(world.split_pairs(HOLDOUT_OF[split]))
        assert len(data.retain) == SMALL.n_retain_eval
        assert len(data.world_facts) == len(world.world_facts)
        assert data.forget[0].paraphrased_answer and len(data.forget[0].perturbed_answers) == 3
        lines = (root / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line)["prompt"] for line in lines] == [
            qa.question for qa in world.split_pairs(split)
        ]
        retain = (root / f"{RETAIN_OF[split]}.jsonl").read_text().splitlines()
        assert len(retain) == len(world.split_pairs(RETAIN_OF[split]))


def test_tokenizer_covers_the_world(world, tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for q, a in training_pairs(world, None):
        assert tokenizer.unk_token_id not in tokenizer.encode(q + " " + a)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_authors": 5}, "n_authors"),
        ({"n_holdout": 1}, "n_holdout"),
        ({"n_perturbed": 0}, "n_perturbed"),
        ({"n_countries": 3}, "n_countries"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldSettings(**{"n_authors": 40, "n_holdout": 4, **kwargs})


def _all_splits():
    return [*FORGET_SPLITS, *RETAIN_OF.values(), *HOLDOUT_OF.values()]
