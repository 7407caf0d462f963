"""C++/OpenMP CPU epilogues from the extension ``unlearn_kernels._C`` (``csrc/``).

Same functions, signatures and results as :mod:`unlearn_kernels.backends.torch_backend` (the
readable specification): each sweeps one chunk of logits ``x`` (``[n, V]``, contiguous) once,
in parallel over rows, and, when asked for a gradient, overwrites ``x`` in place with it in
``x``'s dtype. fp32, bf16 and fp16 logits accumulate in fp32 (vectorised); fp64 logits (for
``gradcheck``) run in plain double. Argument errors raise ``ValueError``.

Softcap: ``z = c·tanh(x/c)`` and ``∂z/∂x = 1 − (z/c)²``; without softcap ``z = x``.
"""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)
from torch import Tensor

from unlearn_kernels import _C
from unlearn_kernels._options import CERowMath, CERows, KLRowMath


def _ce_options(math: CERowMath, class_weight: Tensor | None) -> tuple:
    """The trailing arguments of ``_C.ce_forward``/``_C.ce_backward`` for ``math``."""
    total = 0.0 if math.class_weight_sum is None else math.class_weight_sum
    return (
        math.softcap,
        class_weight,
        math.label_smoothing,
        total,
        math.lse_square_scale,
        math.token_scaling,
    )


def ce_forward(
    x: Tensor,
    target: Tensor,
    grad_scale: Tensor | None,
    math: CERowMath,
    class_weight: Tensor | None = None,
) -> CERows:
    """Per-row ``ℓ_i`` of :class:`~unlearn_kernels._options.CERowMath` (fp32; fp64 for fp64
    ``x``), ``lse(z_i)`` (fp64) and, when asked, the z-loss part and the argmax.

    ``target`` is int64 ``[n]`` in ``[0, V)``. With ``grad_scale`` ``a`` (``[n]``), ``x`` is
    overwritten by ``∂(a_i ℓ_i)/∂x_i``.
    """
    options = _ce_options(math, class_weight)
    return CERows(*_C.ce_forward(x, target, grad_scale, *options, math.argmax, math.z_loss))


def ce_backward(
    x: Tensor,
    target: Tensor,
    lse: Tensor,
    grad_scale: Tensor,
    math: CERowMath,
    class_weight: Tensor | None = None,
) -> None:
    """Recompute-mode backward: overwrite ``x`` with ``∂(a_i ℓ_i)/∂x_i`` from the fp64 ``lse``
    saved by :func:`ce_forward`; one pass over ``x``."""
    _C.ce_backward(x, target, lse, grad_scale, *_ce_options(math, class_weight))


# ---- NGDiff combine (csrc/ngdiff.cpp): same contracts as torch_backend.ngdiff_* ------------


def ngdiff_sums(forget: list[Tensor], retain: list[Tensor]) -> Tensor:
    """``[‖F‖², ‖R‖², ⟨F,R⟩]`` (float64 ``[3]``) over contiguous segments; the same bits for
    any thread count."""
    return _C.ngdiff_sums(forget, retain)


def ngdiff_write(
    forget: list[Tensor], retain: list[Tensor], out: list[Tensor], coef: Tensor
) -> None:
    """``out_j = a·R_j + b·F_j`` with ``[a, b] = coef`` (fp32 CPU); a zero coefficient drops its
    term."""
    _C.ngdiff_write(forget, retain, out, coef)


# ---- forward KL (csrc/kl.cpp): same contracts as torch_backend.kl_* ------------------------


def _f64(t: Tensor) -> Tensor:
    return t.double().contiguous()


def _kl_options(math: KLRowMath) -> tuple:
    """``(temperature, softcap, softcap_ref, beta)``: the trailing arguments of ``_C.kl_*``."""
    return float(math.temperature), math.softcap, math.softcap_ref, float(math.beta)


def kl_forward(
    x: Tensor, x_ref: Tensor, grad_scale: Tensor | None, math: KLRowMath
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row divergence of :class:`~unlearn_kernels._options.KLRowMath` (fp32; fp64 for fp64
    ``x``) and the fp64 ``(lse, lse_ref, centre)``; with ``grad_scale`` ``s``,
    ``x ← s ∂kl/∂x``."""
    scale = None if grad_scale is None else _f64(grad_scale)
    return _C.kl_forward(x, x_ref.to(x.dtype).contiguous(), scale, *_kl_options(math))


def kl_backward(
    x: Tensor,
    x_ref: Tensor,
    lse: Tensor,
    lse_ref: Tensor,
    centre: Tensor,
    grad_scale: Tensor,
    math: KLRowMath,
) -> None:
    """Recompute mode: ``x ← s ∂kl/∂x`` from the saved fp64 log-normalisers and centre."""
    x_ref = x_ref.to(x.dtype).contiguous()
    _C.kl_backward(
        x, x_ref, _f64(lse), _f64(lse_ref), _f64(centre), _f64(grad_scale), *_kl_options(math)
    )


def kl_topk_forward(
    x: Tensor,
    index: Tensor,
    logprob: Tensor,
    tail_logprob: Tensor,
    grad_scale: Tensor | None,
    math: KLRowMath,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row top-k KL and the fp64 ``(lse, lse_t)``; with ``grad_scale``, ``x`` is overwritten
    by the gradient. ``index`` int64 ``[n, k]``, distinct ids per row."""
    scale = None if grad_scale is None else _f64(grad_scale)
    index = index.long().contiguous()
    return _C.kl_topk_forward(
        x, index, _f64(logprob), _f64(tail_logprob), scale, *_kl_options(math)[:2]
    )


def kl_topk_backward(
    x: Tensor,
    index: Tensor,
    logprob: Tensor,
    tail_logprob: Tensor,
    lse: Tensor,
    lse_tail: Tensor,
    grad_scale: Tensor,
    math: KLRowMath,
) -> None:
    """Recompute mode: the top-k gradient over ``x`` from the saved fp64 ``lse``, ``lse_t``."""
    _C.kl_topk_backward(
        x,
        index.long().contiguous(),
        _f64(logprob),
        _f64(tail_logprob),
        _f64(lse),
        _f64(lse_tail),
        _f64(grad_scale),
        *_kl_options(math)[:2],
    )
