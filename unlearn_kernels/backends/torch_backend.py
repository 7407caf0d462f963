"""Readable PyTorch epilogues: the specification every other backend follows.

An epilogue receives one chunk of raw logits ``x`` (``[n, V]``, contiguous, any float
dtype) produced by the chunk driver and finishes the loss on it in fp32 (fp64 for fp64 input, so
``gradcheck`` can run). When asked for a
gradient it overwrites ``x`` in place with ``∂loss/∂x`` (in ``x``'s dtype), so the driver can
project it back without a second ``[n, V]`` buffer.

The contract, the same in every backend (``cpu_backend``, ``triton_backend``):

* ``ce_forward(x, target, grad_scale, math, class_weight=None) -> CERows`` and
  ``ce_backward(x, target, lse, grad_scale, math, class_weight=None)``, with the per-row
  options of :class:`~unlearn_kernels._options.CERowMath` (softcap, label smoothing, the sum of
  the class weights, the z-loss scale, token scaling, and whether to return the argmax and the
  z-loss part) and ``class_weight`` ``[V]`` or ``None``; ``CERows`` is
  ``(loss, lse fp64, z_loss or None, argmax int64 or None)``.
* ``kl_forward(x, x_ref, grad_scale, math) -> (kl, lse, lse_ref, centre)`` and
  ``kl_backward(x, x_ref, lse, lse_ref, centre, grad_scale, math)`` with
  :class:`~unlearn_kernels._options.KLRowMath` (temperature, softcap of the student and, with
  ``softcap_ref``, of the reference, β of the divergence); ``centre`` is the fp64 per-row
  constant of the reverse-KL/JSD gradient (0 for the forward KL).
* ``kl_topk_forward(x, index, logprob, tail_logprob, grad_scale, math) -> (kl, lse, lse_t)``
  and ``kl_topk_backward(x, index, logprob, tail_logprob, lse, lse_t, grad_scale, math)``
  (temperature and student softcap of ``math``).

``grad_scale`` is the row scale ``s_i`` (token weight × reduction, or × the upstream gradient in
recompute mode); ``None`` asks for no gradient. Every option is computed in the same sweep over
the row; options that are off must cost nothing (a backend selects a kernel flavour without
them). Softcap: ``z = c·tanh(x/c)`` and ``∂z/∂x = 1 − (z/c)²``; without softcap ``z = x``.
"""

from __future__ import annotations

from math import log, log1p

import torch
from torch import Tensor

from unlearn_kernels._options import CERowMath, CERows, KLRowMath


def _softcapped(x: Tensor, softcap: float | None) -> Tensor:
    z = x.to(torch.promote_types(x.dtype, torch.float32))
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def _write_grad(x: Tensor, grad_z: Tensor, z: Tensor, softcap: float | None) -> None:
    if softcap is not None:
        grad_z = grad_z * (1.0 - (z / softcap).square())
    x.copy_(grad_z)


