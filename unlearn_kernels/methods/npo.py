"""NPO (Zhang et al., "Negative Preference Optimization"): per forget example
``r_s = log π_θ(y_s|x_s) − log π_ref(y_s|x_s)`` (the reference log-likelihood from the cache),
``L = γ·(2/β)·mean_s log(1 + exp(β·r_s)) + α·NLL(retain)``."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from unlearn_kernels.methods.base import Method, MethodParams, Needs, Term
from unlearn_kernels.methods.registry import register


class NPOParams(MethodParams):
    name: Literal["npo"] = "npo"
    # β = 0.1 (the NPO paper's TOFU setting), γ = α = 1 with an NLL retain term: open-unlearning's
    # configs/trainer/NPO.yaml.
    beta: float = Field(0.1, gt=0, description="inverse temperature β")
    gamma: float = Field(1.0, gt=0, description="weight γ of the NPO forget term")
    alpha: float = Field(1.0, ge=0, description="weight α of the retain NLL term")


@register
class NPO(Method):
    name = "npo"
    Params = NPOParams

    def needs(self) -> Needs:
        return Needs(retain=self.params.alpha > 0, forget_logprob=True)

    def terms(self, model, task, batch, totals):
        p = self.params
        ref_logprob = batch.forget.reference.sequence_logprob()
        log_ratio = -self.losses.sequence_nll(model, batch.forget) - ref_logprob.to(
            batch.forget.labels.device
        )
        npo = (2.0 / p.beta) * F.softplus(p.beta * log_ratio).sum() / totals.forget_sequences
        yield Term("npo", p.gamma * npo, p.gamma)
        if p.alpha:
            yield self.retain_nll(model, batch, totals, p.alpha)
