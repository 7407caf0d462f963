"""Triton cross-entropy epilogue (backend ``"triton"``).

Same contract as :func:`unlearn_kernels.backends.torch_backend.ce_forward` /
:func:`~unlearn_kernels.backends.torch_backend.ce_backward`: the chunk driver hands over one
chunk of raw logits ``x`` (``[n, V]``, unit column stride, fp32/bf16/fp16) and the epilogue
finishes the loss in fp32, optionally overwriting ``x`` with the gradient.

Math, for row ``i`` with target ``y_i`` and optional softcap ``c`` (every loss option off)::

    z_i    = c·tanh(x_i / c)            (z_i = x_i without softcap)
    lse_i  = log Σ_v exp(z_iv)           (online: running max m, running sum s·exp(−m))
    ℓ_i    = lse_i − z_{i,y_i}
    ∂ℓ/∂x  = s_i · (exp(z_i − lse_i) − e_{y_i}) · sech²(x_i / c)

where ``s_i`` is ``grad_scale[i]`` and ``sech² = 1 − tanh² = 1 − (z/c)²`` (computed as
``4e/(1+e)²`` with ``e = exp(−2|x/c|)``, which has no cancellation when ``|x| ≫ c``). The
options of :class:`~unlearn_kernels._options.CERowMath` change only per-row scalars (class
weight ``c_y``, z-loss, token scaling: the factors ``a, P, c_eps`` of :func:`_row_factors`), plus,
under the constexpr flags, a per-thread sum of ``c_v (z_v − z_y)`` in pass 1 and a ``(ε/V) c_v``
term in pass 2 (``SMOOTH``, ``HAS_CLASS_WEIGHT``) and the first column of the running maximum
(``ARGMAX``).

Kernel layout. A persistent grid (``min(n, SMs × PROGRAMS_PER_SM)`` programs) strides over
the rows; a program walks its row's vocabulary in steps of ``UNROLL·THREADS·VEC`` columns,
held as ``[ROWS, UNROLL, THREADS, VEC]`` tiles: each thread issues ``UNROLL`` independent
16-byte loads (``VEC`` logits each) per step. Pass 1 keeps, per thread, a running max and a
sum of ``exp(z − max)`` rescaled when that max grows (``1 + 1/(UNROLL·VEC)`` exponentials per
logit, never of an unshifted value); the only block-wide reduction merges the threads' pairs
once per row, after the loop, so the loop has no barrier (benchmarks/results/triton_ptxas.md
counts them in the PTX). Pass 2 re-reads the row and writes the gradient over it. The
configuration (``UNROLL``, ``VEC``, ``num_warps``) is chosen by ``triton.autotune`` per
``(V, dtype)`` and kernel flavour from ``CE_SHAPES`` / ``CE_HEAVY_SHAPES`` (:func:`launch`).
Every load is cast to fp32 at once and the store rounds back to nearest-even (bf16 by integer
arithmetic, see :func:`_cast_rne`), which is also what keeps the interpreter
(``TRITON_INTERPRET=1``, whose bf16 arithmetic and bf16 cast are wrong) exact. The
interpreter runs the same configurations, picked without timing (:func:`interpreter_config`)
and with ``INTERP_ROWS`` rows per step (its cost is per operation, not per element).

Interpreter vs compiler. ``TRITON_INTERPRET`` is read when ``@triton.jit`` runs, i.e. at
import time, and that includes Triton's own library (``tl.sum``, ``tl.max``, ``tl.zeros`` are
``@jit`` functions decorated when ``triton`` is first imported). So the process is in
interpreter mode iff ``TRITON_INTERPRET=1`` was set before the first ``import triton``
(:func:`triton_interpreter_active`); flipping the variable later changes nothing. In that
mode every launch here runs the interpreter (CPU tensors, or CUDA tensors copied to host)
and nothing can be compiled (the code generator cannot call the interpreted ``tl.zeros``;
benchmarks/triton_ptxas.py compiles in a child process then); otherwise CUDA tensors run
compiled kernels and CPU tensors are refused. :func:`kernel_variant` picks the flavour that
matches the process even if the variable changed between ``import triton`` and the import
of a kernel module. Device helpers are declared with :func:`device_function` instead of
``@triton.jit`` so that both flavours of a kernel can call them.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from unlearn_kernels._options import CERowMath, CERows
from unlearn_kernels.backends.torch_backend import split_lse

__all__ = [
    "PTXAS_CASES",
    "ce_backward",
    "ce_forward",
    "device_function",
    "kernel_variant",
    "triton_interpreter_active",
]


class DualJITFunction(JITFunction):
    """A ``@triton.jit`` *device* function callable from compiled and interpreted kernels.

    The code generator compiles it like any ``JITFunction``; called from Python (which is what
    an interpreted kernel does) it runs the interpreter's rewrite of the function. It skips
    the interpreter's own per-call re-patching of ``triton.language`` (the kernel that calls
    it has patched it already), which otherwise costs more than the helper's arithmetic.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rewritten = self.__dict__.get("_rewritten")
        if rewritten is None:
            rewritten = self.__dict__["_rewritten"] = InterpretedFunction(self.fn).rewrite()
        return rewritten(*args, **kwargs)


