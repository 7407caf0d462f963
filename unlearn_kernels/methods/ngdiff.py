"""NGDiff (Bu et al., "Unlearning as multi-task optimization: a normalized gradient difference
approach with an adaptive learning rate"): two tasks, ``L_F = NLL(forget)`` and
``L_R = NLL(retain)``, each with its own backward; the step follows
``d = g_R/‖g_R‖ − g_F/‖g_F‖`` with the GeN learning rate (:mod:`unlearn_kernels.train.ngdiff`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from unlearn_kernels.methods.base import Method, MethodParams, Term
from unlearn_kernels.methods.registry import register
from unlearn_kernels.train.ngdiff import GeN


class NGDiffParams(MethodParams):
    name: Literal["ngdiff"] = "ngdiff"
    gen: bool = Field(True, description="adapt the learning rate with GeN (docs/design.md §1)")
    # Probing every 4 steps: the GeN authors' advice (lazy_freq >= 4, gen-optim README); the
    # smoothing 0.9 and the clip to [η/2, 2η] are docs/design.md §1's.
    gen_every: int = Field(4, ge=1, description="optimizer steps between GeN probes")
    gen_smoothing: float = Field(0.9, ge=0, lt=1, description="η ← s·η + (1 − s)·clip(η*)")
    gen_max_ratio: float = Field(2.0, ge=1, description="clip η* to [η/r, r·η]")
    eps: float = Field(1e-12, gt=0, description="floor of the gradient norms")


@register
class NGDiff(Method):
    name = "ngdiff"
    Params = NGDiffParams
    tasks = ("forget", "retain")

    def gen(self) -> GeN | None:
        p = self.params
        if not p.gen:
            return None
        return GeN(every=p.gen_every, smoothing=p.gen_smoothing, max_ratio=p.gen_max_ratio)

    def terms(self, model, task, batch, totals):
        if task == "forget":
            loss = self.losses.nll(model, batch.forget, 1.0 / totals.forget_tokens)
        else:
            loss = self.losses.nll(model, batch.retain, 1.0 / totals.retain_tokens)
        yield Term(f"{task}_nll", loss, 1.0, task)
