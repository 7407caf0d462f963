"""Frozen option sets: what the public ops pass to their autograd functions as one argument, and
the per-row math the backend epilogues compute (their contract, see
:mod:`unlearn_kernels.backends.torch_backend`).

The public functions validate every value once and build these; the autograd functions and the
epilogues only read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class CERowMath:
    """Per-row cross-entropy of an epilogue (``ce_forward``/``ce_backward``), with ``z`` the
    (softcapped) logits, ``c`` the class weights (all ones without them), ``C = Σ_v c_v``::

        nll_i = lse_i − z_{i,y}
        CE_i  = (1 − ε) c_y nll_i + (ε/V) Σ_v c_v (lse_i − z_iv)
        ℓ_i   = π_i (CE_i + c_y s lse_i²),  π_i = p_{i,y} (detached) with token scaling, else 1

    Every option at its default leaves ``ℓ_i = nll_i``.
    """

    softcap: float | None = None
    #: ε in [0, 1)
    label_smoothing: float = 0.0
    #: ``C = Σ_v c_v`` (``None`` without class weights; only read when ε > 0)
    class_weight_sum: float | None = None
    #: s of the z-loss ``s·lse²``
    lse_square_scale: float = 0.0
    token_scaling: bool = False
    #: also return each row's argmax of ``z`` (first index among ties)
    argmax: bool = False
    #: also return each row's z-loss part ``π_i c_y s lse_i²``
    z_loss: bool = False


class CERows(NamedTuple):
    """Per-row outputs of ``ce_forward``: ``loss`` ℓ_i (fp32; fp64 for fp64 logits), ``lse``
    (fp64), and when asked by :class:`CERowMath` the z-loss part (``loss``'s dtype) and the
    argmax (int64); ``None`` where not asked."""

    loss: Tensor
    lse: Tensor
    z_loss: Tensor | None
    argmax: Tensor | None


@dataclass(frozen=True)
class CEOptions:
    """Everything :class:`~unlearn_kernels.ops.cross_entropy.FusedLinearCrossEntropyFunction`
    needs besides its tensors."""

    math: CERowMath
    ignore_index: int
    reduction: str
    chunk_size: int | None
    backend: str
    #: ``"auto"``, ``"input"`` or ``"float32"``: see :mod:`unlearn_kernels.ops.chunking`
    logits_dtype: str = "auto"
    return_lse: bool = False
    return_token_accuracy: bool = False
    return_predicted_tokens: bool = False


@dataclass(frozen=True)
class KLRowMath:
    """Per-row divergence of the KL epilogues, with student ``q = softmax(z)``, reference
    ``p = softmax(z_ref)``, ``z = cap(x)/τ`` and ``z_ref = x_ref/τ`` (``cap(x_ref)/τ`` when
    ``softcap_ref``), ``cap(x) = c·tanh(x/c)`` (identity without softcap)::

        β = 0:      KL(p ‖ q)                                  (forward)
        β = 1:      KL(q ‖ p)                                  (reverse)
        0 < β < 1:  β KL(p ‖ m) + (1 − β) KL(q ‖ m),  m = βp + (1 − β)q   (generalised JSD)

    The top-k epilogues use ``temperature`` and ``softcap`` (student only) with β = 0.
    """

    temperature: float = 1.0
    softcap: float | None = None
    softcap_ref: bool = False
    beta: float = 0.0


@dataclass(frozen=True)
class KLOptions:
    """Everything the fused KL autograd functions need besides their tensors."""

    math: KLRowMath
    ignore_index: int
    reduction: str
    chunk_size: int | None
    backend: str
    #: ``"auto"``, ``"input"`` or ``"float32"``: see :mod:`unlearn_kernels.ops.chunking`
    logits_dtype: str = "auto"
    #: ``hidden.shape[0]``: the denominator of ``batchmean``
    batch: int = 1
