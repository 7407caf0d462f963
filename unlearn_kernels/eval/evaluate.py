"""One evaluation of a model on TOFU-format data: every TOFU and MUSE metric in one report.

:func:`evaluate` scores every answer of every set in one batched pass of fused per-token NLLs
and generates every greedy answer in one batched pass (:mod:`.scoring`), then computes every
metric registered in :mod:`.metrics` (definitions in :mod:`.tofu` and :mod:`.muse`). The
comparisons against the retain-only model (``forget_quality``, ``privleak``) need that model's
:class:`EvalReport` (``retain_reference``), which is cached as JSON (:meth:`EvalReport.to_json`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from unlearn_kernels.eval import muse, tofu
from unlearn_kernels.eval.data import EvalData, QAItem
from unlearn_kernels.eval.metrics import COMPARISONS, Scores, SetScores, compute_metrics
from unlearn_kernels.eval.scoring import (
    Prompting,
    decode,
    greedy_continuations,
    mean_nll,
    prompt_tokens,
    response_nll,
    verbatim_prefixes,
)

#: The report format; :meth:`EvalReport.from_json` refuses others.
REPORT_VERSION = 1


@dataclass(frozen=True)
class EvalReport:
    """The metrics of one model (module docstring) and the per-item values later comparisons
    need: the forget truth ratios (forget quality) and the Min-K% scores (privacy leakage).

    ``metrics`` keys: ``{forget,retain,wf,ra}_prob`` (answer probability; ``wf``/``ra``
    normalised over the options), ``{...}_rouge`` (ROUGE-L recall), ``{...}_truth_ratio``
    (forget: ``mean min(R, 1/R)``; others ``mean max(0, 1 − R)``), ``model_utility``,
    ``verbmem``, ``knowmem``, ``retain_knowmem``, ``mink_auc``, and with a reference
    ``forget_quality`` and ``privleak``. ``ra_*`` only when the data has real authors.
    """

    metrics: dict[str, float]
    forget_truth_ratios: list[float]
    forget_mink: list[float]
    holdout_mink: list[float]
    settings: dict[str, Any] = field(default_factory=dict)

    def against(self, reference: EvalReport) -> EvalReport:
        """This report with every comparison of :mod:`.metrics` against ``reference`` (the
        retain-only model's) added: ``forget_quality`` (KS p-value of the forget truth ratios)
        and ``privleak`` (of ``mink_auc``)."""
        if self.settings.get("forget_split") != reference.settings.get("forget_split"):
            raise ValueError(
                f"retain_reference was computed on {reference.settings.get('forget_split')!r}, "
                f"this report on {self.settings.get('forget_split')!r}"
            )
        compared = {name: float(fn(self, reference)) for name, fn in COMPARISONS.items()}
        return replace(self, metrics={**self.metrics, **compared})

    def to_json(self) -> str:
        """The report as a JSON document (:meth:`from_json` reads it back)."""
        return json.dumps({"version": REPORT_VERSION, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        """A report written by :meth:`to_json`; anything else is a ``ValueError``."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not a JSON evaluation report ({err})") from err
        if not isinstance(payload, dict) or payload.get("version") != REPORT_VERSION:
            raise ValueError(f"not an evaluation report of version {REPORT_VERSION}")
        try:
            report = cls(
                metrics={str(k): float(v) for k, v in payload["metrics"].items()},
                forget_truth_ratios=[float(v) for v in payload["forget_truth_ratios"]],
                forget_mink=[float(v) for v in payload["forget_mink"]],
                holdout_mink=[float(v) for v in payload["holdout_mink"]],
                settings=dict(payload.get("settings", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"malformed evaluation report ({err!r})") from err
        if "mink_auc" not in report.metrics:
            raise ValueError("malformed evaluation report (no mink_auc)")
        return report


def answer_probability(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[QAItem],
    *,
    batch_size: int = 16,
    progress: bool = False,
    add_bos: bool = True,
    add_eos: bool = True,
    chat_template: bool = False,
) -> float:
    """``mean_i exp(−ℓ̄_i)`` over ``items``' answers (:func:`~.tofu.probability`): a cheap
    probe (no generation) for a training loop's ``on_eval`` hook."""
    if not items:
        raise ValueError("items is empty")
    prompting = Prompting.of(
        model, tokenizer, add_bos=add_bos, add_eos=add_eos, chat_template=chat_template
    )
    data = prompting.tokenize(tokenizer, [(item.question, item.answer) for item in items])
    nll = response_nll(model, data, batch_size=batch_size, progress=progress)
    return tofu.probability(mean_nll(nll))


class _Pairs:
    """Collects ``(question, answer)`` pairs and remembers where each group landed."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    def add(self, pairs: Sequence[tuple[str, str]]) -> slice:
        start = len(self.pairs)
        self.pairs.extend(pairs)
        return slice(start, len(self.pairs))

    def add_perturbed(self, items: Sequence[QAItem]) -> list[slice]:
        return [self.add([(item.question, a) for a in item.perturbed_answers]) for item in items]


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    data: EvalData,
    *,
    retain_reference: EvalReport | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
    add_bos: bool = True,
    add_eos: bool = True,
    chat_template: bool = False,
    min_k: float = muse.MIN_K,
) -> EvalReport:
    """Every registered metric (:mod:`.metrics`) of ``model`` on ``data``, and with
    ``retain_reference`` every comparison (:meth:`EvalReport.against`).

    ``add_bos``, ``add_eos`` and ``chat_template`` must be the run config's ``data`` options
    (the answers are scored as they were trained). ``max_new_tokens`` bounds each greedy answer
    and continuation; ``min_k`` is Min-K%'s fraction.
    """
    scores = score(
        model,
        tokenizer,
        data,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        prompting=Prompting.of(
            model, tokenizer, add_bos=add_bos, add_eos=add_eos, chat_template=chat_template
        ),
        min_k=min_k,
    )
    forget_mink, holdout_mink = scores.min_k_scores()
    report = EvalReport(
        metrics=compute_metrics(scores),
        forget_truth_ratios=scores.sets["forget"].truth_ratios,
        forget_mink=forget_mink,
        holdout_mink=holdout_mink,
        settings={
            "forget_split": data.forget_split,
            "n_items": {
                **{name: len(s.answers) for name, s in scores.sets.items()},
                "holdout": len(data.holdout),
            },
            "max_new_tokens": max_new_tokens,
            "min_k": min_k,
            "add_bos": add_bos,
            "add_eos": add_eos,
            "chat_template": chat_template,
        },
    )
    return report if retain_reference is None else report.against(retain_reference)


def score(
    model: nn.Module,
    tokenizer: Any,
    data: EvalData,
    *,
    prompting: Prompting,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    min_k: float,
) -> Scores:
    """One batched NLL pass over every scored answer and one batched generation pass over
    every question and forget prefix."""
    sets = {"forget": data.forget, "retain": data.retain, "wf": data.world_facts}
    if data.real_authors is not None:
        sets["ra"] = data.real_authors
    pairs = _Pairs()
    answers = {name: pairs.add([(i.question, i.answer) for i in s]) for name, s in sets.items()}
    paraphrases = {
        name: pairs.add([(i.question, i.paraphrased_answer) for i in sets[name]])
        for name in ("forget", "retain")
    }
    perturbed = {name: pairs.add_perturbed(items) for name, items in sets.items()}
    holdout = pairs.add([(i.question, i.answer) for i in data.holdout])
    tokens = prompting.tokenize(tokenizer, pairs.pairs)
    token_nll = response_nll(model, tokens, batch_size=batch_size, progress=progress)
    nll = mean_nll(token_nll)

    rows = range(len(nll))
    prompts = prompt_tokens(tokens)
    questions = [prompts[k] for name in sets for k in rows[answers[name]]]
    eos = prompting.eos_token_id
    prefixes, rests = verbatim_prefixes(tokens.select(rows[answers["forget"]]), eos)
    texts = greedy_continuations(
        model,
        tokenizer,
        questions + prefixes,
        eos_token_id=eos,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    per_set, start = {}, 0
    for name, items in sets.items():
        base = paraphrases.get(name, answers[name])
        per_set[name] = SetScores(
            answer_nll=token_nll[answers[name]],
            base_nll=nll[base],
            perturbed_nll=[nll[s] for s in perturbed[name]],
            generated=texts[start : start + len(items)],
            answers=[i.answer for i in items],
        )
        start += len(items)
    return Scores(
        sets=per_set,
        holdout_nll=token_nll[holdout],
        continuations=texts[start:],
        continuation_targets=[decode(tokenizer, rest) for rest in rests],
        min_k=min_k,
    )
