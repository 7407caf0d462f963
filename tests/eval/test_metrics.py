"""Each TOFU / MUSE metric against values computed by hand or by an independent brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from unlearn_kernels.eval import EvalReport, metrics, muse, tofu


def test_probability_is_the_mean_of_exp_minus_mean_nll():
    # e^-0.5 = 0.60653066, e^-1 = 0.36787944
    assert tofu.probability([0.5, 1.0]) == pytest.approx((0.60653066 + 0.36787944) / 2, abs=1e-8)


def test_normalised_probability_divides_by_all_options():
    # item 1: p = 0.5, p~ = 0.25, 0.25 -> 0.5; item 2: p = 0.2, p~ = 0.2, 0.6 -> 0.2
    nll = [-math.log(0.5), -math.log(0.2)]
    wrong = [[-math.log(0.25)] * 2, [-math.log(0.2), -math.log(0.6)]]
    assert tofu.normalised_probability(nll, wrong) == pytest.approx(0.35, abs=1e-12)
    with pytest.raises(ValueError, match="perturbed_nll"):
        tofu.normalised_probability(nll, wrong[:1])


def test_truth_ratio_averages_perturbed_nlls_then_divides_by_the_base():
    # base NLL 1, perturbed NLLs 1 and 3 (mean 2): R = e^-2 / e^-1 = e^-1
    ratios = tofu.truth_ratios([1.0, 0.0], [[1.0, 3.0], [-1.0]])
    np.testing.assert_allclose(ratios, [math.exp(-1), math.e], rtol=1e-12)
    assert tofu.forget_truth_ratio(ratios) == pytest.approx(math.exp(-1), rel=1e-12)
    # max(0, 1 - R): 0.5 and 0 -> 0.25
    assert tofu.utility_truth_ratio([0.5, 2.0]) == pytest.approx(0.25, abs=1e-12)


def test_rouge_l_recall_and_f1_with_the_stemmer():
    # LCS("a b c", "a c d e") = "a c": recall 2/4, precision 2/3, F1 = 2·(1/2)(2/3)/(7/6) = 4/7
    recall, f1 = tofu.rouge_l(
        ["apple banana cherry", "cats running"], ["apple cherry dog egg", "cat run"]
    )
    assert recall == pytest.approx([0.5, 1.0])
    assert f1 == pytest.approx([4 / 7, 1.0])
    assert tofu.rouge_l([""], ["cat"]) == ([0.0], [0.0])


def _ks_exact_pvalue(x: list[float], y: list[float]) -> float:
    """Two-sided exact p-value P(D ≥ D_obs) over all C(n+m, n) splits of the pooled sample."""
    pooled = sorted(x + y)
    n, m = len(x), len(y)

    def statistic(a: list[float], b: list[float]) -> float:
        return max(
            abs(sum(v <= t for v in a) / len(a) - sum(v <= t for v in b) / len(b)) for t in pooled
        )

    observed = statistic(x, y)
    count = total = 0
    for chosen in itertools.combinations(range(n + m), n):
        a = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(n + m) if i not in chosen]
        count += statistic(a, b) >= observed - 1e-12
        total += 1
    return count / total


def test_forget_quality_is_the_exact_ks_pvalue():
    # fully separated 4 vs 4: only the 2 extreme splits reach D = 1 -> 2 / C(8, 4) = 1/35
    assert tofu.forget_quality([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]) == pytest.approx(
        1 / 35, rel=1e-9
    )
    x, y = [0.1, 0.35, 0.3, 0.9, 0.45], [0.25, 0.5, 0.6, 0.7]
    assert tofu.forget_quality(x, y) == pytest.approx(_ks_exact_pvalue(x, y), rel=1e-9)
    assert tofu.forget_quality(x, x) == 1.0
    with pytest.raises(ValueError, match="truth ratio"):
        tofu.forget_quality([], y)


def test_model_utility_is_the_harmonic_mean():
    assert tofu.model_utility([0.5, 1.0, 0.25]) == pytest.approx(3 / 7, rel=1e-12)
    assert tofu.model_utility([0.5, 0.0, 0.25]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        tofu.model_utility([0.5, -0.1])


def test_min_k_takes_the_least_likely_fraction():
    # k = 0.4 of 5 tokens = 2 tokens: NLLs 5 and 4 -> 4.5; of 2 tokens: int(0.8) = 0 -> 1 token
    scores = muse.min_k_scores([torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0]), [0.5, 2.0]])
    assert scores == pytest.approx([4.5, 2.0])
    assert muse.min_k_scores([[1.0, 5.0, 2.0, 4.0, 3.0]], k=1.0) == pytest.approx([3.0])
    with pytest.raises(ValueError, match="k must"):
        muse.min_k_scores([[1.0]], k=0.0)
    with pytest.raises(ValueError, match=r"token_nll\[0\]"):
        muse.min_k_scores([[]])


def test_mia_auc_counts_holdout_above_forget_pairs():
    # pairs (h > f): 2.5 > {1, 2}; 3 > {1, 2} and 3 = 3 (½); 4 > {1, 2, 3} -> 7.5 / 9
    assert muse.mia_auc([1.0, 2.0, 3.0], [2.5, 3.0, 4.0]) == pytest.approx(7.5 / 9, rel=1e-12)
    rng = np.random.default_rng(0)
    f, h = rng.integers(0, 6, 13).astype(float), rng.integers(0, 6, 8).astype(float)
    brute = np.mean([(b > a) + 0.5 * (b == a) for a in f for b in h])
    assert muse.mia_auc(f, h) == pytest.approx(brute, rel=1e-12)


def test_privleak_uses_muse_orientation():
    # MUSE AUC = 1 - 0.9 = 0.1 against the retain model's 0.5: (0.1 - 0.5) / 0.5 = -80 %
    assert muse.privleak(0.9, 0.5) == pytest.approx(-80.0)
    assert muse.privleak(0.5, 0.5) == 0.0
    assert math.isnan(muse.privleak(0.7, 1.0))


def _report(ratios: list[float], auc: float = 0.5, split: str = "forget10") -> EvalReport:
    return EvalReport({"mink_auc": auc}, ratios, [1.0], [2.0], {"forget_split": split})


def test_forget_quality_separates_identical_from_different_reports():
    rng = np.random.default_rng(1)
    retain = _report(rng.uniform(0.5, 1.5, 20).tolist(), auc=0.55)
    assert retain.against(retain).metrics["forget_quality"] == 1.0
    assert retain.against(retain).metrics["privleak"] == 0.0
    target = _report(rng.uniform(1e-4, 1e-2, 20).tolist(), auc=0.99)
    judged = target.against(retain).metrics
    assert judged["forget_quality"] < 1e-9  # exact: 2 / C(40, 20) = 1.45e-11
    assert judged["privleak"] == pytest.approx((0.01 - 0.45) / 0.45 * 100)
    with pytest.raises(ValueError, match="forget05"):
        target.against(_report([1.0], split="forget05"))


def test_report_json_round_trip_and_errors():
    report = _report([0.25, 2.0], auc=0.75).against(_report([1.0, 0.5]))
    again = EvalReport.from_json(report.to_json())
    assert again == report
    with pytest.raises(ValueError, match="not a JSON"):
        EvalReport.from_json("{")
    with pytest.raises(ValueError, match="version"):
        EvalReport.from_json('{"metrics": {}}')
    with pytest.raises(ValueError, match="malformed"):
        EvalReport.from_json('{"version": 1, "metrics": {"mink_auc": 0.5}}')


def _hand_scores() -> metrics.Scores:
    ln2, ln4 = math.log(2), math.log(4)
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return metrics.Scores(
        sets={
            "forget": metrics.SetScores(
                answer_nll=[t(ln2, ln2), t(ln4)],
                base_nll=[0.0, ln2],
                perturbed_nll=[[ln2, ln2], [0.0, 2 * ln2]],
                generated=["apple banana", "cherry"],
                answers=["apple banana", "dog"],
            ),
            "retain": metrics.SetScores(
                answer_nll=[t(0.0), t(ln2)],
                base_nll=[ln2, ln2],
                perturbed_nll=[[2 * ln2], [3 * ln2]],
                generated=["xray", "zulu"],
                answers=["xray yak", "zulu"],
            ),
            "wf": metrics.SetScores(
                answer_nll=[t(ln2)],
                base_nll=[ln2],
                perturbed_nll=[[ln2, ln4]],
                generated=["apple"],
                answers=["apple"],
            ),
        },
        holdout_nll=[t(3.0, 0.1), t(0.1)],
        continuations=["pear quince"],
        continuation_targets=["pear rose"],
        min_k=0.4,
    )


def test_registry_computes_every_metric_of_hand_scores():
    got = metrics.compute_metrics(_hand_scores())
    wf_tr = 1 - 2**-0.5  # R = exp(ln2 − (ln2 + ln4)/2) = 2^(−1/2)
    utility = [0.75, 0.625, 0.75, 0.4, wf_tr, 1.0]
    want = {
        "forget_prob": 0.375,  # (1/2 + 1/4) / 2
        "forget_truth_ratio": 0.75,  # R = 1/2, 1 -> min(R, 1/R) = 1/2, 1
        "forget_rouge": 0.5,
        "knowmem": 0.5,
        "retain_prob": 0.75,
        "retain_truth_ratio": 0.625,  # R = 1/2, 1/4 -> 1 − R = 1/2, 3/4
        "retain_rouge": 0.75,  # recall 1/2, 1
        "retain_knowmem": (2 / 3 + 1) / 2,  # F1 2/3, 1
        "wf_prob": 0.4,  # 1/2 / (1/2 + 1/2 + 1/4)
        "wf_truth_ratio": wf_tr,
        "wf_rouge": 1.0,
        "model_utility": len(utility) / sum(1 / v for v in utility),
        "verbmem": 0.5,  # LCS 1 of 2 and 2 words
        "mink_auc": 0.5,  # forget ln2, ln4; holdout 3.0, 0.1 -> 2 of 4 pairs
    }
    assert set(got) == set(want)  # no ra_* without real authors
    assert got == pytest.approx(want, rel=1e-12)


def test_registry_takes_new_metrics_and_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))

    @metrics.metric("forget_prob_squared")
    def squared(scores, values):
        return values["forget_prob"] ** 2

    assert metrics.compute_metrics(_hand_scores())["forget_prob_squared"] == 0.375**2
    with pytest.raises(ValueError, match="already registered"):
        metrics.metric("privleak")(squared)