def device_function(fn: Any) -> DualJITFunction:
    """Decorator for device helpers (instead of ``@triton.jit``), whatever TRITON_INTERPRET is."""
    return DualJITFunction(fn)


@device_function
def _softcap(x, softcap, inv_softcap):
    """``(c·tanh(x/c), exp(−2|x/c|))`` in fp32; ``sech²(x/c) = 4e/(1+e)²`` from the second.

    tanh(a), a = |x/c|: below 0.625 an odd minimax polynomial fitted for this file,
    ``a + a³·P(a²)`` (max relative error 8e-8 in fp32); above, ``(1 − e)/(1 + e)`` with
    ``e = exp(−2a) ≤ 0.29`` (no cancellation, no overflow for any |x|).
    """
    u = x * inv_softcap
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    poly = -0.0057049845 * a2 + 0.020639084
    poly = poly * a2 - 0.053739715
    poly = poly * a2 + 0.13331442
    poly = poly * a2 - 0.3333328
    t = tl.where(a < 0.625, a + a * a2 * poly, (1.0 - e) / (1.0 + e))
    return softcap * tl.where(u < 0.0, -t, t), e


@device_function
def _cast_rne(g, dtype: tl.constexpr):
    """``g`` (fp32) rounded to nearest-even in ``dtype``.

    bf16 is rounded with integer arithmetic, ``(bits + 0x7FFF + lsb) >> 16``: the interpreter's
    own fp32→bf16 cast truncates (and its round-to-nearest path loses the carry), and on a
    GPU this costs a few integer operations per stored value in a memory-bound loop. Finite
    values and ±inf round exactly as ``cvt.rn.bf16.f32``; NaN stays NaN unless its payload
    sits only in the low 16 bits.
    """
    if dtype == tl.bfloat16:
        bits = g.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return g.to(dtype)


@device_function
def _row_factors(nll, lse, scale, c_y, eps, inv_v, class_sum, z_scale, token_scaling):
    """Gradient factors of a row (see :mod:`~unlearn_kernels.backends.torch_backend`):
    ``(a, P, c_eps)`` with ``a = sπ``, ``P = (1 − ε) c_y + εC/V + 2 s c_y lse`` and
    ``c_eps = (1 − ε + ε/V) c_y``; every option off gives ``(s, 1, 1)``."""
    a = tl.where(token_scaling != 0, scale * tl.exp(-nll), scale)
    big_p = (1.0 - eps) * c_y + eps * class_sum * inv_v + 2.0 * z_scale * c_y * lse
    return a, big_p, (1.0 - eps + eps * inv_v) * c_y


@device_function
def _grad_tile(p, is_target, a, big_p, c_eps, w, eps_v, SMOOTH: tl.constexpr):
    """``a (P p − (ε/V) w)`` off the target, ``a (P p − c_eps)`` at it (per-row factors
    ``[ROWS]``)."""
    off = tl.where(is_target, _per_row(c_eps), eps_v * w if SMOOTH else 0.0)
    return (p * _per_row(big_p) - off) * _per_row(a)


# Tiles. A program's vocabulary step covers ROWS rows × UNROLL·THREADS·VEC columns, held as
# [ROWS, UNROLL, THREADS, VEC]: thread t owns the VEC adjacent columns (16 bytes) at t·VEC of
# each of the UNROLL runs of THREADS·VEC columns, i.e. UNROLL independent, coalesced 16-byte
# loads in flight. Reducing over the UNROLL and VEC axes stays inside the thread (no shuffle,
# no barrier): running statistics are kept per thread, [ROWS, THREADS], and merged across the
# block once per row, after the vocabulary loop. ROWS is 1 on a GPU; the interpreter, whose
# cost is per operation, batches rows (``INTERP_ROWS``) through the same configuration.


