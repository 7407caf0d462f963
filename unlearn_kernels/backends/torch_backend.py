"""Readable PyTorch epilogues: the specification every other backend follows.

An epilogue receives one chunk of raw logits ``x`` (``[n, V]``, contiguous, any float
dtype) produced by the chunk driver and finishes the loss on it in fp32 (fp64 for fp64 input, so
``gradcheck`` can run). When asked for a
gradient it overwrites ``x`` in place with ``∂loss/∂x`` (in ``x``'s dtype), so the driver can
project it back without a second ``[n, V]`` buffer.

Softcap: ``z = c·tanh(x/c)`` and ``∂z/∂x = 1 − (z/c)²``; without softcap ``z = x``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _softcapped(x: Tensor, softcap: float | None) -> Tensor:
    z = x.to(torch.promote_types(x.dtype, torch.float32))
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def _write_grad(x: Tensor, grad_z: Tensor, z: Tensor, softcap: float | None) -> None:
    if softcap is not None:
        grad_z = grad_z * (1.0 - (z / softcap).square())
    x.copy_(grad_z)


def _ce_grad(z: Tensor, target: Tensor, shift: Tensor, log_sum: Tensor, scale: Tensor) -> Tensor:
    """``s_i · (softmax(z_i) − e_{y_i})`` with ``softmax = exp((z − shift) − log_sum)``."""
    grad = torch.exp((z - shift[:, None]) - log_sum[:, None])
    grad[torch.arange(z.shape[0], device=z.device), target] -= 1.0
    return grad.mul_(scale[:, None])


def split_lse(lse: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``lse = hi + lo`` with ``hi, lo`` in ``dtype``: ``z − hi`` is exact near the maximum, so
    ``exp((z − hi) − lo)`` keeps full precision even for logits of order 1e4."""
    hi = lse.to(dtype)
    return hi, (lse - hi.to(lse.dtype)).to(dtype)


def ce_forward(
    x: Tensor, target: Tensor, grad_scale: Tensor | None, softcap: float | None
) -> tuple[Tensor, Tensor]:
    """Per-row ``ℓ_i = lse(z_i) − z_{i,y_i}`` (fp32, fp64 for fp64 input) and ``lse(z_i)``
    (always fp64, so that :func:`ce_backward` can rebuild the softmax exactly).

    With ``grad_scale`` (``[n]``, the accumulation dtype), ``x`` is overwritten by
    ``s_i (softmax(z_i) − e_{y_i})`` times the softcap derivative.
    """
    z = _softcapped(x, softcap)
    row_max = z.amax(dim=1)
    log_sum = torch.log(torch.exp(z - row_max[:, None]).sum(dim=1))
    loss = (row_max - z.gather(1, target[:, None]).squeeze(1)) + log_sum
    if grad_scale is not None:
        _write_grad(x, _ce_grad(z, target, row_max, log_sum, grad_scale), z, softcap)
    return loss, row_max.double() + log_sum.double()


def ce_backward(
    x: Tensor, target: Tensor, lse: Tensor, grad_scale: Tensor, softcap: float | None
) -> None:
    """Recompute-mode backward: overwrite ``x`` with the gradient, using the saved fp64 ``lse``."""
    z = _softcapped(x, softcap)
    hi, lo = split_lse(lse, z.dtype)
    _write_grad(x, _ce_grad(z, target, hi, lo, grad_scale), z, softcap)


# ---- forward KL to a reference (fused_linear_kl, fused_linear_kl_topk) --------------------
#
# Zero-probability rule, shared by every backend: a reference entry with p = 0 (log p = −inf,
# or p underflowing to 0) contributes 0 to the loss and q/τ·s to the gradient, whatever q is;
# p > 0 against q = 0 gives +inf. The same holds for the top-k tail: p_t = 0 (log p_t = −inf)
# contributes 0, and an empty student tail (q_t = 0, e.g. k = V) with p_t > 0 gives +inf.
#
# Undefined reference rule, shared by every backend: a reference row that is no distribution
# gets a NaN loss and an all-NaN gradient row. Exact: its log-normaliser lse_ref is not finite
# (a NaN or +inf logit, or every logit −inf). Top-k: its mass P = Σ_K p_k + p_t (in fp64) is
# not finite (a NaN or +inf in log p_k or log p_t).


def _accumulated(x: Tensor, temperature: float) -> Tensor:
    """``z = x / τ`` in fp32 (fp64 for fp64 input)."""
    return x.to(torch.promote_types(x.dtype, torch.float32)) / temperature


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


def _kl_grad(log_q: Tensor, log_p: Tensor, coef: Tensor) -> Tensor:
    """``coef_i (q − p)``."""
    return (torch.exp(log_q) - torch.exp(log_p)).mul_(coef[:, None])


def _undefined_to_nan(values: Tensor, undefined: Tensor) -> Tensor:
    """``values`` (per row ``[n]`` or ``[n, V]``) with the undefined reference rows set to NaN."""
    mask = undefined if values.dim() == 1 else undefined[:, None]
    return values.masked_fill(mask, float("nan"))


