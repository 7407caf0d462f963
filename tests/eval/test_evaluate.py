"""``evaluate`` end to end on a tiny Llama: every metric recomputed from the independent oracles
(float64 log-softmax per example, argmax decoding per prompt), forget quality 1.0 against
itself and ≈ 0 against a model trained on the forget set."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from eval_oracle import greedy_oracle, oracle_nll
from hf_helpers import hf_word_tokenizer, tiny_llama
from rouge_score import rouge_scorer
from tofu_fixture import write_tofu

from unlearn_kernels.data.formats import tokenize_pairs
from unlearn_kernels.eval import answer_probability, evaluate, read_tofu

BOS, EOS = 1, 2
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokenizer = hf_word_tokenizer()
    model = tiny_llama(3, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
    data = read_tofu(write_tofu(tmp_path_factory.mktemp("tofu"), n=10, seed=4))
    report = evaluate(
        model, tokenizer, data, batch_size=6, max_new_tokens=NEW_TOKENS, progress=False
    )
    return model, tokenizer, data, report


def _tokens(tokenizer, pairs):
    return tokenize_pairs(pairs, tokenizer, bos_token_id=BOS, eos_token_id=EOS)


def _nll(model, tokenizer, pairs) -> list[np.ndarray]:
    return [v.numpy() for v in oracle_nll(model, _tokens(tokenizer, pairs))]


def _mean(model, tokenizer, pairs) -> np.ndarray:
    return np.array([v.mean() for v in _nll(model, tokenizer, pairs)])


def _ratios(model, tokenizer, items, base: str) -> np.ndarray:
    """R_i = exp(ℓ̄(base) − mean_j ℓ̄(perturbed_j)), from the oracle."""
    base_nll = _mean(model, tokenizer, [(i.question, getattr(i, base)) for i in items])
    wrong = [
        _mean(model, tokenizer, [(i.question, a) for a in i.perturbed_answers]).mean()
        for i in items
    ]
    return np.exp(base_nll - np.array(wrong))


def _rouge(predictions, targets, kind):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.mean(
        [
            getattr(scorer.score(t, p)["rougeL"], kind)
            for p, t in zip(predictions, targets, strict=False)
        ]
    )


def _greedy_answers(model, tokenizer, prompts):
    return [
        tokenizer.decode(greedy_oracle(model, p, NEW_TOKENS, EOS), skip_special_tokens=True).strip()
        for p in prompts
    ]


def test_probabilities_and_truth_ratios_match_the_oracle(world):
    model, tokenizer, data, report = world
    m = report.metrics
    qa = lambda items: [(i.question, i.answer) for i in items]  # noqa: E731
    assert m["forget_prob"] == pytest.approx(
        np.exp(-_mean(model, tokenizer, qa(data.forget))).mean(), rel=1e-5
    )
    assert m["retain_prob"] == pytest.approx(
        np.exp(-_mean(model, tokenizer, qa(data.retain))).mean(), rel=1e-5
    )
    # world facts: p / (p + Σ p~)
    p = np.exp(-_mean(model, tokenizer, qa(data.world_facts)))
    wrong = [
        np.exp(-_mean(model, tokenizer, [(i.question, a) for a in i.perturbed_answers])).sum()
        for i in data.world_facts
    ]
    assert m["wf_prob"] == pytest.approx(np.mean(p / (p + np.array(wrong))), rel=1e-5)

    forget_r = _ratios(model, tokenizer, data.forget, "paraphrased_answer")
    np.testing.assert_allclose(report.forget_truth_ratios, forget_r, rtol=1e-4)
    assert m["forget_truth_ratio"] == pytest.approx(
        np.minimum(forget_r, 1 / forget_r).mean(), rel=1e-4
    )
    retain_r = _ratios(model, tokenizer, data.retain, "paraphrased_answer")
    assert m["retain_truth_ratio"] == pytest.approx(
        np.maximum(0, 1 - retain_r).mean(), rel=1e-4, abs=1e-7
    )
    ra_r = _ratios(model, tokenizer, data.real_authors, "answer")
    assert m["ra_truth_ratio"] == pytest.approx(np.maximum(0, 1 - ra_r).mean(), rel=1e-4, abs=1e-7)

    utility = [
        m[f"{s}_{k}"] for s in ("retain", "wf", "ra") for k in ("prob", "rouge", "truth_ratio")
    ]
    expected = 0.0 if min(utility) == 0 else len(utility) / sum(1 / v for v in utility)
    assert m["model_utility"] == pytest.approx(expected, rel=1e-12)
    assert answer_probability(model, tokenizer, data.forget, batch_size=4) == pytest.approx(
        m["forget_prob"], rel=1e-6
    )


def test_generation_metrics_match_the_oracle(world):
    model, tokenizer, data, report = world
    m = report.metrics
    for name, items in (("forget", data.forget), ("retain", data.retain), ("wf", data.world_facts)):
        prompts = [
            t[:n]
            for t, n in _tokens(tokenizer, [(i.question, i.answer) for i in items]).sequences()
        ]
        answers = _greedy_answers(model, tokenizer, prompts)
        targets = [i.answer for i in items]
        assert m[f"{name}_rouge"] == pytest.approx(_rouge(answers, targets, "recall")), name
        if name == "forget":
            assert m["knowmem"] == pytest.approx(_rouge(answers, targets, "fmeasure"))
    # verbmem: prompt + first half of the answer words, the rest of the answer as target
    prompts, targets = [], []
    for item in data.forget:
        words = item.answer.split()
        half = len(words) // 2
        text = " ".join([item.question, *words[:half]])
        prompts.append(torch.tensor([BOS, *tokenizer.encode(text, add_special_tokens=False)]))
        targets.append(" ".join(words[half:]))
    assert m["verbmem"] == pytest.approx(
        _rouge(_greedy_answers(model, tokenizer, prompts), targets, "fmeasure")
    )


def test_min_k_and_auc_match_the_oracle(world):
    model, tokenizer, data, report = world

    def scores(items):
        out = []
        for v in _nll(model, tokenizer, [(i.question, i.answer) for i in items]):
            out.append(np.sort(v)[::-1][: max(1, int(0.4 * v.size))].mean())
        return np.array(out)

    forget, holdout = scores(data.forget), scores(data.holdout)
    np.testing.assert_allclose(report.forget_mink, forget, rtol=1e-5)
    np.testing.assert_allclose(report.holdout_mink, holdout, rtol=1e-5)
    auc = np.mean([(h > f) + 0.5 * (h == f) for f in forget for h in holdout])
    assert report.metrics["mink_auc"] == pytest.approx(auc)


def test_forget_quality_one_against_itself_and_near_zero_after_memorising(world):
    model, tokenizer, data, report = world
    itself = evaluate(
        model, tokenizer, data, retain_reference=report, max_new_tokens=1, progress=False
    )
    assert itself.metrics["forget_quality"] == 1.0
    assert itself.metrics["privleak"] == 0.0

    # a model that memorised the forget paraphrases: every R ≪ the untrained model's
    target = copy.deepcopy(model).train()
    batch = _tokens(tokenizer, [(i.question, i.paraphrased_answer) for i in data.forget])
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.Adam(target.parameters(), lr=2e-2)
    for _ in range(40):
        optimizer.zero_grad()
        target(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss.backward()
        optimizer.step()
    judged = evaluate(
        target, tokenizer, data, retain_reference=report, max_new_tokens=1, progress=False
    )
    assert max(judged.forget_truth_ratios) < min(report.forget_truth_ratios)
    # fully separated 10 vs 10: exact p = 2 / C(20, 10)
    assert judged.metrics["forget_quality"] == pytest.approx(2 / 184756, rel=1e-6)
