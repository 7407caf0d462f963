"""The metric registry: every reported number by name, as a function of one model's scores.

A *metric* maps a :class:`Scores` (the per-item NLLs and greedy answers of one model) and the
values computed before it (its ``pre_compute``, in registration order) to a float, or ``None``
where it does not apply (``ra_*`` without real authors). A *comparison* maps this model's
:class:`~unlearn_kernels.eval.evaluate.EvalReport` and the retain-only model's to a float
(forget quality, privacy leakage). Register more with :func:`metric` / :func:`comparison`;
the definitions are those of :mod:`.tofu` and :mod:`.muse`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from torch import Tensor

from unlearn_kernels.eval import muse, tofu

if TYPE_CHECKING:
    from unlearn_kernels.eval.evaluate import EvalReport

#: The QA sets by short name, as the metric names use them.
SETS = ("forget", "retain", "wf", "ra")


@dataclass(frozen=True)
class SetScores:
    """One QA set, per item: the answer's per-token NLLs, the mean NLL of the truth ratio's
    base answer (the paraphrase on forget/retain, else the answer) and of each perturbed
    answer, the greedy answer and the true one."""

    answer_nll: list[Tensor]
    base_nll: list[float]
    perturbed_nll: list[list[float]]
    generated: list[str]
    answers: list[str]

    @cached_property
    def mean_answer_nll(self) -> list[float]:
        return [float(v.mean()) for v in self.answer_nll]

    @cached_property
    def truth_ratios(self) -> list[float]:
        return tofu.truth_ratios(self.base_nll, self.perturbed_nll).tolist()

    @cached_property
    def rouge(self) -> tuple[list[float], list[float]]:
        """ROUGE-L ``(recall, F1)`` per item of the greedy answers against the answers."""
        return tofu.rouge_l(self.generated, self.answers)


@dataclass(frozen=True)
class Scores:
    """What one model produced on an :class:`~unlearn_kernels.eval.data.EvalData`."""

    sets: dict[str, SetScores]  # keys from SETS ("ra" only with real authors)
    holdout_nll: list[Tensor]  # per-token answer NLLs of the holdout items
    continuations: list[str]  # greedy continuations of the forget prefixes
    continuation_targets: list[str]  # the true rest of each forget answer
    min_k: float

    def min_k_scores(self) -> tuple[list[float], list[float]]:
        """Min-K% scores of the forget and of the holdout answers."""
        forget = muse.min_k_scores(self.sets["forget"].answer_nll, self.min_k)
        return forget, muse.min_k_scores(self.holdout_nll, self.min_k)


MetricFn = Callable[[Scores, dict[str, float]], float | None]
ComparisonFn = Callable[["EvalReport", "EvalReport"], float]

#: name -> metric, in the order they are computed (a metric may read earlier values).
METRICS: dict[str, MetricFn] = {}
#: name -> comparison against the retain-only model's report.
COMPARISONS: dict[str, ComparisonFn] = {}


def metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn(scores, values) -> float | None`` as metric ``name``."""
    return _register(METRICS, name)


def comparison(name: str) -> Callable[[ComparisonFn], ComparisonFn]:
    """Register ``fn(report, reference) -> float`` as comparison ``name``."""
    return _register(COMPARISONS, name)


def _register(table: dict[str, Any], name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        if name in METRICS or name in COMPARISONS:
            raise ValueError(f"metric {name!r} is already registered")
        table[name] = fn
        return fn

    return register


def compute_metrics(scores: Scores) -> dict[str, float]:
    """Every registered metric that applies to ``scores``, in registration order."""
    values: dict[str, float] = {}
    for name, fn in METRICS.items():
        value = fn(scores, values)
        if value is not None:
            values[name] = float(value)
    return values


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _register_set(name: str) -> None:
    """``{name}_prob``, ``{name}_truth_ratio``, ``{name}_rouge`` of one QA set."""

    @metric(f"{name}_prob")
    def prob(scores: Scores, values: dict[str, float]) -> float | None:
        s = scores.sets.get(name)
        if s is None:
            return None
        if name in ("forget", "retain"):
            return tofu.probability(s.mean_answer_nll)
        return tofu.normalised_probability(s.mean_answer_nll, s.perturbed_nll)

    @metric(f"{name}_truth_ratio")
    def truth_ratio(scores: Scores, values: dict[str, float]) -> float | None:
        s = scores.sets.get(name)
        if s is None:
            return None
        aggregate = tofu.forget_truth_ratio if name == "forget" else tofu.utility_truth_ratio
        return aggregate(s.truth_ratios)

    @metric(f"{name}_rouge")
    def rouge(scores: Scores, values: dict[str, float]) -> float | None:
        s = scores.sets.get(name)
        return None if s is None else _mean(s.rouge[0])


for _name in SETS:
    _register_set(_name)


@metric("knowmem")
def knowmem(scores: Scores, values: dict[str, float]) -> float:
    """MUSE knowledge memorisation: ROUGE-L F1 of the greedy forget answers."""
    return _mean(scores.sets["forget"].rouge[1])


@metric("retain_knowmem")
def retain_knowmem(scores: Scores, values: dict[str, float]) -> float:
    """The same on the retain set (MUSE's utility side)."""
    return _mean(scores.sets["retain"].rouge[1])


@metric("model_utility")
def model_utility(scores: Scores, values: dict[str, float]) -> float:
    """Harmonic mean of prob, ROUGE and truth ratio on every set but forget."""
    return tofu.model_utility(
        [
            values[f"{name}_{kind}"]
            for name in SETS[1:]
            if name in scores.sets
            for kind in ("prob", "rouge", "truth_ratio")
        ]
    )


@metric("verbmem")
def verbmem(scores: Scores, values: dict[str, float]) -> float:
    """MUSE verbatim memorisation: ROUGE-L F1 of the forget continuations."""
    return _mean(tofu.rouge_l(scores.continuations, scores.continuation_targets)[1])


@metric("mink_auc")
def mink_auc(scores: Scores, values: dict[str, float]) -> float:
    """Min-K% membership AUC of forget vs holdout (1: forget recognised as members)."""
    return muse.mia_auc(*scores.min_k_scores())


@comparison("forget_quality")
def forget_quality(report: EvalReport, reference: EvalReport) -> float:
    """KS-test p-value of the forget truth ratios against the retain-only model's."""
    return tofu.forget_quality(report.forget_truth_ratios, reference.forget_truth_ratios)


@comparison("privleak")
def privleak(report: EvalReport, reference: EvalReport) -> float:
    """MUSE privacy leakage of ``mink_auc`` against the retain-only model's."""
    return muse.privleak(report.metrics["mink_auc"], reference.metrics["mink_auc"])