@device_function
def _cols(start, UNROLL: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr):
    """Columns ``[1, UNROLL, THREADS, VEC]`` of the vocabulary step at ``start``."""
    run = tl.arange(0, UNROLL)[None, :, None, None] * (THREADS * VEC)
    lane = tl.arange(0, THREADS)[None, None, :, None] * VEC + tl.arange(0, VEC)[None, None, None, :]
    return start + run + lane


@device_function
def _per_row(v):
    """A per-row ``[ROWS]`` value broadcast against tiles."""
    return v[:, None, None, None]


@device_function
def _per_thread(v):
    """A per-thread ``[ROWS, THREADS]`` value broadcast against tiles."""
    return v[:, None, :, None]


@device_function
def _class_weights(cw_ptr, cols, V):
    """``c_v`` of a step's columns (loaded in the logits' layout: no conversion between them,
    hence no barrier)."""
    return tl.load(cw_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)


@device_function
def _thread_max(t):
    """Max over each thread's own elements of a tile: ``[ROWS, THREADS]``."""
    return tl.max(tl.max(t, axis=3), axis=1)


@device_function
def _thread_sum(t):
    """Sum over each thread's own elements of a tile: ``[ROWS, THREADS]``."""
    return tl.sum(tl.sum(t, axis=3), axis=1)


@device_function
def _thread_fold(m, s, z):
    """Fold tile ``z`` into per-thread running ``(max, Σ e^{z − max})`` without leaving the
    thread; returns the new pair, the step's max per thread and the old sum's rescale factor."""
    step_max = _thread_max(z)
    m_new = tl.maximum(m, step_max)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet
    alpha = tl.exp(m - shift)
    return m_new, s * alpha + _thread_sum(tl.exp(z - _per_thread(shift))), step_max, alpha


@device_function
def _thread_merge(m, s):
    """Per-row ``(max, Σ e^{z − max})`` of per-thread pairs: the one block-wide reduction."""
    m_row = tl.max(m, axis=1)
    shift = tl.where(m_row == float("-inf"), 0.0, m_row)
    return m_row, tl.sum(s * tl.exp(m - shift[:, None]), axis=1)


@device_function
def _row_group(group, n_rows, stride, ROWS: tl.constexpr):
    """Rows ``[ROWS]`` of row group ``group``, which of them exist, and their offsets."""
    rows = group * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    return rows, row_ok, rows.to(tl.int64) * stride


