"""SimNPO (Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning"): reference-free, length-normalised,
``L = γ·(−(2/β)·mean_s log σ(−(β/|y_s|)·log π_θ(y_s|x_s) − δ)) + α·NLL(retain)``."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from unlearn_kernels.data.unlearn import IGNORE_INDEX
from unlearn_kernels.methods.base import Method, MethodParams, Needs, Term
from unlearn_kernels.methods.registry import register


class SimNPOParams(MethodParams):
    name: Literal["simnpo"] = "simnpo"
    # β = 2.5, margin 0, forget weight 0.1375, retain weight 1: the SimNPO authors' TOFU
    # configuration (OPTML-Group/Unlearn-Simple, TOFU/config/forget.yaml: beta, gamma,
    # npo_coeff, grad_diff_coeff).
    beta: float = Field(2.5, gt=0, description="inverse temperature β")
    delta: float = Field(0.0, description="reward margin δ (the paper's γ)")
    gamma: float = Field(0.1375, gt=0, description="weight γ of the SimNPO forget term")
    alpha: float = Field(1.0, ge=0, description="weight α of the retain NLL term")


@register
class SimNPO(Method):
    name = "simnpo"
    Params = SimNPOParams

    def needs(self) -> Needs:
        return Needs(retain=self.params.alpha > 0)

    def terms(self, model, task, batch, totals):
        p = self.params
        lengths = (batch.forget.labels != IGNORE_INDEX).sum(1)
        mean_nll = self.losses.sequence_nll(model, batch.forget) / lengths
        simnpo = -(2.0 / p.beta) * F.logsigmoid(p.beta * mean_nll - p.delta).sum()
        yield Term("simnpo", p.gamma * simnpo / totals.forget_sequences, p.gamma)
        if p.alpha:
            yield self.retain_nll(model, batch, totals, p.alpha)
