"""Forget/retain data: the step sampler, the random-mismatch pairs, per-split tokenisation."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hf_helpers import random_pairs, word_tokenizer
from oracle import generator

from unlearn_kernels.data.unlearn import (
    MicroBatch,
    StepSampler,
    StepTotals,
    TokenBatch,
    read_split,
    with_responses,
)


def sampler(seed: int = 3, **kw) -> StepSampler:
    options = {"batch_size": 4, "grad_accum": 2, "seed": seed, **kw}
    return StepSampler(10, 7, **options)


def stream(s: StepSampler, split: str, steps: int) -> list[int]:
    return [
        i for step in range(steps) for j in range(s.grad_accum) for i in s.indices(split, step, j)
    ]


def test_each_pass_sees_every_example_once_and_retain_cycles():
    s = sampler()
    forget = stream(s, "forget", 5)  # 40 draws = 4 passes over 10 examples
    for p in range(4):
        assert sorted(forget[10 * p : 10 * p + 10]) == list(range(10))
    retain = stream(s, "retain", 5)  # 40 draws over 7 examples: cycles
    assert Counter(retain[:35]) == Counter({i: 5 for i in range(7)})
    assert forget[:10] != forget[10:20]  # a new order per pass


def test_sampling_is_a_function_of_seed_and_step():
    a, b = sampler(), sampler()
    b.indices("forget", 9, 1)  # visiting other steps first changes nothing
    assert [a.indices("forget", 2, 1), a.mismatch(2, 1)] == [
        b.indices("forget", 2, 1),
        b.mismatch(2, 1),
    ]
    c = sampler(seed=4)
    assert stream(a, "forget", 3) != stream(c, "forget", 3)
    assert all(0 <= i < 7 for step in range(5) for i in a.mismatch(step, 0))
    assert stream(sampler(shuffle=False), "forget", 2)[:12] == [*range(10), 0, 1]


def test_mismatch_pairs_forget_prompts_with_retain_responses():
    gen, seed = generator()
    forget, retain = random_pairs(gen, 6), random_pairs(gen, 5)
    pairs = with_responses(forget, [4, 1], retain, [2, 2], None)
    for b, (f, r) in enumerate([(4, 2), (1, 2)]):
        real_f = forget.input_ids[f][forget.attention_mask[f].bool()]
        real_r = retain.input_ids[r][retain.attention_mask[r].bool()]
        pf, pr = int(forget.prompt_lengths[f]), int(retain.prompt_lengths[r])
        expected = torch.cat([real_f[:pf], real_r[pr:]])
        got = pairs.input_ids[b][pairs.attention_mask[b].bool()]
        assert torch.equal(got, expected), seed
        assert int(pairs.prompt_lengths[b]) == pf
    cut = with_responses(forget, [4], retain, [2], int(forget.prompt_lengths[4]) + 1)
    assert int(cut.attention_mask.sum()) == int(forget.prompt_lengths[4]) + 1


def test_step_totals_count_response_tokens_over_micro_batches():
    gen, _ = generator()
    data = random_pairs(gen, 8)
    first, second = TokenBatch.of(data, [0, 1, 2]), TokenBatch.of(data, [3, 4])
    totals = StepTotals.of([MicroBatch(first, second), MicroBatch(second, first)])
    labelled = int((data.labels() != -100).sum(1)[:5].sum())
    assert totals.forget_tokens == totals.retain_tokens == labelled
    assert totals.forget_sequences == 5 and totals.mismatch_tokens == 0


def test_read_split_tokenises_with_bos_eos_and_names_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    lines = [{"prompt": "w5 w6", "response": "w7 w8"}, {"prompt": "w9", "response": "w10"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = read_split(path, word_tokenizer(), bos_token_id=1, eos_token_id=2, max_length=None)
    assert data.input_ids[0].tolist() == [1, 9, 10, 11, 12, 2]
    assert data.prompt_lengths.tolist() == [3, 2]
    assert data.source_sha256 is not None
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"prompt": "w5", "response": " "}))
    with pytest.raises(ValueError, match=r"s\.jsonl:2: the response ' ' tokenises to no token"):
        read_split(path, word_tokenizer(), bos_token_id=1, eos_token_id=2, max_length=None)
    with pytest.raises(ValueError, match="no chat template"):
        read_split(
            path,
            word_tokenizer(),
            bos_token_id=1,
            eos_token_id=2,
            max_length=None,
            chat_template=True,
        )
