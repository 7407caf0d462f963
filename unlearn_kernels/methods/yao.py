"""Yao et al., "Large Language Model Unlearning":
``L = ε1·(−NLL(forget)) + ε2·NLL(forget prompts, random retain responses) + ε3·KL(ref ‖ θ)``
on the normal (retain) data, the forward KL with the reference first, read from the cache."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from unlearn_kernels.methods.base import Method, MethodParams, Needs, Term
from unlearn_kernels.methods.registry import register


class YaoParams(MethodParams):
    name: Literal["yao"] = "yao"
    # ε = (0.5, 1, 1): --bad_weight, --random_weight, --normal_weight defaults of the paper's
    # code (kevinyaobytedance/llm_unlearn, unlearn_harm.py).
    eps1: float = Field(0.5, ge=0, description="weight ε1 of the forget ascent term")
    eps2: float = Field(1.0, ge=0, description="weight ε2 of the random-mismatch NLL term")
    eps3: float = Field(1.0, ge=0, description="weight ε3 of the forward KL on normal data")


@register
class Yao(Method):
    name = "yao"
    Params = YaoParams

    def needs(self) -> Needs:
        p = self.params
        return Needs(
            retain=p.eps2 > 0 or p.eps3 > 0, mismatch=p.eps2 > 0, retain_reference=p.eps3 > 0
        )

    def terms(self, model, task, batch, totals):
        p = self.params
        if p.eps1:
            yield self.forget_ascent(model, batch, totals, p.eps1)
        if p.eps2:
            loss = self.losses.nll(model, batch.mismatch, p.eps2 / totals.mismatch_tokens)
            yield Term("mismatch_nll", loss, p.eps2)
        if p.eps3:
            yield self.retain_kl(model, batch, totals, p.eps3)
