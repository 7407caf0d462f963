"""Unlearning evaluation as the field measures it: TOFU's and MUSE's metrics on TOFU-format
data, with every log-probability from the fused per-token cross-entropy (no logits).

- :func:`read_tofu` reads a TOFU-format directory (:mod:`.data`);
- :func:`evaluate` computes every metric into an :class:`EvalReport` (:mod:`.evaluate`; the
  definitions are in :mod:`.tofu` and :mod:`.muse`; the model side in :mod:`.scoring`);
- :func:`answer_probability` is the cheap probe for a training loop's ``on_eval`` hook;
- :func:`metric` / :func:`comparison` register further metrics (:mod:`.metrics`).

See ``docs/evaluation.md``.
"""

from unlearn_kernels.eval.data import EvalData, QAItem, read_tofu
from unlearn_kernels.eval.evaluate import EvalReport, answer_probability, evaluate
from unlearn_kernels.eval.metrics import COMPARISONS, METRICS, comparison, metric

__all__ = [
    "COMPARISONS",
    "METRICS",
    "EvalData",
    "EvalReport",
    "QAItem",
    "answer_probability",
    "comparison",
    "evaluate",
    "metric",
    "read_tofu",
]
