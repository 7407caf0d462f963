"""Triton forward-KL epilogues (backend ``"triton"``): ``kl_forward``, ``kl_backward``,
``kl_topk_forward``, ``kl_topk_backward``.

Same contracts as the torch reference (:mod:`unlearn_kernels.backends.torch_backend`). For a
chunk of student logits ``x`` ``[n, V]`` and ``z = x/τ``, ``q = softmax(z)``:

* exact (``z = cap(x)/τ``, the reference capped with ``CAP_REF``): one online sweep over both
  rows keeps, per thread (merged once per row after the sweep, as in
  :mod:`~unlearn_kernels.backends.triton_cross_entropy`), running maxima ``m, m_r`` and
  rescaled ``S = Σ e^{z−m}``,
  ``R = Σ e^{z_r−m_r}`` and, for the forward KL, ``A = Σ_{p>0} e^{z_r−m_r}(z_r − z)`` (reverse:
  ``A = Σ e^{z−m}(z − z_r)``); then ``KL = A/R − (m_r − m) − log(R/S)`` (reverse: the mirror
  image); the JSD needs both normalisers first, so a second sweep forms it and its centre
  ``K = Σ q (log q − log m)``; a last sweep writes ``s/τ·∂D/∂z·sech²`` over ``x`` (``q − p``,
  ``q (d − K)``, ``(1 − β) q (log q − log m − K)``);
* top-k: the program first copies the row's ``k`` logits to a scratch buffer and overwrites them
  with ``−inf``, so the sweep sums the tail ``lse_t = log Σ_{v∉K} e^{z_v}`` directly; the
  ``k + 1`` loss terms are then formed in fp64; the gradient sweep writes
  ``s/τ·(P q_v − p_t e^{z_v − lse_t})`` (``−inf`` entries give 0) and the top-k entries are
  written last, ``s/τ·(P q_k − p_k)`` with ``P = Σ_K p_k + p_t`` (formed by the launcher);
  without a gradient the ``k`` logits are restored. The ``k`` ids are gathered in one tile
  (``k ≤ BLOCK_K_MAX``); barriers order these stores and loads within a program, outside the
  vocabulary loops.

Launch: the persistent grid and autotuned configurations of
:func:`~unlearn_kernels.backends.triton_cross_entropy.launch` (tables ``KL_SHAPES``,
``TOPK_SHAPES`` and their heavy variants).

Zero probabilities as in the reference: ``p = 0`` contributes 0, ``p_t = 0`` (or an empty
student tail) drops the tail term. Loads are cast to fp32 at once and stores round to nearest
even (the interpreter's bf16 arithmetic and casts are wrong otherwise); per-row
log-normalisers are fp64, and exponentials only ever see shifted values (``z − m``, or
``z − hi − lo`` with an fp64 ``lse = hi + lo``), so logits of order 1e4 keep full precision.
"""

from __future__ import annotations

from math import log as math_log
from math import log1p as math_log1p
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from unlearn_kernels._options import KLRowMath

from .triton_cross_entropy import (
    _cast_rne,
    _cols,
    _per_row,
    _per_thread,
    _row_group,
    _softcap,
    _softcap_args,
    _thread_max,
    _thread_merge,
    _thread_sum,
    device_function,
    launch,
    ptxas_cases_for,
)


@device_function
def _split(value):
    """fp64 ``value = hi + lo`` with fp32 ``hi``, ``lo`` (``lo = 0`` where ``value`` is ±inf)."""
    hi = value.to(tl.float32)
    lo = (value - hi.to(tl.float64)).to(tl.float32)
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)


@device_function
def _undefined(value):
    """Rows whose reference value (``lse_ref``, or the top-k mass ``P``) is not finite: no
    distribution, so a NaN loss and a NaN gradient row (the torch backend's rule)."""
    return ~(tl.abs(value) < float("inf"))


@device_function
def _online(m, s, z):
    """Fold tile ``z`` into per-thread running ``(max, Σ e^{z − max})`` (``[ROWS, THREADS]``)
    without leaving the thread; returns the new pair, the tile's ``e^{z − max}`` and the
    rescale factor of the old sum."""
    m_new = tl.maximum(m, _thread_max(z))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet
    alpha = tl.exp(m - shift)
    e = tl.exp(z - _per_thread(shift))
    return m_new, s * alpha + _thread_sum(e), e, alpha


@device_function
def _rescaled_sum(a, m, m_row):
    """``Σ_threads a · e^{m − m_row}``: per-thread sums kept relative to the thread's max ``m``
    brought to the row's max ``m_row``."""
    shift = tl.where(m_row == float("-inf"), 0.0, m_row)
    return tl.sum(a * tl.exp(m - shift[:, None]), axis=1)


@device_function
def _z(x, inv_tau, softcap, inv_softcap, CAP: tl.constexpr):
    """``(z, sech²)`` of fp32 logits: ``z = cap(x)/τ`` (``x/τ`` without ``CAP``, sech² then 1)."""
    if CAP:
        y, e = _softcap(x, softcap, inv_softcap)
        one_e = 1.0 + e
        return y * inv_tau, 4.0 * e / (one_e * one_e)
    else:
        return x * inv_tau, 1.0


