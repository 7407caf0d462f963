"""KL minimisation: ``L = −γ·NLL(forget) + α·KL(ref ‖ θ)`` over the retain responses, the
reference's distribution read from the cache (hidden states: exact; top-k: compressed)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from unlearn_kernels.methods.base import Method, MethodParams, Needs
from unlearn_kernels.methods.registry import register


class KLParams(MethodParams):
    name: Literal["kl"] = "kl"
    # γ = α = 1: the KL baseline of TOFU (Maini et al., 2024) weighs both terms equally.
    gamma: float = Field(1.0, ge=0, description="weight γ of the forget ascent term")
    alpha: float = Field(1.0, gt=0, description="weight α of the retain KL term")


@register
class KL(Method):
    name = "kl"
    Params = KLParams

    def needs(self) -> Needs:
        return Needs(retain_reference=True)

    def terms(self, model, task, batch, totals):
        if self.params.gamma:
            yield self.forget_ascent(model, batch, totals, self.params.gamma)
        yield self.retain_kl(model, batch, totals, self.params.alpha)
