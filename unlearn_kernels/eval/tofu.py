"""TOFU's metrics (Maini et al., 2024), computed as TOFU's and open-unlearning's code does.

Inputs are per-item mean answer-token NLLs ``ℓ̄ = (1/|a|) Σ_t −log p(a_t | q, a_<t)`` (see
:mod:`unlearn_kernels.eval.scoring`), so ``P(a|q)^(1/|a|) = exp(−ℓ̄)``.

- **Answer probability**: ``mean_i exp(−ℓ̄_i)``. On world facts and real authors TOFU
  normalises it over the options: ``mean_i p_i / (p_i + Σ_j p̃_ij)`` with ``p = exp(−ℓ̄)`` of the
  answer and ``p̃`` of each perturbed answer.
- **Truth ratio** per item: ``R_i = P̃_i / P̂_i`` with ``P̂_i = exp(−ℓ̄(â_i))`` of the base answer
  (the paraphrase on forget and retain, the answer on world facts and real authors) and
  ``P̃_i = exp(−mean_j ℓ̄(ã_ij))`` over the perturbed answers. The mean over perturbed answers is
  taken on the NLLs (a geometric mean of their normalised probabilities), as both codes do;
  the paper's formula writes an arithmetic mean of ``P(ã_j)^(1/|ã_j|)``. Computed in the log
  domain, without the codes' ``1e-10`` guards.
- **Truth-ratio aggregates**: forget ``mean_i min(R_i, 1/R_i)`` (1: the model cannot tell the
  paraphrase from the perturbed answers); retain / world facts / real authors
  ``mean_i max(0, 1 − R_i)`` (1: the correct answer is far more likely).
- **ROUGE**: ROUGE-L recall (``rouge-score``, Porter stemmer on) of the greedy answer against
  the answer; MUSE's knowledge memorisation reads the ROUGE-L F1 of the same pairs.
- **Forget quality**: the p-value of the two-sample Kolmogorov–Smirnov test
  (``scipy.stats.ks_2samp``, two-sided, its default exact/asymptotic choice) between the forget
  truth ratios ``R`` of the evaluated model and of the retain-only model.
- **Model utility**: the harmonic mean (``scipy.stats.hmean``) of answer probability, ROUGE-L
  recall and truth-ratio aggregate on retain, world facts and (when present) real authors;
  0 when any of them is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def probability(nll: Sequence[float]) -> float:
    """``mean_i exp(−ℓ̄_i)``: the mean length-normalised answer probability."""
    return float(np.mean(np.exp(-np.asarray(nll, dtype=np.float64))))


def normalised_probability(nll: Sequence[float], perturbed_nll: Sequence[Sequence[float]]) -> float:
    """``mean_i p_i / (p_i + Σ_j p̃_ij)`` with ``p = exp(−ℓ̄)`` (TOFU's world-facts Prob.)."""
    if len(nll) != len(perturbed_nll):
        raise ValueError(f"nll has {len(nll)} items but perturbed_nll {len(perturbed_nll)}")
    values = []
    for true, wrong in zip(nll, perturbed_nll, strict=True):
        # p / (p + Σ p̃) = 1 / (1 + Σ exp(ℓ̄ − ℓ̄̃)), stable for tiny p
        values.append(1.0 / (1.0 + float(np.exp(true - np.asarray(wrong, dtype=np.float64)).sum())))
    return float(np.mean(values))


def truth_ratios(base_nll: Sequence[float], perturbed_nll: Sequence[Sequence[float]]) -> np.ndarray:
    """Per item ``R_i = exp(ℓ̄(â_i) − mean_j ℓ̄(ã_ij))`` = ``P̃_i / P̂_i`` (module docstring)."""
    if len(base_nll) != len(perturbed_nll):
        raise ValueError(
            f"base_nll has {len(base_nll)} items but perturbed_nll {len(perturbed_nll)}"
        )
    wrong = np.array([np.mean(np.asarray(w, dtype=np.float64)) for w in perturbed_nll])
    return np.exp(np.asarray(base_nll, dtype=np.float64) - wrong)


def forget_truth_ratio(ratios: Sequence[float]) -> float:
    """``mean_i min(R_i, 1/R_i)`` (open-unlearning's ``closer_to_1_better``)."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / r)))


def utility_truth_ratio(ratios: Sequence[float]) -> float:
    """``mean_i max(0, 1 − R_i)`` (open-unlearning's ``true_better``)."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=np.float64))))


def rouge_l(predictions: Sequence[str], targets: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per pair ROUGE-L ``(recall, F1)`` of ``predictions[i]`` against ``targets[i]``
    (``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(target, prediction)["rougeL"]
        for prediction, target in zip(predictions, targets, strict=True)
    ]
    return [s.recall for s in scores], [s.fmeasure for s in scores]


def forget_quality(ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """p-value of ``scipy.stats.ks_2samp(ratios, retain_ratios)`` (two-sided)."""
    if len(ratios) == 0 or len(retain_ratios) == 0:
        raise ValueError("forget_quality needs at least one truth ratio on each side")
    return float(stats.ks_2samp(np.asarray(ratios), np.asarray(retain_ratios)).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean ``n / Σ 1/v`` of non-negative ``values`` (0 if any is 0)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or bool((v < 0).any()) or not bool(np.isfinite(v).all()):
        raise ValueError(f"model_utility needs finite non-negative values, got {v.tolist()}")
    return 0.0 if bool((v == 0).any()) else float(stats.hmean(v))