@device_function
def _z_masked(x, inv_tau, softcap, inv_softcap, CAP: tl.constexpr):
    """``z`` of :func:`_z`, with ``x = −inf`` (a masked top-k entry) kept ``−inf``."""
    if CAP:
        y, _ = _softcap(x, softcap, inv_softcap)
        return tl.where(x == float("-inf"), float("-inf"), y * inv_tau)
    else:
        return x * inv_tau


@device_function
def _jsd_logs(d, lb, l1b):
    """``(log p − log m, log q − log m)`` of the generalised JSD from ``d = log q − log p``
    (``lb = log β``, ``l1b = log(1 − β)``; see ``torch_backend._jsd_logs``)."""
    shared = tl.log(1.0 + tl.exp(-tl.abs(l1b - lb + d)))
    log_p_m = -(tl.maximum(d + l1b, lb) + shared)
    log_q_m = -(tl.maximum(lb - d, l1b) + shared)
    return log_p_m, log_q_m


@device_function
def _div_grad(q, p, d, k, lb, l1b, beta, DIV: tl.constexpr):
    """``∂D/∂z`` per logit: forward ``q − p``, reverse ``q (d − K)``, JSD
    ``(1 − β) q (log q − log m − K)`` (0 where ``q = 0``); ``K`` per row."""
    if DIV == 0:
        return q - p
    elif DIV == 1:
        return tl.where(q > 0.0, q * (d - _per_row(k)), 0.0)
    else:
        _, log_q_m = _jsd_logs(d, lb, l1b)
        return (1.0 - beta) * tl.where(q > 0.0, q * (log_q_m - _per_row(k)), 0.0)


@device_function
def _pair_tile(
    x_ptr,
    xr_ptr,
    off_x,
    off_r,
    mask,
    cols,
    inv_tau,
    softcap,
    inv_softcap,
    HAS_SOFTCAP: tl.constexpr,
    CAP_REF: tl.constexpr,
):
    """A step's student and reference ``(z, sech², z_r)`` (fp32; masked entries 0)."""
    x = tl.load(x_ptr + _per_row(off_x) + cols, mask=mask, other=0.0).to(tl.float32)
    xr = tl.load(xr_ptr + _per_row(off_r) + cols, mask=mask, other=0.0).to(tl.float32)
    z, dz = _z(x, inv_tau, softcap, inv_softcap, HAS_SOFTCAP)
    zr = _z(xr, inv_tau, softcap, inv_softcap, CAP_REF)[0]
    return z, dz, zr


