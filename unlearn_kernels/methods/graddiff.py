"""Gradient difference: ``L = −γ·NLL(forget) + α·NLL(retain)``, or with ``retain_loss: kl``
``−γ·NLL(forget) + α·KL(ref ‖ θ)`` on the retain set (the reference from the cache)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from unlearn_kernels.methods.base import Method, MethodParams, Needs
from unlearn_kernels.methods.registry import register


class GradDiffParams(MethodParams):
    name: Literal["graddiff"] = "graddiff"
    # γ = α = 1 and an NLL retain loss: open-unlearning's configs/trainer/GradDiff.yaml.
    gamma: float = Field(1.0, ge=0, description="weight γ of the forget ascent term")
    alpha: float = Field(1.0, ge=0, description="weight α of the retain term")
    retain_loss: Literal["nll", "kl"] = Field(
        "nll", description="retain term: NLL, or forward KL to the cached reference"
    )


@register
class GradDiff(Method):
    name = "graddiff"
    Params = GradDiffParams

    def needs(self) -> Needs:
        return Needs(retain=self.params.alpha > 0, retain_reference=self._kl)

    @property
    def _kl(self) -> bool:
        return self.params.retain_loss == "kl" and self.params.alpha > 0

    def terms(self, model, task, batch, totals):
        p = self.params
        if p.gamma:
            yield self.forget_ascent(model, batch, totals, p.gamma)
        if p.alpha:
            retain = self.retain_kl if self._kl else self.retain_nll
            yield retain(model, batch, totals, p.alpha)
