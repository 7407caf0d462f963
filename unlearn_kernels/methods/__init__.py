"""Unlearning methods: small objectives over the fused response-only losses.

=========== =================================================================================
``ga``      ``−NLL(forget)``
``graddiff`` ``−γ·NLL(forget) + α·NLL(retain)`` (or ``+ α·KL(ref‖θ)`` with ``retain_loss: kl``)
``kl``      ``−γ·NLL(forget) + α·KL(ref‖θ)`` on retain
``yao``     ``ε1·(−NLL(forget)) + ε2·NLL(forget prompts, random retain answers) + ε3·KL(ref‖θ)``
``ngdiff``  tasks ``NLL(forget)``, ``NLL(retain)``; step along ``g_R/‖g_R‖ − g_F/‖g_F‖``, GeN
``npo``     ``γ·(2/β)·mean_s log(1 + exp(β·(log π_θ − log π_ref)(y_s|x_s))) + α·NLL(retain)``
``simnpo``  ``−γ·(2/β)·mean_s log σ(−(β/|y_s|)·log π_θ(y_s|x_s) − δ) + α·NLL(retain)``
=========== =================================================================================

``NLL(S)`` is the mean per-token cross-entropy over the response tokens of ``S``; the KL is
the forward ``KL(p_ref ‖ p_θ)`` per response token, the reference read from a cache.
"""

from unlearn_kernels.methods import ga, graddiff, kl, ngdiff, npo, simnpo, yao  # noqa: F401
from unlearn_kernels.methods.base import (
    LogitLosses,
    Method,
    MethodParams,
    Needs,
    ResponseLosses,
    Term,
)
from unlearn_kernels.methods.registry import METHODS, get_method, register

__all__ = [
    "METHODS",
    "LogitLosses",
    "Method",
    "MethodParams",
    "Needs",
    "ResponseLosses",
    "Term",
    "get_method",
    "register",
]