@triton.jit
def _kl_fwd_kernel(
    x_ptr,
    xr_ptr,
    scale_ptr,
    kl_ptr,
    lse_ptr,
    lse_ref_ptr,
    centre_ptr,
    n_rows,
    V,
    stride_x,
    stride_r,
    inv_tau,
    softcap,
    inv_softcap,
    beta,
    lb,
    l1b,
    HAS_GRAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    CAP_REF: tl.constexpr,
    DIV: tl.constexpr,
    ROWS: tl.constexpr,
    UNROLL: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """Per-row divergence (DIV 0 forward KL, 1 reverse KL, 2 JSD), fp64 log-normalisers and
    centre; with ``HAS_GRAD`` the gradient over ``x``. Persistent over row groups."""
    for group in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows, row_ok, off_x = _row_group(group, n_rows, stride_x, ROWS)
        off_r = rows.to(tl.int64) * stride_r
        # per-thread running maxima, rescaled sums and A (see the module docstring)
        m = tl.full([ROWS, THREADS], float("-inf"), tl.float32)
        m_r = tl.full([ROWS, THREADS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS, THREADS], tl.float32)
        r = tl.zeros([ROWS, THREADS], tl.float32)
        a = tl.zeros([ROWS, THREADS], tl.float32)
        for start in range(0, V, UNROLL * THREADS * VEC):
            cols = _cols(start, UNROLL, THREADS, VEC)
            mask = _per_row(row_ok) & (cols < V)
            z, _dz, zr = _pair_tile(
                x_ptr,
                xr_ptr,
                off_x,
                off_r,
                mask,
                cols,
                inv_tau,
                softcap,
                inv_softcap,
                HAS_SOFTCAP,
                CAP_REF,
            )
            z = tl.where(mask, z, float("-inf"))
            zr = tl.where(mask, zr, float("-inf"))
            m, s, e, alpha = _online(m, s, z)
            m_r, r, e_r, alpha_r = _online(m_r, r, zr)
            # forward: A = Σ e_r (z_r − z); reverse: A = Σ e (z − z_r) (p = 0 gives +inf there)
            if DIV == 0:
                a = a * alpha_r + _thread_sum(tl.where(e_r > 0.0, e_r * (zr - z), 0.0))
            elif DIV == 1:
                a = a * alpha + _thread_sum(tl.where(e > 0.0, e * (z - zr), 0.0))
        # the threads merged: the one block-wide reduction of the sweep
        m_t = m
        m_rt = m_r
        m, s = _thread_merge(m_t, s)
        m_r, r = _thread_merge(m_rt, r)
        if DIV == 0:
            a = _rescaled_sum(a, m_rt, m_r)
        elif DIV == 1:
            a = _rescaled_sum(a, m_t, m)
        # padding rows: finite placeholders (never stored)
        s = tl.where(row_ok, s, 1.0)
        r = tl.where(row_ok, r, 1.0)
        m = tl.where(row_ok, m, 0.0)
        m_r = tl.where(row_ok, m_r, 0.0)
        log_s = tl.log(s)
        log_r = tl.log(r)
        # log q − log p = (z − z_r) + gap
        gap = (m_r - m) + (log_r - log_s)
        centre = tl.zeros([ROWS], tl.float32)
        if DIV == 0:
            kl = a / r - (m_r - m) - tl.log(r / s)
        elif DIV == 1:
            kl = a / s - (m - m_r) - tl.log(s / r)
            centre = kl
        else:
            kl_t = tl.zeros([ROWS, THREADS], tl.float32)
            centre_t = tl.zeros([ROWS, THREADS], tl.float32)
            for start in range(0, V, UNROLL * THREADS * VEC):
                cols = _cols(start, UNROLL, THREADS, VEC)
                mask = _per_row(row_ok) & (cols < V)
                z, _dz, zr = _pair_tile(
                    x_ptr,
                    xr_ptr,
                    off_x,
                    off_r,
                    mask,
                    cols,
                    inv_tau,
                    softcap,
                    inv_softcap,
                    HAS_SOFTCAP,
                    CAP_REF,
                )
                q = tl.where(mask, tl.exp((z - _per_row(m)) - _per_row(log_s)), 0.0)
                p = tl.where(mask, tl.exp((zr - _per_row(m_r)) - _per_row(log_r)), 0.0)
                log_p_m, log_q_m = _jsd_logs((z - zr) + _per_row(gap), lb, l1b)
                q_part = tl.where(q > 0.0, q * log_q_m, 0.0)
                p_part = tl.where(p > 0.0, p * log_p_m, 0.0)
                kl_t += _thread_sum(beta * p_part + (1.0 - beta) * q_part)
                centre_t += _thread_sum(q_part)
            kl = tl.sum(kl_t, axis=1)
            centre = tl.sum(centre_t, axis=1)
        lse_ref = m_r.to(tl.float64) + log_r.to(tl.float64)
        undefined = _undefined(lse_ref)
        tl.store(kl_ptr + rows, tl.where(undefined, float("nan"), kl), mask=row_ok)
        tl.store(lse_ptr + rows, m.to(tl.float64) + log_s.to(tl.float64), mask=row_ok)
        tl.store(lse_ref_ptr + rows, lse_ref, mask=row_ok)
        tl.store(centre_ptr + rows, centre.to(tl.float64), mask=row_ok)
        if HAS_GRAD:
            # an undefined reference row: a NaN factor makes its whole gradient row NaN
            coef = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * inv_tau
            coef = tl.where(undefined, float("nan"), coef)
            _kl_write_grad(
                x_ptr,
                xr_ptr,
                row_ok,
                off_x,
                off_r,
                V,
                m,
                log_s,
                m_r,
                log_r,
                gap,
                centre,
                coef,
                inv_tau,
                softcap,
                inv_softcap,
                lb,
                l1b,
                beta,
                HAS_SOFTCAP,
                CAP_REF,
                DIV,
                UNROLL,
                THREADS,
                VEC,
            )


@device_function
def _kl_write_grad(
    x_ptr,
    xr_ptr,
    row_ok,
    off_x,
    off_r,
    V,
    hi,
    lo,
    hi_r,
    lo_r,
    gap,
    centre,
    coef,
    inv_tau,
    softcap,
    inv_softcap,
    lb,
    l1b,
    beta,
    HAS_SOFTCAP: tl.constexpr,
    CAP_REF: tl.constexpr,
    DIV: tl.constexpr,
    UNROLL: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """One sweep writing ``x ← coef·∂D/∂z·sech²`` with ``q = e^{(z − hi) − lo}``,
    ``p = e^{(z_r − hi_r) − lo_r}`` and ``log q − log p = (z − z_r) + gap``."""
    for start in range(0, V, UNROLL * THREADS * VEC):
        cols = _cols(start, UNROLL, THREADS, VEC)
        mask = _per_row(row_ok) & (cols < V)
        z, dz, zr = _pair_tile(
            x_ptr,
            xr_ptr,
            off_x,
            off_r,
            mask,
            cols,
            inv_tau,
            softcap,
            inv_softcap,
            HAS_SOFTCAP,
            CAP_REF,
        )
        q = tl.exp((z - _per_row(hi)) - _per_row(lo))
        p = tl.exp((zr - _per_row(hi_r)) - _per_row(lo_r))
        g = _div_grad(q, p, (z - zr) + _per_row(gap), centre, lb, l1b, beta, DIV)
        g = g * _per_row(coef) * dz
        tl.store(x_ptr + _per_row(off_x) + cols, _cast_rne(g, x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kl_bwd_kernel(
    x_ptr,
    xr_ptr,
    lse_ptr,
    lse_ref_ptr,
    centre_ptr,
    scale_ptr,
    n_rows,
    V,
    stride_x,
    stride_r,
    inv_tau,
    softcap,
    inv_softcap,
    beta,
    lb,
    l1b,
    HAS_SOFTCAP: tl.constexpr,
    CAP_REF: tl.constexpr,
    DIV: tl.constexpr,
    ROWS: tl.constexpr,
    UNROLL: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """Recompute mode: ``x ← s ∂D/∂x`` from the saved fp64 log-normalisers and centre."""
    for group in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows, row_ok, off_x = _row_group(group, n_rows, stride_x, ROWS)
        off_r = rows.to(tl.int64) * stride_r
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
        lse_ref = tl.load(lse_ref_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
        hi, lo = _split(lse)
        hi_r, lo_r = _split(lse_ref)
        gap = (lse_ref - lse).to(tl.float32)
        centre = tl.load(centre_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        coef = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * inv_tau
        coef = tl.where(_undefined(lse_ref), float("nan"), coef)  # an undefined row: all NaN
        _kl_write_grad(
            x_ptr,
            xr_ptr,
            row_ok,
            off_x,
            off_r,
            V,
            hi,
            lo,
            hi_r,
            lo_r,
            gap,
            centre,
            coef,
            inv_tau,
            softcap,
            inv_softcap,
            lb,
            l1b,
            beta,
            HAS_SOFTCAP,
            CAP_REF,
            DIV,
            UNROLL,
            THREADS,
            VEC,
        )


@device_function
def _topk_tile(idx_ptr, rows, row_ok, K, BLOCK_K: tl.constexpr):
    """Offsets, mask and token ids ``[ROWS, BLOCK_K]`` of the rows' top-k columns (``K ≤
    BLOCK_K``: all of them at once)."""
    kcols = tl.arange(0, BLOCK_K)
    kmask = row_ok[:, None] & (kcols < K)[None, :]
    koff = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    idx = tl.load(idx_ptr + koff, mask=kmask, other=0)
    return koff, kmask, idx


@device_function
def _tail_shift(lt, lse_tail):
    """``lse_t − log p_t``; +inf (no tail term) when ``p_t = 0`` or the tail is empty."""
    none = (lt == float("-inf")) | (lse_tail == float("-inf"))
    return tl.where(none, float("inf"), lse_tail - lt)


@device_function
def _topk_save(x_ptr, idx_ptr, saved_ptr, rows, row_ok, off_x, K, BLOCK_K: tl.constexpr):
    """Copy the rows' top-k logits to ``saved``; returns the tile of :func:`_topk_tile`."""
    koff, kmask, idx = _topk_tile(idx_ptr, rows, row_ok, K, BLOCK_K)
    xk = tl.load(x_ptr + off_x[:, None] + idx, mask=kmask, other=0.0)
    tl.store(saved_ptr + koff, xk, mask=kmask)
    return koff, kmask, idx, xk


@device_function
def _topk_write_grad(
    x_ptr,
    idx_ptr,
    lp_ptr,
    lt_ptr,
    mass_ptr,
    lse_ptr,
    lse_tail_ptr,
    scale_ptr,
    saved_ptr,
    rows,
    row_ok,
    off_x,
    V,
    K,
    inv_tau,
    softcap,
    inv_softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """Gradient of the top-k KL over whole rows, from the saved top-k logits and the stored
    ``lse``/``lse_t`` (re-read: nothing per-row stays live from the loss computation):
    ``x_v ← c·(P e^{z_v − lse} − e^{z_v − (lse_t − log p_t)})``, then the top-k entries
    ``x_k ← c·(P e^{z_k − lse} − p_k)``, with ``c = s/τ`` and ``P = Σ_K p_k + p_t`` (``mass``,
    formed by the launcher: per-row values from a top-k reduction would need a layout
    conversion, through shared memory, to meet the vocabulary tiles)."""
    total = tl.load(mass_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * inv_tau
    coef = tl.where(_undefined(total), float("nan"), coef)  # an undefined row: all NaN
    total = total.to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
    hi, lo = _split(lse)
    lt = tl.load(lt_ptr + rows, mask=row_ok, other=float("-inf")).to(tl.float64)
    lse_tail = tl.load(lse_tail_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
    hi_t, lo_t = _split(_tail_shift(lt, lse_tail))
    c1 = coef * total
    for start in range(0, V, UNROLL * THREADS * VEC):
        cols = _cols(start, UNROLL, THREADS, VEC)
        mask = _per_row(row_ok) & (cols < V)
        ptrs = x_ptr + _per_row(off_x) + cols
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        z, dz = _z(x, inv_tau, softcap, inv_softcap, HAS_SOFTCAP)
        g = _per_row(c1) * tl.exp((z - _per_row(hi)) - _per_row(lo))
        g = (g - _per_row(coef) * tl.exp((z - _per_row(hi_t)) - _per_row(lo_t))) * dz
        tl.store(ptrs, _cast_rne(g, x_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    koff, kmask, idx = _topk_tile(idx_ptr, rows, row_ok, K, BLOCK_K)
    lp = tl.load(lp_ptr + koff, mask=kmask, other=float("-inf")).to(tl.float32)
    xk = tl.load(saved_ptr + koff, mask=kmask, other=0.0).to(tl.float32)
    zk, dk = _z(xk, inv_tau, softcap, inv_softcap, HAS_SOFTCAP)
    g = total[:, None] * tl.exp((zk - hi[:, None]) - lo[:, None]) - tl.exp(lp)
    g = g * coef[:, None] * dk
    tl.store(x_ptr + off_x[:, None] + idx, _cast_rne(g, x_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _kl_topk_fwd_kernel(
    x_ptr,
    idx_ptr,
    lp_ptr,
    lt_ptr,
    mass_ptr,
    scale_ptr,
    saved_ptr,
    kl_ptr,
    lse_ptr,
    lse_tail_ptr,
    n_rows,
    V,
    K,
    stride_x,
    inv_tau,
    softcap,
    inv_softcap,
    HAS_GRAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
    UNROLL: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """Per-row top-k KL, fp64 ``lse``/``lse_t``; with ``HAS_GRAD`` the gradient over ``x``."""
    for group in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows, row_ok, off_x = _row_group(group, n_rows, stride_x, ROWS)
        # 1. save the top-k logits, mask them with −inf, their (m_k, s_k)
        koff, kmask, idx, xk = _topk_save(
            x_ptr, idx_ptr, saved_ptr, rows, row_ok, off_x, K, BLOCK_K
        )
        neg_inf = tl.full(xk.shape, float("-inf"), tl.float32)
        tl.store(x_ptr + off_x[:, None] + idx, neg_inf.to(x_ptr.dtype.element_ty), mask=kmask)
        zk = _z(xk.to(tl.float32), inv_tau, softcap, inv_softcap, HAS_SOFTCAP)[0]
        m_k, s_k = _thread_merge(tl.where(kmask, zk, float("-inf")), tl.where(kmask, 1.0, 0.0))
        tl.debug_barrier()
        # 2. the tail: every −inf entry contributes 0
        m_t = tl.full([ROWS, THREADS], float("-inf"), tl.float32)
        s_t = tl.zeros([ROWS, THREADS], tl.float32)
        for start in range(0, V, UNROLL * THREADS * VEC):
            cols = _cols(start, UNROLL, THREADS, VEC)
            mask = _per_row(row_ok) & (cols < V)
            x = tl.load(x_ptr + _per_row(off_x) + cols, mask=mask, other=float("-inf"))
            z = _z_masked(x.to(tl.float32), inv_tau, softcap, inv_softcap, HAS_SOFTCAP)
            m_t, s_t, _e, _alpha = _online(m_t, s_t, z)
        m_t, s_t = _thread_merge(m_t, s_t)
        lse_tail = tl.where(
            s_t > 0.0, m_t.to(tl.float64) + tl.log(s_t).to(tl.float64), float("-inf")
        )
        s_k = tl.where(row_ok, s_k, 1.0)
        m_k = tl.where(row_ok, m_k, 0.0)
        lse_k = m_k.to(tl.float64) + tl.log(s_k).to(tl.float64)
        top = tl.maximum(lse_k, lse_tail)
        lse = top + tl.log(1.0 + tl.exp(tl.minimum(lse_k, lse_tail) - top))
        # 3. the k + 1 loss terms, in fp64
        lt = tl.load(lt_ptr + rows, mask=row_ok, other=float("-inf")).to(tl.float64)
        p_t = tl.exp(lt)
        zk = _z(
            tl.load(saved_ptr + koff, mask=kmask, other=0.0).to(tl.float32),
            inv_tau,
            softcap,
            inv_softcap,
            HAS_SOFTCAP,
        )[0]
        lp = tl.load(lp_ptr + koff, mask=kmask, other=float("-inf")).to(tl.float64)
        p = tl.exp(lp)
        terms = tl.where(p > 0.0, p * (lp - (zk.to(tl.float64) - lse[:, None])), 0.0)
        loss = tl.where(p_t > 0.0, p_t * (lt - (lse_tail - lse)), 0.0) + tl.sum(terms, axis=1)
        mass = tl.load(mass_ptr + rows, mask=row_ok, other=0.0)
        loss = tl.where(_undefined(mass), float("nan"), loss)
        tl.store(kl_ptr + rows, loss.to(tl.float32), mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(lse_tail_ptr + rows, lse_tail, mask=row_ok)
        if HAS_GRAD:
            tl.debug_barrier()
            _topk_write_grad(
                x_ptr,
                idx_ptr,
                lp_ptr,
                lt_ptr,
                mass_ptr,
                lse_ptr,
                lse_tail_ptr,
                scale_ptr,
                saved_ptr,
                rows,
                row_ok,
                off_x,
                V,
                K,
                inv_tau,
                softcap,
                inv_softcap,
                HAS_SOFTCAP,
                BLOCK_K,
                UNROLL,
                THREADS,
                VEC,
            )
        else:
            xk = tl.load(saved_ptr + koff, mask=kmask, other=0.0)
            tl.store(x_ptr + off_x[:, None] + idx, xk, mask=kmask)


@triton.jit
def _kl_topk_bwd_kernel(
    x_ptr,
    idx_ptr,
    lp_ptr,
    lt_ptr,
    mass_ptr,
    lse_ptr,
    lse_tail_ptr,
    scale_ptr,
    saved_ptr,
    n_rows,
    V,
    K,
    stride_x,
    inv_tau,
    softcap,
    inv_softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
    UNROLL: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """Recompute mode: the top-k gradient over ``x`` from the saved ``lse``/``lse_t``."""
    for group in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows, row_ok, off_x = _row_group(group, n_rows, stride_x, ROWS)
        _topk_save(x_ptr, idx_ptr, saved_ptr, rows, row_ok, off_x, K, BLOCK_K)
        tl.debug_barrier()
        _topk_write_grad(
            x_ptr,
            idx_ptr,
            lp_ptr,
            lt_ptr,
            mass_ptr,
            lse_ptr,
            lse_tail_ptr,
            scale_ptr,
            saved_ptr,
            rows,
            row_ok,
            off_x,
            V,
            K,
            inv_tau,
            softcap,
            inv_softcap,
            HAS_SOFTCAP,
            BLOCK_K,
            UNROLL,
            THREADS,
            VEC,
        )


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------

#: autotuned configurations (see ``triton_cross_entropy.CE_SHAPES``): the exact kernels read
#: two rows per step; the heavy flavours are softcap and the reverse KL / JSD (exact), softcap
#: (top-k)
KL_SHAPES = {4: ((8, 8), (4, 8), (4, 16)), 2: ((8, 8), (8, 16), (8, 4))}
KL_HEAVY_SHAPES = {4: ((4, 8), (4, 4)), 2: ((4, 8), (4, 4))}
TOPK_SHAPES = {4: ((8, 8), (4, 16), (8, 4)), 2: ((8, 8), (8, 16), (8, 4))}
TOPK_HEAVY_SHAPES = {4: ((4, 8), (8, 4)), 2: ((4, 8), (4, 4))}
#: top-k columns are gathered in one ``[ROWS, BLOCK_K]`` tile, ``BLOCK_K = next_pow2(k)``
BLOCK_K_MAX = 4096


def _check_x(x: Tensor, name: str = "x") -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be [n, V] with unit column stride, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be fp32, bf16 or fp16, got {x.dtype}")


def _rows(t: Tensor, n: int, dtype: torch.dtype, name: str) -> Tensor:
    if t.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows, got shape {tuple(t.shape)}")
    return t.to(dtype).contiguous()


def _temperature(temperature: float) -> float:
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return 1.0 / temperature


def _math_args(math: KLRowMath) -> tuple[tuple, dict[str, Any]]:
    """``(scalars, constexprs)`` of the exact kernels for ``math``: ``(1/τ, c, 1/c, β, log β,
    log(1 − β))`` and the softcap flags and divergence (0 forward, 1 reverse, 2 JSD)."""
    cap, inv_cap = _softcap_args(math.softcap)
    beta = math.beta
    jsd = 0.0 < beta < 1.0
    logs = (math_log(beta), math_log1p(-beta)) if jsd else (0.0, 0.0)
    scalars = (_temperature(math.temperature), cap, inv_cap, beta, *logs)
    constexprs = {
        "HAS_SOFTCAP": math.softcap is not None,
        "CAP_REF": math.softcap is not None and math.softcap_ref,
        "DIV": 2 if jsd else int(beta),
    }
    return scalars, constexprs


def kl_forward(
    x: Tensor, x_ref: Tensor, grad_scale: Tensor | None, math: KLRowMath
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row divergence of :class:`~unlearn_kernels._options.KLRowMath` (fp32) and the fp64
    ``(lse, lse_ref, centre)``; with ``grad_scale`` ``s``, ``x ← s ∂kl/∂x`` in place."""
    _check_x(x)
    _check_x(x_ref, "x_ref")
    n, V = x.shape
    if x_ref.shape != x.shape:
        raise ValueError(f"x_ref must have x's shape {tuple(x.shape)}, got {tuple(x_ref.shape)}")
    kl = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float64, device=x.device)
    lse_ref = torch.empty(n, dtype=torch.float64, device=x.device)
    centre = torch.empty(n, dtype=torch.float64, device=x.device)
    scalars, constexprs = _math_args(math)
    if n == 0:
        return kl, lse, lse_ref, centre
    scale = lse if grad_scale is None else _rows(grad_scale, n, torch.float32, "grad_scale")
    launch(
        _kl_fwd_kernel,
        KL_HEAVY_SHAPES if _heavy(math) else KL_SHAPES,
        x,
        n,
        V,
        x,
        x_ref,
        scale,
        kl,
        lse,
        lse_ref,
        centre,
        n,
        V,
        x.stride(0),
        x_ref.stride(0),
        *scalars,
        HAS_GRAD=grad_scale is not None,
        **constexprs,
    )
    return kl, lse, lse_ref, centre


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
    _check_x(x)
    _check_x(x_ref, "x_ref")
    n, V = x.shape
    scalars, constexprs = _math_args(math)
    if n == 0:
        return
    launch(
        _kl_bwd_kernel,
        KL_HEAVY_SHAPES if _heavy(math) else KL_SHAPES,
        x,
        n,
        V,
        x,
        x_ref,
        _rows(lse, n, torch.float64, "lse"),
        _rows(lse_ref, n, torch.float64, "lse_ref"),
        _rows(centre, n, torch.float64, "centre"),
        _rows(grad_scale, n, torch.float32, "grad_scale"),
        n,
        V,
        x.stride(0),
        x_ref.stride(0),
        *scalars,
        **constexprs,
    )


def _topk_args(x: Tensor, index: Tensor, logprob: Tensor, tail_logprob: Tensor):
    n, V = x.shape
    if index.dim() != 2 or not 1 <= index.shape[1] <= V:
        raise ValueError(f"index must be [n, k] with 1 <= k <= V={V}, got {tuple(index.shape)}")
    k = index.shape[1]
    if logprob.shape != index.shape:
        raise ValueError(f"logprob must have index's shape {tuple(index.shape)}")
    return (
        _rows(index, n, torch.int64, "index"),
        _rows(logprob, n, torch.float32, "logprob"),
        _rows(tail_logprob, n, torch.float32, "tail_logprob"),
        k,
    )


def _heavy(math: KLRowMath) -> bool:
    """Softcap or a divergence other than the forward KL (``KL_HEAVY_SHAPES``)."""
    return math.softcap is not None or math.beta != 0.0


def _mass(logprob: Tensor, tail_logprob: Tensor) -> Tensor:
    """``P = Σ_K p_k + p_t`` per row, float64."""
    return logprob.double().exp().sum(1) + tail_logprob.double().exp()


def _block_k(k: int) -> int:
    if k > BLOCK_K_MAX:
        raise ValueError(f"the triton backend takes k <= {BLOCK_K_MAX} top-k ids, got k={k}")
    return triton.next_power_of_2(k)


def kl_topk_forward(
    x: Tensor,
    index: Tensor,
    logprob: Tensor,
    tail_logprob: Tensor,
    grad_scale: Tensor | None,
    math: KLRowMath,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row top-k KL (fp32) and the fp64 ``(lse, lse_t)``; with ``grad_scale``, ``x`` is
    overwritten by the gradient. ``index`` rows must hold distinct ids in ``[0, V)``;
    ``math``: temperature and softcap."""
    _check_x(x)
    n, V = x.shape
    index, logprob, tail_logprob, k = _topk_args(x, index, logprob, tail_logprob)
    kl = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float64, device=x.device)
    lse_tail = torch.empty(n, dtype=torch.float64, device=x.device)
    inv_tau = _temperature(math.temperature)
    cap, inv_cap = _softcap_args(math.softcap)
    if n == 0:
        return kl, lse, lse_tail
    scale = lse if grad_scale is None else _rows(grad_scale, n, torch.float32, "grad_scale")
    launch(
        _kl_topk_fwd_kernel,
        TOPK_HEAVY_SHAPES if math.softcap is not None else TOPK_SHAPES,
        x,
        n,
        V,
        x,
        index,
        logprob,
        tail_logprob,
        _mass(logprob, tail_logprob),
        scale,
        torch.empty(n, k, dtype=x.dtype, device=x.device),
        kl,
        lse,
        lse_tail,
        n,
        V,
        k,
        x.stride(0),
        inv_tau,
        cap,
        inv_cap,
        HAS_GRAD=grad_scale is not None,
        HAS_SOFTCAP=math.softcap is not None,
        BLOCK_K=_block_k(k),
    )
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
    """Recompute mode: overwrite ``x`` with the top-k gradient from the saved fp64 ``lse``,
    ``lse_t``."""
    _check_x(x)
    n, V = x.shape
    index, logprob, tail_logprob, k = _topk_args(x, index, logprob, tail_logprob)
    inv_tau = _temperature(math.temperature)
    cap, inv_cap = _softcap_args(math.softcap)
    if n == 0:
        return
    launch(
        _kl_topk_bwd_kernel,
        TOPK_HEAVY_SHAPES if math.softcap is not None else TOPK_SHAPES,
        x,
        n,
        V,
        x,
        index,
        logprob,
        tail_logprob,
        _mass(logprob, tail_logprob),
        _rows(lse, n, torch.float64, "lse"),
        _rows(lse_tail, n, torch.float64, "lse_tail"),
        _rows(grad_scale, n, torch.float32, "grad_scale"),
        torch.empty(n, k, dtype=x.dtype, device=x.device),
        n,
        V,
        k,
        x.stride(0),
        inv_tau,
        cap,
        inv_cap,
        HAS_SOFTCAP=math.softcap is not None,
        BLOCK_K=_block_k(k),
    )


# ------------------------------------------------------------------------------------------
# ahead-of-time compile cases, read by benchmarks/triton_ptxas.py
# ------------------------------------------------------------------------------------------


#: the divergences the exact kernels compile: (tag, constexprs)
_DIVERGENCES = (
    ("forward", dict(HAS_SOFTCAP=False, CAP_REF=False, DIV=0)),
    ("forward,softcap", dict(HAS_SOFTCAP=True, CAP_REF=True, DIV=0)),
    ("reverse,softcap", dict(HAS_SOFTCAP=True, CAP_REF=True, DIV=1)),
    ("jsd,softcap", dict(HAS_SOFTCAP=True, CAP_REF=True, DIV=2)),
)


def _ptxas_cases() -> list[dict[str, Any]]:
    """Every kernel × dtype × gradient × configuration, for each divergence (exact) or softcap
    (top-k, at k = 32)."""
    rows = {"n_rows": "i32", "V": "i32"}
    exact_scalars = {
        "inv_tau": "fp32",
        "softcap": "fp32",
        "inv_softcap": "fp32",
        "beta": "fp32",
        "lb": "fp32",
        "l1b": "fp32",
    }
    topk_scalars = {"inv_tau": "fp32", "softcap": "fp32", "inv_softcap": "fp32"}
    cases: list[dict[str, Any]] = []
    for dt in ("fp32", "bf16", "fp16"):
        kl_fwd = {
            "x_ptr": f"*{dt}",
            "xr_ptr": f"*{dt}",
            "scale_ptr": "*fp32",
            "kl_ptr": "*fp32",
            "lse_ptr": "*fp64",
            "lse_ref_ptr": "*fp64",
            "centre_ptr": "*fp64",
            **rows,
            "stride_x": "i32",
            "stride_r": "i32",
            **exact_scalars,
        }
        kl_bwd = {
            "x_ptr": f"*{dt}",
            "xr_ptr": f"*{dt}",
            "lse_ptr": "*fp64",
            "lse_ref_ptr": "*fp64",
            "centre_ptr": "*fp64",
            "scale_ptr": "*fp32",
            **rows,
            "stride_x": "i32",
            "stride_r": "i32",
            **exact_scalars,
        }
        topk_fwd = {
            "x_ptr": f"*{dt}",
            "idx_ptr": "*i64",
            "lp_ptr": "*fp32",
            "lt_ptr": "*fp32",
            "mass_ptr": "*fp64",
            "scale_ptr": "*fp32",
            "saved_ptr": f"*{dt}",
            "kl_ptr": "*fp32",
            "lse_ptr": "*fp64",
            "lse_tail_ptr": "*fp64",
            **rows,
            "K": "i32",
            "stride_x": "i32",
            **topk_scalars,
        }
        topk_bwd = {
            "x_ptr": f"*{dt}",
            "idx_ptr": "*i64",
            "lp_ptr": "*fp32",
            "lt_ptr": "*fp32",
            "mass_ptr": "*fp64",
            "lse_ptr": "*fp64",
            "lse_tail_ptr": "*fp64",
            "scale_ptr": "*fp32",
            "saved_ptr": f"*{dt}",
            **rows,
            "K": "i32",
            "stride_x": "i32",
            **topk_scalars,
        }
        strides = ("stride_x", "stride_r")
        for tag, divergence in _DIVERGENCES:
            heavy = tag != "forward"
            for grad in (False, True):
                cases += ptxas_cases_for(
                    f"kl_fwd[{dt},grad={int(grad)},{tag}]",
                    _kl_fwd_kernel,
                    kl_fwd,
                    dict(HAS_GRAD=grad, **divergence),
                    dt,
                    strides,
                    KL_HEAVY_SHAPES if heavy else KL_SHAPES,
                )
            cases += ptxas_cases_for(
                f"kl_bwd[{dt},{tag}]",
                _kl_bwd_kernel,
                kl_bwd,
                divergence,
                dt,
                strides,
                KL_HEAVY_SHAPES if heavy else KL_SHAPES,
            )
        for softcap in (False, True):
            for grad in (False, True):
                cases += ptxas_cases_for(
                    f"kl_topk_fwd[{dt},grad={int(grad)},softcap={int(softcap)}]",
                    _kl_topk_fwd_kernel,
                    topk_fwd,
                    dict(HAS_GRAD=grad, HAS_SOFTCAP=softcap, BLOCK_K=32),
                    dt,
                    ("K", "stride_x"),
                    TOPK_HEAVY_SHAPES if softcap else TOPK_SHAPES,
                )
            cases += ptxas_cases_for(
                f"kl_topk_bwd[{dt},softcap={int(softcap)}]",
                _kl_topk_bwd_kernel,
                topk_bwd,
                dict(HAS_SOFTCAP=softcap, BLOCK_K=32),
                dt,
                ("K", "stride_x"),
                TOPK_HEAVY_SHAPES if softcap else TOPK_SHAPES,
            )
    return cases


PTXAS_CASES = _ptxas_cases()