def kl_forward(
    x: Tensor, x_ref: Tensor, grad_scale: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` with ``p = softmax(x_ref/τ)``,
    ``q = softmax(x/τ)``, in fp32 (fp64 for fp64 input), and the fp64 log-normalisers
    ``lse = log Σ exp(x/τ)``, ``lse_ref = log Σ exp(x_ref/τ)``: ``(kl, lse, lse_ref)``.

    With ``grad_scale`` ``s``, ``x`` is overwritten by ``s_i (q_i − p_i) / τ``; ``x_ref`` is only
    read.
    """
    z, z_ref = _accumulated(x, temperature), _accumulated(x_ref, temperature)
    lse, lse_ref = _log_normaliser(z), _log_normaliser(z_ref)
    log_q, log_p = _shifted(z, lse), _shifted(z_ref, lse_ref)
    # log p − log q as (z_ref − z) − (lse_ref − lse): both small when p ≈ q.
    gap = (lse_ref - lse).to(z.dtype)
    kl = _p_times(log_p, (z_ref - z) - gap[:, None]).sum(1)
    undefined = ~torch.isfinite(lse_ref)
    if grad_scale is not None:
        x.copy_(_undefined_to_nan(_kl_grad(log_q, log_p, grad_scale / temperature), undefined))
    return _undefined_to_nan(kl, undefined), lse, lse_ref


def kl_backward(
    x: Tensor, x_ref: Tensor, lse: Tensor, lse_ref: Tensor, grad_scale: Tensor, temperature: float
) -> None:
    """Recompute-mode backward: overwrite ``x`` with ``s_i (q_i − p_i) / τ`` from the saved
    fp64 log-normalisers."""
    z, z_ref = _accumulated(x, temperature), _accumulated(x_ref, temperature)
    grad = _kl_grad(_shifted(z, lse), _shifted(z_ref, lse_ref), grad_scale / temperature)
    x.copy_(_undefined_to_nan(grad, ~torch.isfinite(lse_ref)))


def _topk_grad(
    z: Tensor,
    index: Tensor,
    logprob: Tensor,
    tail_logprob: Tensor,
    lse: Tensor,
    lse_tail: Tensor,
    coef: Tensor,
) -> Tensor:
    """``coef_i ∂KL̃_i/∂z_i``: ``P q_v − p_v`` on the top-k, ``P q_v − p_t q_v / q_t`` off it,
    where ``P = Σ_K p_k + p_t`` (1 for a consistent cache) and ``q_v / q_t = exp(z_v − lse_t)``;
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
    grad = grad.scatter_(1, index, on_k).mul_(coef[:, None])
    return _undefined_to_nan(grad, ~torch.isfinite(mass))


def _reference_mass(logprob: Tensor, tail_logprob: Tensor) -> Tensor:
    """``P = Σ_K p_k + p_t`` per row, in fp64."""
    return torch.exp(logprob.double()).sum(1) + torch.exp(tail_logprob.double())


def kl_topk_forward(
    x: Tensor,
    index: Tensor,
    logprob: Tensor,
    tail_logprob: Tensor,
    grad_scale: Tensor | None,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row top-k KL ``Σ_{k∈K} p_k log(p_k/q_k) + p_t log(p_t/q_t)``, ``q = softmax(x/τ)``,
    ``q_t = Σ_{v∉K} q_v`` (summed directly, never as ``1 − Σ_K q_k``), in fp32 (fp64), and the
    fp64 ``lse = log Σ_v e^{x_v/τ}``, ``lse_t = log Σ_{v∉K} e^{x_v/τ}`` (−inf for an empty
    tail): ``(kl, lse, lse_t)``.

    ``index`` int64 ``[n, k]`` (distinct per row), ``logprob`` ``[n, k]`` = log p_k,
    ``tail_logprob`` ``[n]`` = log p_t. With ``grad_scale`` ``s``, ``x`` is overwritten by
    ``s_i/τ ·`` the gradient of :func:`_topk_grad`.
    """
    z = _accumulated(x, temperature)
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
        x.copy_(_topk_grad(z, index, lp, lt, lse, lse_tail, grad_scale / temperature))
    return kl, lse, lse_tail


def kl_topk_backward(
    x: Tensor,
    index: Tensor,
    logprob: Tensor,
    tail_logprob: Tensor,
    lse: Tensor,
    lse_tail: Tensor,
    grad_scale: Tensor,
    temperature: float,
) -> None:
    """Recompute-mode backward of :func:`kl_topk_forward` from the saved ``lse``/``lse_t``."""
    z = _accumulated(x, temperature)
    lp, lt = logprob.to(z.dtype), tail_logprob.to(z.dtype)
    x.copy_(_topk_grad(z, index, lp, lt, lse, lse_tail, grad_scale / temperature))


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