def split_lse(lse: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``lse = hi + lo`` with ``hi, lo`` in ``dtype``: ``z − hi`` is exact near the maximum, so
    ``exp((z − hi) − lo)`` keeps full precision even for logits of order 1e4."""
    hi = lse.to(dtype)
    return hi, (lse - hi.to(lse.dtype)).to(dtype)


# ---- cross-entropy (fused_linear_cross_entropy) ------------------------------------------
#
# Per row (CERowMath): c the class weights (ones without them), C = Σ_v c_v, V the vocabulary,
#   nll = lse − z_y,  CE = (1 − ε) c_y nll + (ε/V) Σ_v c_v (lse − z_v),  Z = c_y s lse²,
#   π = p_y (detached) with token scaling, else 1;   ℓ = π (CE + Z).
# The smoothing sum is formed as C·nll − Σ_v c_v (z_v − z_y): both parts stay small when the
# logits are large but close together. With row scale a, the logit gradient is
#   ∂(a ℓ)/∂z_v = aπ (P p_v − (ε/V) c_v − [v = y] (1 − ε) c_y),
#   P = (1 − ε) c_y + εC/V + 2 s c_y lse,
# times the softcap derivative. Every option at its default gives ℓ = nll, P = 1.


def has_loss_options(math: CERowMath) -> bool:
    """Whether ``ℓ`` differs from ``nll`` for some row (class weights aside)."""
    return math.label_smoothing > 0 or math.lse_square_scale != 0 or math.token_scaling


def _class_weight_at(target: Tensor, class_weight: Tensor | None, like: Tensor) -> Tensor | float:
    return 1.0 if class_weight is None else class_weight.to(like.dtype)[target]


def _ce_row_loss(
    z: Tensor,
    target: Tensor,
    nll: Tensor,
    lse: Tensor,
    math: CERowMath,
    class_weight: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """``(ℓ, π Z)`` per row from ``nll`` (``z``'s dtype) and the fp64 ``lse``."""
    if class_weight is None and not has_loss_options(math):
        return nll, (torch.zeros_like(nll) if math.z_loss else None)
    nll64 = nll.double()
    c_y = _class_weight_at(target, class_weight, nll64)
    loss = c_y * nll64
    eps = math.label_smoothing
    if eps > 0:
        vocab = z.shape[1]
        total = vocab if math.class_weight_sum is None else math.class_weight_sum
        c = 1.0 if class_weight is None else class_weight.to(z.dtype)[None, :]
        z_y = z.gather(1, target[:, None])
        spread = ((z - z_y) * c).sum(dim=1, dtype=torch.float64)
        loss = (1.0 - eps) * loss + (eps / vocab) * (total * nll64 - spread)
    z_part = c_y * math.lse_square_scale * lse.square()
    if math.token_scaling:
        pi = torch.exp(-nll64)
        loss, z_part = loss * pi, z_part * pi
    loss = loss + z_part
    return loss.to(nll.dtype), (z_part.to(nll.dtype) if math.z_loss else None)


def _ce_grad(
    z: Tensor,
    target: Tensor,
    shift: Tensor,
    log_sum: Tensor,
    scale: Tensor,
    nll: Tensor,
    lse: Tensor,
    math: CERowMath,
    class_weight: Tensor | None,
) -> Tensor:
    """``aπ (P softmax(z) − (ε/V) c − (1 − ε) c_y e_y)`` with ``softmax = exp((z − shift) −
    log_sum)``, ``a = scale``, the row's fp64 ``nll``, ``lse`` (see the block comment)."""
    rows = torch.arange(z.shape[0], device=z.device)
    grad = torch.exp((z - shift[:, None]) - log_sum[:, None])
    p_y = grad[rows, target].double()
    eps, vocab = math.label_smoothing, z.shape[1]
    total = vocab if math.class_weight_sum is None else math.class_weight_sum
    c_y = _class_weight_at(target, class_weight, lse)
    a = scale.double()
    if math.token_scaling:
        a = a * torch.exp(-nll)
    big_p = (1.0 - eps) * c_y + eps * total / vocab + 2.0 * math.lse_square_scale * c_y * lse
    grad.mul_((a * big_p).to(z.dtype)[:, None])
    if eps > 0:
        c = 1.0 if class_weight is None else class_weight.to(z.dtype)[None, :]
        grad.sub_((a * (eps / vocab)).to(z.dtype)[:, None] * c)
    c_y_eps = (1.0 - eps + eps / vocab) * c_y
    grad[rows, target] = (a * (big_p * p_y - c_y_eps)).to(z.dtype)
    return grad


def ce_forward(
    x: Tensor,
    target: Tensor,
    grad_scale: Tensor | None,
    math: CERowMath,
    class_weight: Tensor | None = None,
) -> CERows:
    """Per-row ``ℓ_i`` (:class:`~unlearn_kernels._options.CERowMath`; fp32, fp64 for fp64
    input), ``lse(z_i)`` (always fp64, so that :func:`ce_backward` can rebuild the softmax
    exactly) and, when asked, the z-loss part and the argmax.

    ``class_weight`` is ``[V]`` (or ``None``). With ``grad_scale`` ``a`` (``[n]``, the
    accumulation dtype), ``x`` is overwritten by ``∂(a_i ℓ_i)/∂x_i``.
    """
    z = _softcapped(x, math.softcap)
    row_max = z.amax(dim=1)
    log_sum = torch.log(torch.exp(z - row_max[:, None]).sum(dim=1))
    nll = (row_max - z.gather(1, target[:, None]).squeeze(1)) + log_sum
    lse = row_max.double() + log_sum.double()
    loss, z_part = _ce_row_loss(z, target, nll, lse, math, class_weight)
    argmax = z.argmax(dim=1) if math.argmax else None
    if grad_scale is not None:
        grad = _ce_grad(
            z, target, row_max, log_sum, grad_scale, nll.double(), lse, math, class_weight
        )
        _write_grad(x, grad, z, math.softcap)
    return CERows(loss, lse, z_part, argmax)


def ce_backward(
    x: Tensor,
    target: Tensor,
    lse: Tensor,
    grad_scale: Tensor,
    math: CERowMath,
    class_weight: Tensor | None = None,
) -> None:
    """Recompute-mode backward: overwrite ``x`` with the gradient of :func:`ce_forward`, using
    the saved fp64 ``lse``."""
    z = _softcapped(x, math.softcap)
    hi, lo = split_lse(lse, z.dtype)
    nll = lse - z.gather(1, target[:, None]).squeeze(1).double()
    grad = _ce_grad(z, target, hi, lo, grad_scale, nll, lse, math, class_weight)
    _write_grad(x, grad, z, math.softcap)


# ---- divergences to a reference (fused_linear_kl, fused_linear_kl_topk) -------------------
#
# Logits (KLRowMath): y = cap(x) (x without softcap), z = y/τ; the reference likewise, capped only
# with softcap_ref. Gradients are with respect to z, times ∂z/∂x = (1 − (y/c)²)/τ.
#
# Zero-probability rule, shared by every backend: a reference entry with p = 0 (log p = −inf,
# or p underflowing to 0) contributes 0 to the forward KL and q/τ·s to its gradient, whatever q
# is; p > 0 against q = 0 gives +inf. The same holds for the top-k tail: p_t = 0 (log p_t = −inf)
# contributes 0, and an empty student tail (q_t = 0, e.g. k = V) with p_t > 0 gives +inf.
# Reverse KL: q = 0 contributes 0, p = 0 against q > 0 gives +inf. The JSD is finite whenever
# one of p, q is positive (m > 0 then).
#
# Undefined reference rule, shared by every backend: a reference row that is no distribution
# gets a NaN loss and an all-NaN gradient row, whatever the divergence. Exact: its
# log-normaliser lse_ref is not finite (a NaN or +inf logit, or every logit −inf). Top-k: its
# mass P = Σ_K p_k + p_t (in fp64) is not finite (a NaN or +inf in log p_k or log p_t).
#
# Per row, with d_v = log q_v − log p_v:
#   β = 0:  KL = Σ p (−d),        ∂/∂z = q − p
#   β = 1:  KL = K = Σ q d,       ∂/∂z = q (d − K)
#   else:   JSD = Σ β p (log p − log m) + (1 − β) q (log q − log m),
#           K = Σ q (log q − log m),  ∂/∂z = (1 − β) q (log q − log m − K)
# where log m − log p and log m − log q come from one log1p of d (see _jsd_logs). K is the
# row's "centre", saved for the recompute-mode backward (0 for β = 0, which needs none).


def _kl_logits(x: Tensor, math: KLRowMath, capped: bool = True) -> tuple[Tensor, Tensor]:
    """``(y, z)``: ``y = cap(x)`` (``x`` uncapped or without softcap) in fp32 (fp64 for fp64
    input) and ``z = y/τ``."""
    y = _softcapped(x, math.softcap if capped else None)
    return y, y / math.temperature


def _kl_chain(grad_z: Tensor, y: Tensor, coef: Tensor, math: KLRowMath) -> Tensor:
    """``coef_i · grad_z · ∂z/∂x`` (``coef = s`` the row scale)."""
    grad = grad_z.mul_((coef / math.temperature).to(grad_z.dtype)[:, None])
    if math.softcap is not None:
        grad = grad * (1.0 - (y / math.softcap).square())
    return grad


def _log_normaliser(z: Tensor) -> Tensor:
    """Row-wise ``log Σ_v exp(z_v)`` in fp64, as ``max + log Σ exp(z − max)`` with the sum
    accumulated in fp64 (−inf for an all −inf row)."""
    row_max = z.amax(dim=1)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return shift.double() + torch.exp(z - shift[:, None]).sum(dim=1, dtype=torch.float64).log()


def _shifted(z: Tensor, value: Tensor) -> Tensor:
    """``z − value`` for fp64 per-row ``value``: ``z − hi − lo`` with ``value = hi + lo`` (see
    :func:`split_lse`), exact near the maximum even for logits of order 1e4; ±inf stay ±inf."""
    hi, lo = split_lse(value, z.dtype)
    lo = torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))
    return (z - hi[:, None]) - lo[:, None]