@triton.jit
def _ce_fwd_kernel(
    x_ptr,
    target_ptr,
    grad_scale_ptr,
    cw_ptr,
    loss_ptr,
    lse_ptr,
    lse_lo_ptr,
    z_part_ptr,
    argmax_ptr,
    n_rows,
    V,
    stride_x,
    softcap,
    inv_softcap,
    eps,
    class_sum,
    z_scale,
    token_scaling,
    HAS_GRAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    RETURN_Z: tl.constexpr,
    ARGMAX: tl.constexpr,
    ROWS: tl.constexpr,
    UNROLL: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """Per-row ``loss``/``lse`` (and, as asked, the z-loss part and the argmax); with
    ``HAS_GRAD`` also the gradient written over ``x``. Persistent: program ``p`` of ``P`` owns
    row groups ``p, p + P, …``."""
    for group in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows, row_ok, row_off = _row_group(group, n_rows, stride_x, ROWS)
        tgt = tl.load(target_ptr + rows, mask=row_ok, other=0)
        x_t = tl.load(x_ptr + row_off + tgt, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x_t = _softcap(x_t, softcap, inv_softcap)[0]

        # ---- pass 1: per-thread online max / rescaled sum, fp32 -------------------------------
        # Every thread keeps its own running max m and sum acc of exp(z − m) (SMOOTH: the
        # spread, Σ c_v (z_v − z_y); ARGMAX: the first column of its max); the threads are
        # merged once, after the loop, so the loop body has no block-wide reduction.
        m = tl.full([ROWS, THREADS], float("-inf"), tl.float32)
        acc = tl.zeros([ROWS, THREADS], tl.float32)
        if SMOOTH:
            spread = tl.zeros([ROWS, THREADS], tl.float32)
        if ARGMAX:
            arg = tl.zeros([ROWS, THREADS], tl.int32)
        for start in range(0, V, UNROLL * THREADS * VEC):
            cols = _cols(start, UNROLL, THREADS, VEC)
            mask = _per_row(row_ok) & (cols < V)
            z = tl.load(x_ptr + _per_row(row_off) + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap, inv_softcap)[0]
            if SMOOTH:
                d = tl.where(mask, z - _per_row(x_t), 0.0)
                if HAS_CLASS_WEIGHT:
                    d = d * _class_weights(cw_ptr, cols, V)
                spread += _thread_sum(d)
            z = tl.where(mask, z, float("-inf"))
            m_new, acc, step_max, _alpha = _thread_fold(m, acc, z)
            if ARGMAX:  # the step's first column holding the thread's max, if that beats it
                at_max = tl.where(z == _per_thread(step_max), cols, V)
                arg = tl.where(step_max > m, tl.min(tl.min(at_max, axis=3), axis=1), arg)
            m = m_new
        m_thread = m
        m, s = _thread_merge(m_thread, acc)

        # lse = m + log s. Kept apart: z − m is exact for the logits that matter (Sterbenz),
        # so exp((z − m) − log s) and (m − z_y) + log s stay accurate when |z| is large (1e4:
        # the fp32 rounding of lse alone would be 2e-3 there). Padding rows (s = 0, m = −inf)
        # get m = 0, log s = 0, so pass 2 stays finite on them too.
        m = tl.where(row_ok, m, 0.0)
        log_s = tl.log(tl.where(row_ok, s, 1.0))
        # lse leaves as the pair hi + lo (hi = fl(m + log s), lo its rounding error, exact by
        # Fast2Sum since |m| ≥ |log s| wherever it matters): the backward rebuilds
        # exp(z − lse) as exp((z − hi) − lo) at full precision.
        lse_hi = m + log_s
        tl.store(lse_ptr + rows, lse_hi, mask=row_ok)
        tl.store(lse_lo_ptr + rows, (m - lse_hi) + log_s, mask=row_ok)
        if ARGMAX:  # the first column among the threads that hold the row's max
            at_max = tl.where(m_thread == tl.max(m_thread, axis=1)[:, None], arg, V)
            tl.store(argmax_ptr + rows, tl.min(at_max, axis=1).to(tl.int64), mask=row_ok)

        # ---- the row's loss (CERowMath): every option off leaves loss = nll --------------------
        nll = (m - x_t) + log_s
        c_y = tl.full([ROWS], 1.0, tl.float32)
        if HAS_CLASS_WEIGHT:
            c_y = tl.load(cw_ptr + tgt, mask=row_ok, other=0.0).to(tl.float32)
        inv_v = 1.0 / V
        loss = c_y * nll
        if SMOOTH:
            loss = (1.0 - eps) * loss + (eps * inv_v) * (class_sum * nll - tl.sum(spread, axis=1))
        z_part = c_y * z_scale * lse_hi * lse_hi
        pi = tl.where(token_scaling != 0, tl.exp(-nll), 1.0)
        tl.store(loss_ptr + rows, pi * (loss + z_part), mask=row_ok)
        if RETURN_Z:
            tl.store(z_part_ptr + rows, pi * z_part, mask=row_ok)

        # ---- pass 2: gradient over x ----------------------------------------------------------
        if HAS_GRAD:
            scale = tl.load(grad_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            a, big_p, c_eps = _row_factors(
                nll, lse_hi, scale, c_y, eps, inv_v, class_sum, z_scale, token_scaling
            )
            _ce_write_grad(
                x_ptr,
                cw_ptr,
                row_ok,
                row_off,
                tgt,
                V,
                m,
                log_s,
                a,
                big_p,
                c_eps,
                eps * inv_v,
                softcap,
                inv_softcap,
                HAS_SOFTCAP,
                SMOOTH,
                HAS_CLASS_WEIGHT,
                UNROLL,
                THREADS,
                VEC,
            )


@device_function
def _ce_write_grad(
    x_ptr,
    cw_ptr,
    row_ok,
    row_off,
    tgt,
    V,
    hi,
    lo,
    a,
    big_p,
    c_eps,
    eps_v,
    softcap,
    inv_softcap,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    UNROLL: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """One sweep over the rows writing ``x ← ∂ℓ/∂x`` (:func:`_grad_tile` times sech² under
    softcap), with ``p = exp((z − hi) − lo)`` for ``lse = hi + lo``."""
    for start in range(0, V, UNROLL * THREADS * VEC):
        cols = _cols(start, UNROLL, THREADS, VEC)
        mask = _per_row(row_ok) & (cols < V)
        ptrs = x_ptr + _per_row(row_off) + cols
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z, e = _softcap(z, softcap, inv_softcap)
        p = tl.exp((z - _per_row(hi)) - _per_row(lo))
        w = 1.0
        if HAS_CLASS_WEIGHT and SMOOTH:
            w = _class_weights(cw_ptr, cols, V)
        g = _grad_tile(p, cols == _per_row(tgt), a, big_p, c_eps, w, eps_v, SMOOTH)
        if HAS_SOFTCAP:
            one_e = 1.0 + e
            g = g * (4.0 * e / (one_e * one_e))
        tl.store(ptrs, _cast_rne(g, x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bwd_kernel(
    x_ptr,
    target_ptr,
    lse_ptr,
    lse_lo_ptr,
    grad_scale_ptr,
    cw_ptr,
    n_rows,
    V,
    stride_x,
    softcap,
    inv_softcap,
    eps,
    class_sum,
    z_scale,
    token_scaling,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    ROWS: tl.constexpr,
    UNROLL: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """Recompute mode: gradient over ``x`` from the saved ``lse = hi + lo`` (pass 2 of the
    forward), on the same persistent grid."""
    for group in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows, row_ok, row_off = _row_group(group, n_rows, stride_x, ROWS)
        tgt = tl.load(target_ptr + rows, mask=row_ok, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        lse_lo = tl.load(lse_lo_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        scale = tl.load(grad_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        x_t = tl.load(x_ptr + row_off + tgt, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x_t = _softcap(x_t, softcap, inv_softcap)[0]
        c_y = tl.full([ROWS], 1.0, tl.float32)
        if HAS_CLASS_WEIGHT:
            c_y = tl.load(cw_ptr + tgt, mask=row_ok, other=0.0).to(tl.float32)
        inv_v = 1.0 / V
        nll = (lse - x_t) + lse_lo
        a, big_p, c_eps = _row_factors(
            nll, lse, scale, c_y, eps, inv_v, class_sum, z_scale, token_scaling
        )
        _ce_write_grad(
            x_ptr,
            cw_ptr,
            row_ok,
            row_off,
            tgt,
            V,
            lse,
            lse_lo,
            a,
            big_p,
            c_eps,
            eps * inv_v,
            softcap,
            inv_softcap,
            HAS_SOFTCAP,
            SMOOTH,
            HAS_CLASS_WEIGHT,
            UNROLL,
            THREADS,
            VEC,
        )


# ------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------

#: Autotuned configurations, ``(logits per thread per step, num_warps)`` by logit size in
#: bytes. A step covers ``UNROLL·THREADS·VEC`` logits of a row with ``THREADS = 32·num_warps``,
#: ``VEC`` adjacent logits per load (16 bytes: 4 in fp32, 8 in bf16/fp16; fewer only where a
#: thread takes fewer logits) and ``UNROLL`` loads in flight per thread and input. Every entry
#: compiles to < 64 registers without spills (benchmarks/results/triton_ptxas.md): light
#: flavours take up to 16 logits per thread, heavy ones (more values live per logit: label
#: smoothing, class weights, argmax) 8; KL reads two rows per step, so half of that again.
CE_SHAPES = {4: ((8, 8), (4, 8), (8, 16), (8, 4)), 2: ((16, 8), (8, 8), (16, 16), (8, 4))}
CE_HEAVY_SHAPES = {4: ((8, 8), (4, 16), (8, 4)), 2: ((8, 8), (8, 4))}
#: persistent grid: programs per SM (a program is 4–16 warps; ≥ 32 warps resident per SM)
PROGRAMS_PER_SM = 4
#: interpreter: rows per program step (ROWS; 1 on a GPU) and programs (two, so the striding
#: runs): its cost is per operation, so it batches rows through the same configuration
INTERP_ROWS = 32
INTERP_PROGRAMS = 2


def configs_for(dtype: torch.dtype, shapes: dict[int, tuple]) -> list[triton.Config]:
    """The autotuned configurations for logits of ``dtype`` from a table like ``CE_SHAPES``."""
    size = torch.empty((), dtype=dtype).element_size()
    configs = []
    for per_thread, warps in shapes[size]:
        vec = min(16 // size, per_thread)
        kwargs = dict(ROWS=1, UNROLL=per_thread // vec, THREADS=32 * warps, VEC=vec)
        configs.append(triton.Config(kwargs, num_warps=warps, num_stages=1))
    return configs


def step_width(cfg: triton.Config) -> int:
    """Columns of a row one vocabulary step of ``cfg`` covers."""
    return cfg.kwargs["UNROLL"] * cfg.kwargs["THREADS"] * cfg.kwargs["VEC"]


def prune_configs(configs: list[triton.Config], V: int) -> list[triton.Config]:
    """The configurations worth timing for ``V`` columns: those whose step is no wider than
    the row (or, for a narrow row, the narrowest)."""
    narrowest = min(step_width(c) for c in configs)
    return [c for c in configs if step_width(c) <= max(V, narrowest)]


def interpreter_config(configs: list[triton.Config], V: int) -> triton.Config:
    """The configuration the interpreter runs (autotuning would time Python there): the first
    of :func:`prune_configs`, deterministic for a given ``V``."""
    return prune_configs(configs, V)[0]


def triton_interpreter_active() -> bool:
    """Whether Triton was imported with ``TRITON_INTERPRET=1`` (its library is interpreted)."""
    return isinstance(tl.zeros, InterpretedFunction)


def _interpreted(device: torch.device) -> bool:
    if triton_interpreter_active():
        return True
    if device.type != "cuda":
        raise ValueError(
            f"the triton backend needs CUDA tensors, got device {device}; to run it on CPU "
            "tensors set TRITON_INTERPRET=1 before triton is first imported"
        )
    return False


_VARIANTS: dict[tuple[int, bool], Any] = {}


def kernel_variant(kernel: Any, interpreted: bool) -> Any:
    """The compiled (``JITFunction``) or interpreted flavour of a ``@triton.jit`` kernel,
    whatever ``TRITON_INTERPRET`` was when its module was imported."""
    want = InterpretedFunction if interpreted else JITFunction
    if isinstance(kernel, want):
        return kernel
    key = (id(kernel), interpreted)
    if key not in _VARIANTS:
        _VARIANTS[key] = want(kernel.fn)
    return _VARIANTS[key]


_TUNERS: dict[tuple[Any, ...], Any] = {}


def launch(
    kernel: Any,
    shapes: dict[int, tuple],
    x: Tensor,
    n_rows: int,
    V: int,
    *args: Any,
    **constexprs: Any,
) -> None:
    """Run ``kernel(*args, **constexprs)`` over ``n_rows`` rows of ``V`` columns of ``x`` on a
    persistent grid (``min(n_rows, SMs × PROGRAMS_PER_SM)`` programs, rows strided).

    On a GPU the configuration is autotuned by ``triton.autotune`` over
    :func:`configs_for` ``(x.dtype, shapes)`` once per ``V`` and dtype, for each kernel flavour
    (its constexpr flags); ``x`` is restored after every timing run, since the kernels write
    over it. Under the interpreter it is :func:`interpreter_config`.
    """
    configs = configs_for(x.dtype, shapes)
    if _interpreted(x.device):
        cfg = interpreter_config(configs, V)
        grid = (min(triton.cdiv(n_rows, INTERP_ROWS), INTERP_PROGRAMS),)
        kernel_variant(kernel, True)[grid](
            *args, **constexprs, **{**cfg.kwargs, "ROWS": INTERP_ROWS}, num_warps=cfg.num_warps
        )
        return
    key = (id(kernel), x.dtype, id(shapes), *sorted(constexprs.items()))
    if key not in _TUNERS:
        _TUNERS[key] = triton.autotune(
            configs=configs,
            key=["V"],
            prune_configs_by={"early_config_prune": _prune_hook},
            restore_value=["x_ptr"],
        )(kernel_variant(kernel, False))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (min(n_rows, sms * PROGRAMS_PER_SM),)

    _TUNERS[key][grid](*args, **constexprs)


def _prune_hook(configs: list[triton.Config], nargs: dict[str, Any], **_: Any) -> list:
    """``triton.autotune``'s early pruning: :func:`prune_configs` at the launch's ``V``."""
    return prune_configs(configs, nargs["V"])


def _check(x: Tensor, **rows: Tensor | None) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [n, V] with unit column stride, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be fp32, bf16 or fp16, got {x.dtype}")
    n = x.shape[0]
    for name, t in rows.items():
        if t is not None and (t.shape != (n,) or t.device != x.device):
            raise ValueError(f"{name} must be [{n}] on {x.device}, got {tuple(t.shape)}")


def _shapes(math: CERowMath) -> dict[int, tuple]:
    """``CE_HEAVY_SHAPES`` for the options that keep more values live per logit."""
    return CE_HEAVY_SHAPES if math.label_smoothing > 0 or math.argmax else CE_SHAPES


def _softcap_args(softcap: float | None) -> tuple[float, float]:
    if softcap is None:
        return 1.0, 1.0
    if not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    return float(softcap), 1.0 / float(softcap)


def _options(
    math: CERowMath, class_weight: Tensor | None, vocab: int, like: Tensor
) -> dict[str, Any]:
    """Kernel arguments of ``math`` and ``class_weight`` (a dummy pointer without it)."""
    cap, inv_cap = _softcap_args(math.softcap)
    weighted = class_weight is not None
    return {
        "cw": class_weight.float().contiguous() if weighted else like,
        "scalars": (
            cap,
            inv_cap,
            math.label_smoothing,
            math.class_weight_sum if weighted else float(vocab),
            math.lse_square_scale,
            int(math.token_scaling),
        ),
        "constexprs": {
            "HAS_SOFTCAP": math.softcap is not None,
            "SMOOTH": math.label_smoothing > 0,
            "HAS_CLASS_WEIGHT": weighted,
        },
    }


def ce_forward(
    x: Tensor,
    target: Tensor,
    grad_scale: Tensor | None,
    math: CERowMath,
    class_weight: Tensor | None = None,
) -> CERows:
    """Per-row ``ℓ_i`` of :class:`~unlearn_kernels._options.CERowMath` (fp32 ``[n]``),
    ``lse(z_i)`` (fp64 ``[n]``, exact to fp32's ``hi + lo`` pair, for :func:`ce_backward`) and,
    when asked, the z-loss part and the argmax.

    With ``grad_scale`` (fp32 ``[n]``), ``x`` is overwritten in place (in its dtype) by
    ``∂(grad_scale_i ℓ_i)/∂x_i``; this costs one more read and one write of ``x``.
    """
    _check(x, target=target, grad_scale=grad_scale)
    n, V = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    lse_lo = torch.empty_like(lse)
    z_part = torch.empty_like(lse) if math.z_loss else None
    argmax = torch.empty(n, dtype=torch.int64, device=x.device) if math.argmax else None
    if n == 0:
        return CERows(loss, lse.double(), z_part, argmax)
    if V == 0:
        raise ValueError("x must have at least one column")
    has_grad = grad_scale is not None
    scale = grad_scale.float().contiguous() if has_grad else lse  # dummy pointer when unused
    opts = _options(math, class_weight, V, lse)
    launch(
        _ce_fwd_kernel,
        _shapes(math),
        x,
        n,
        V,
        x,
        target.contiguous(),
        scale,
        opts["cw"],
        loss,
        lse,
        lse_lo,
        lse if z_part is None else z_part,
        target if argmax is None else argmax,
        n,
        V,
        x.stride(0),
        *opts["scalars"],
        HAS_GRAD=has_grad,
        RETURN_Z=math.z_loss,
        ARGMAX=math.argmax,
        **opts["constexprs"],
    )
    return CERows(loss, lse.double() + lse_lo.double(), z_part, argmax)


def ce_backward(
    x: Tensor,
    target: Tensor,
    lse: Tensor,
    grad_scale: Tensor,
    math: CERowMath,
    class_weight: Tensor | None = None,
) -> None:
    """Recompute-mode backward: overwrite ``x`` with the gradient of :func:`ce_forward`.

    Uses the saved fp64 ``lse`` (split into fp32 ``hi + lo``) instead of a second reduction
    pass: one read and one write.
    """
    _check(x, target=target, lse=lse, grad_scale=grad_scale)
    n, V = x.shape
    if n == 0:
        return
    hi, lo = split_lse(lse.contiguous(), torch.float32)
    opts = _options(math, class_weight, V, hi)
    launch(
        _ce_bwd_kernel,
        _shapes(math),
        x,
        n,
        V,
        x,
        target.contiguous(),
        hi,
        lo,
        grad_scale.float().contiguous(),
        opts["cw"],
        n,
        V,
        x.stride(0),
        *opts["scalars"],
        **opts["constexprs"],
    )


# ------------------------------------------------------------------------------------------
# ahead-of-time compile cases, read by benchmarks/triton_ptxas.py
# ------------------------------------------------------------------------------------------


_DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def config_tag(cfg: triton.Config) -> str:
    """``U2xV4xW8``: loads in flight per thread and input, logits per load, warps."""
    return f"U{cfg.kwargs['UNROLL']}xV{cfg.kwargs['VEC']}xW{cfg.num_warps}"


def ptxas_cases_for(
    name: str,
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    dtype: str,
    aligned_ints: tuple[str, ...],
    shapes: dict[int, tuple],
) -> list[dict[str, Any]]:
    """The compile cases (the dicts benchmarks/triton_ptxas.py reads) of the kernel flavour
    ``name`` (``"ce_fwd[bf16,grad=1]"``) for logits of ``dtype``: one per autotuned
    configuration (:func:`configs_for`), its tag added inside the brackets. Every pointer
    argument and ``aligned_ints`` are seen as 16-divisible, as the runtime sees
    caching-allocator pointers and V, row strides for V = 32000/128256/151936/152064/256000."""
    aligned = tuple(k for k, t in signature.items() if t.startswith("*")) + aligned_ints
    return [
        dict(
            name=f"{name[:-1]},{config_tag(cfg)}]",
            kernel=kernel,
            signature=signature,
            constexprs={**constexprs, **cfg.kwargs},
            aligned=aligned,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        for cfg in configs_for(_DTYPE_NAMES[dtype], shapes)
    ]


#: the runtime scalars of the cross-entropy kernels, after their pointers and row counts
_CE_SCALARS = {
    "softcap": "fp32",
    "inv_softcap": "fp32",
    "eps": "fp32",
    "class_sum": "fp32",
    "z_scale": "fp32",
    "token_scaling": "i32",
}


def _ptxas_cases() -> list[dict[str, Any]]:
    """Each kernel × dtype × gradient × softcap × configuration, with every option off and with
    every option on (weighted label smoothing, z-loss part, argmax: the most registers)."""
    cases: list[dict[str, Any]] = []
    for dt in _DTYPE_NAMES:
        fwd = {
            "x_ptr": f"*{dt}",
            "target_ptr": "*i64",
            "grad_scale_ptr": "*fp32",
            "cw_ptr": "*fp32",
            "loss_ptr": "*fp32",
            "lse_ptr": "*fp32",
            "lse_lo_ptr": "*fp32",
            "z_part_ptr": "*fp32",
            "argmax_ptr": "*i64",
            "n_rows": "i32",
            "V": "i32",
            "stride_x": "i32",
            **_CE_SCALARS,
        }
        bwd = {
            "x_ptr": f"*{dt}",
            "target_ptr": "*i64",
            "lse_ptr": "*fp32",
            "lse_lo_ptr": "*fp32",
            "grad_scale_ptr": "*fp32",
            "cw_ptr": "*fp32",
            "n_rows": "i32",
            "V": "i32",
            "stride_x": "i32",
            **_CE_SCALARS,
        }
        for options in (False, True):
            flags = dict(SMOOTH=options, HAS_CLASS_WEIGHT=options)
            tag = ",options" if options else ""
            for softcap in (False, True):
                for grad in (False, True):
                    cases += ptxas_cases_for(
                        f"ce_fwd[{dt},grad={int(grad)},softcap={int(softcap)}{tag}]",
                        _ce_fwd_kernel,
                        fwd,
                        dict(
                            HAS_GRAD=grad,
                            HAS_SOFTCAP=softcap,
                            RETURN_Z=options,
                            ARGMAX=options,
                            **flags,
                        ),
                        dt,
                        ("V", "stride_x"),
                        CE_HEAVY_SHAPES if options else CE_SHAPES,
                    )
                cases += ptxas_cases_for(
                    f"ce_bwd[{dt},softcap={int(softcap)}{tag}]",
                    _ce_bwd_kernel,
                    bwd,
                    dict(HAS_SOFTCAP=softcap, **flags),
                    dt,
                    ("V", "stride_x"),
                    CE_HEAVY_SHAPES if options else CE_SHAPES,
                )
    return cases


PTXAS_CASES = _ptxas_cases()
