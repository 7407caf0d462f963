"""Gradient ascent (GA): ``L = −NLL(forget)``, one fused call with token weights ``−1/|forget|``."""

from __future__ import annotations

from typing import Literal

from unlearn_kernels.methods.base import Method, MethodParams, Needs
from unlearn_kernels.methods.registry import register


class GAParams(MethodParams):
    name: Literal["ga"] = "ga"


@register
class GA(Method):
    name = "ga"
    Params = GAParams

    def needs(self) -> Needs:
        return Needs(retain=False)

    def terms(self, model, task, batch, totals):
        yield self.forget_ascent(model, batch, totals, 1.0)