def _p_times(log_p: Tensor, d: Tensor) -> Tensor:
    """``p · d`` elementwise with ``p = exp(log_p)``, and 0 where ``p = 0`` (whatever ``d``)."""
    p = torch.exp(log_p)
    return torch.where(p > 0, p * d, torch.zeros_like(p))


def _undefined_to_nan(values: Tensor, undefined: Tensor) -> Tensor:
    """``values`` (per row ``[n]`` or ``[n, V]``) with the undefined reference rows set to NaN."""
    mask = undefined if values.dim() == 1 else undefined[:, None]
    return values.masked_fill(mask, float("nan"))


def _jsd_logs(d: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(log p − log m, log q − log m)`` from ``d = log q − log p``, ``m = βp + (1 − β)q``:
    ``log m − log p = logaddexp(log β, log(1 − β) + d)`` and ``log m − log q`` the same minus
    ``d``, sharing ``log1p(e^{−|Δ|})``, ``Δ = log(1 − β) + d − log β`` (d = +inf, i.e. p = 0,
    gives (−inf, −log(1 − β)) without inf − inf)."""
    lb, l1b = log(beta), log1p(-beta)
    shared = torch.log1p(torch.exp(-(l1b - lb + d).abs()))
    log_p_m = -(torch.clamp(d + l1b, min=lb) + shared)
    log_q_m = -(torch.clamp(lb - d, min=l1b) + shared)
    return log_p_m, log_q_m


def _divergence(
    z: Tensor, z_ref: Tensor, lse: Tensor, lse_ref: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per-row divergence (``z``'s dtype) and centre ``K`` (fp64); see the block comment."""
    log_q, log_p = _shifted(z, lse), _shifted(z_ref, lse_ref)
    # log q − log p as (z − z_ref) − (lse − lse_ref): both small when p ≈ q.
    d = (z - z_ref) + (lse_ref - lse).to(z.dtype)[:, None]
    if beta == 0.0:
        return _p_times(log_p, -d).sum(1), torch.zeros_like(lse)
    if beta == 1.0:
        centre = _p_times(log_q, d).sum(1, dtype=torch.float64)
        return centre.to(z.dtype), centre
    log_p_m, log_q_m = _jsd_logs(d, beta)
    q_part = _p_times(log_q, log_q_m)
    loss = (beta * _p_times(log_p, log_p_m) + (1.0 - beta) * q_part).sum(1)
    return loss, q_part.sum(1, dtype=torch.float64)


def _divergence_grad(
    z: Tensor, z_ref: Tensor, lse: Tensor, lse_ref: Tensor, centre: Tensor, beta: float
) -> Tensor:
    """``∂(divergence)/∂z`` from the fp64 log-normalisers and centre."""
    log_q, log_p = _shifted(z, lse), _shifted(z_ref, lse_ref)
    q = torch.exp(log_q)
    if beta == 0.0:
        return q - torch.exp(log_p)
    d = (z - z_ref) + (lse_ref - lse).to(z.dtype)[:, None]
    k = centre.to(z.dtype)[:, None]
    if beta == 1.0:
        return _p_times(log_q, d - k)
    return (1.0 - beta) * _p_times(log_q, _jsd_logs(d, beta)[1] - k)


def kl_forward(
    x: Tensor, x_ref: Tensor, grad_scale: Tensor | None, math: KLRowMath
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row divergence of :class:`~unlearn_kernels._options.KLRowMath` between
    ``q = softmax(z)`` and ``p = softmax(z_ref)`` in fp32 (fp64 for fp64 input), the fp64
    log-normalisers ``lse = log Σ e^z``, ``lse_ref = log Σ e^{z_ref}`` and the fp64 centre:
    ``(kl, lse, lse_ref, centre)``.

    With ``grad_scale`` ``s``, ``x`` is overwritten by ``s_i ∂kl_i/∂x_i``; ``x_ref`` is only
    read.
    """
    y, z = _kl_logits(x, math)
    z_ref = _kl_logits(x_ref, math, math.softcap_ref)[1]
    lse, lse_ref = _log_normaliser(z), _log_normaliser(z_ref)
    kl, centre = _divergence(z, z_ref, lse, lse_ref, math.beta)
    undefined = ~torch.isfinite(lse_ref)
    if grad_scale is not None:
        grad = _divergence_grad(z, z_ref, lse, lse_ref, centre, math.beta)
        x.copy_(_undefined_to_nan(_kl_chain(grad, y, grad_scale, math), undefined))
    return _undefined_to_nan(kl, undefined), lse, lse_ref, centre


def kl_backward(
    x: Tensor,
    x_ref: Tensor,
    lse: Tensor,
    lse_ref: Tensor,
    centre: Tensor,
    grad_scale: Tensor,
    math: KLRowMath,
) -> None:
    """Recompute-mode backward: overwrite ``x`` with ``s_i ∂kl_i/∂x_i`` from the saved fp64
    log-normalisers and centre."""
    y, z = _kl_logits(x, math)
    z_ref = _kl_logits(x_ref, math, math.softcap_ref)[1]
    grad = _divergence_grad(z, z_ref, lse, lse_ref, centre, math.beta)
    x.copy_(_undefined_to_nan(_kl_chain(grad, y, grad_scale, math), ~torch.isfinite(lse_ref)))


def _reference_mass(logprob: Tensor, tail_logprob: Tensor) -> Tensor:
    """``P = Σ_K p_k + p_t`` per row, in fp64."""
    return torch.exp(logprob.double()).sum(1) + torch.exp(tail_logprob.double())


def _topk_grad(
    z: Tensor,
    index: Tensor,
    logprob: Tensor,
    tail_logprob: Tensor,
    lse: Tensor,
    lse_tail: Tensor,
) -> Tensor:
    """``∂KL̃_i/∂z_i``: ``P q_v − p_v`` on the top-k, ``P q_v − p_t q_v / q_t`` off it, where
    ``P = Σ_K p_k + p_t`` (1 for a consistent cache) and ``q_v / q_t = exp(z_v − lse_t)``;
    NaN on rows whose ``P`` is not finite.
    """
    mass = _reference_mass(logprob, tail_logprob)
    total = mass.to(z.dtype)
    # p_t q_v / q_t = exp(z_v − (lse_t − log p_t)); no tail term when p_t = 0 or the student's
    # tail is empty (lse_t = −inf).
    tail_lt = tail_logprob.double()
    no_tail = (tail_lt == float("-inf")) | (lse_tail == float("-inf"))
    tail_shift = torch.where(no_tail, torch.full_like(tail_lt, float("inf")), lse_tail - tail_lt)
    log_q = _shifted(z, lse)
    grad = total[:, None] * torch.exp(log_q) - torch.exp(_shifted(z, tail_shift))
    on_k = total[:, None] * torch.exp(log_q.gather(1, index)) - torch.exp(logprob)
    return _undefined_to_nan(grad.scatter_(1, index, on_k), ~torch.isfinite(mass))


def kl_topk_forward(
    x: Tensor,
    index: Tensor,
    logprob: Tensor,
    tail_logprob: Tensor,
    grad_scale: Tensor | None,
    math: KLRowMath,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row top-k KL ``Σ_{k∈K} p_k log(p_k/q_k) + p_t log(p_t/q_t)``, ``q = softmax(z)``,
    ``q_t = Σ_{v∉K} q_v`` (summed directly, never as ``1 − Σ_K q_k``), in fp32 (fp64), and the
    fp64 ``lse = log Σ_v e^{z_v}``, ``lse_t = log Σ_{v∉K} e^{z_v}`` (−inf for an empty tail):
    ``(kl, lse, lse_t)``. ``math``: temperature and softcap (β = 0).

    ``index`` int64 ``[n, k]`` (distinct per row), ``logprob`` ``[n, k]`` = log p_k,
    ``tail_logprob`` ``[n]`` = log p_t. With ``grad_scale`` ``s``, ``x`` is overwritten by
    ``s_i ·`` the gradient of :func:`_topk_grad` times ``∂z/∂x``.
    """
    y, z = _kl_logits(x, math)
    lp, lt = logprob.to(z.dtype), tail_logprob.to(z.dtype)
    in_k = torch.zeros_like(z, dtype=torch.bool).scatter_(1, index, True)
    lse = _log_normaliser(z)
    lse_tail = _log_normaliser(z.masked_fill(in_k, float("-inf")))
    # k + 1 terms per row, in fp64: log q_k = z_k − lse, log q_t = lse_t − lse.
    lp64, lt64 = lp.double(), lt.double()
    kl = _p_times(lp64, lp64 - (z.gather(1, index).double() - lse[:, None])).sum(1)
    kl = (kl + _p_times(lt64, lt64 - (lse_tail - lse))).to(z.dtype)
    kl = _undefined_to_nan(kl, ~torch.isfinite(_reference_mass(lp64, lt64)))
    if grad_scale is not None:
        grad = _topk_grad(z, index, lp, lt, lse, lse_tail)
        x.copy_(_kl_chain(grad, y, grad_scale, math))
    return kl, lse, lse_tail


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
    """Recompute-mode backward of :func:`kl_topk_forward` from the saved ``lse``/``lse_t``."""
    y, z = _kl_logits(x, math)
    lp, lt = logprob.to(z.dtype), tail_logprob.to(z.dtype)
    grad = _topk_grad(z, index, lp, lt, lse, lse_tail)
    x.copy_(_kl_chain(grad, y, grad_scale, math))


# ------------------------------------------------------------------------------------------
# NGDiff combine (unlearn_kernels.ops.ngdiff): segments are contiguous tensors, F_j and R_j
# of one dtype and size; every backend computes the same two sweeps.
# ------------------------------------------------------------------------------------------


#: A segment whose max |x| lies in (0, TINY) is scaled before squaring (fp32 squares of its
#: elements would underflow: a nonzero gradient would read as norm 0).
TINY = 2.0**-40


def tiny_scale(x: Tensor) -> Tensor:
    """fp32 ``2^-e`` (at most ``2^126``) with ``e`` the ``frexp`` exponent of ``m = max |x|``,
    which brings ``m`` into ``[0.5, 1)``, when ``0 < m < TINY``; else 1. A power of two, so
    scaling and unscaling are exact."""
    m = x.abs().amax()
    scale = torch.ldexp(torch.ones_like(m), (-torch.frexp(m).exponent).clamp_max(126))
    return torch.where((m > 0) & (m < TINY), scale, torch.ones_like(m))


def ngdiff_sums(forget: list[Tensor], retain: list[Tensor]) -> Tensor:
    """``[‖F‖², ‖R‖², ⟨F,R⟩]`` as float64 ``[3]``: fp32 dot products per segment, summed in
    float64 in segment order. A tiny segment is scaled by :func:`tiny_scale` before squaring
    and its dot products unscaled in float64."""
    parts = []
    for f, r in zip(forget, retain, strict=True):
        f32, r32 = f.float().reshape(-1), r.float().reshape(-1)
        sf, sr = tiny_scale(f32), tiny_scale(r32)
        f32, r32 = f32 * sf, r32 * sr
        dots = torch.stack([torch.dot(f32, f32), torch.dot(r32, r32), torch.dot(f32, r32)])
        sf, sr = sf.double(), sr.double()
        parts.append(dots.double() / torch.stack([sf * sf, sr * sr, sf * sr]))
    return torch.stack(parts).sum(0)


def ngdiff_write(
    forget: list[Tensor], retain: list[Tensor], out: list[Tensor], coef: Tensor
) -> None:
    """``out_j = a·R_j + b·F_j`` in fp32 with ``[a, b] = coef``; a zero coefficient drops its
    term (so a non-finite gradient with coefficient 0 never reaches ``out``)."""
    a, b = coef[0], coef[1]
    for f, r, o in zip(forget, retain, out, strict=True):
        term_r = torch.where(a != 0, a * r.float(), 0.0)
        term_f = torch.where(b != 0, b * f.float(), 0.0)
        o.copy_(term_r + term_f)
