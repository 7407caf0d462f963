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
under the constexpr flags, a per-lane sum of ``c_v (z_v − z_y)`` in pass 1 and a ``(ε/V) c_v``
term in pass 2 (``SMOOTH``, ``HAS_CLASS_WEIGHT``) and the first column of the running maximum
(``ARGMAX``).

Kernel layout: one program owns ``BLOCK_N`` rows (1 on a GPU with a real vocabulary) and
walks the vocabulary in ``BLOCK_V`` columns. Pass 1 keeps a running row max (one max
reduction per block) and per-lane partial sums of ``exp(z − max)`` rescaled when the max
grows (one ``exp`` per logit, never of an unshifted value, one sum per row); pass 2 re-reads
the row and writes the gradient over it. Every load is cast to fp32 at once and the store
rounds back to nearest-even (bf16 by integer arithmetic, see :func:`_cast_rne`), which is
also what keeps the interpreter (``TRITON_INTERPRET=1``, whose bf16 arithmetic and bf16 cast
are wrong) exact.

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
    an interpreted kernel does) it runs through the interpreter instead of raising.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        interpreted = self.__dict__.get("_interpreted")
        if interpreted is None:
            interpreted = self.__dict__["_interpreted"] = InterpretedFunction(self.fn)
        return interpreted(*args, **kwargs)


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
    """``a (P p − (ε/V) w)`` off the target, ``a (P p − c_eps)`` at it."""
    if SMOOTH:
        off = tl.where(is_target, c_eps[:, None], eps_v * w)
    else:
        off = tl.where(is_target, c_eps[:, None], 0.0)
    return (p * big_p[:, None] - off) * a[:, None]


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
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per-row ``loss``/``lse`` (and, as asked, the z-loss part and the argmax); with
    ``HAS_GRAD`` also the gradient written over ``x``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    row_off = rows.to(tl.int64) * stride_x
    cols0 = tl.arange(0, BLOCK_V)
    tgt = tl.load(target_ptr + rows, mask=row_ok, other=0)
    x_t = tl.load(x_ptr + row_off + tgt, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x_t, _ = _softcap(x_t, softcap, inv_softcap)

    # ---- pass 1: online max / rescaled sum, fp32 -------------------------------------------
    # m: running row max (one reduction per block); acc: per-lane partial sums of exp(z − m),
    # rescaled by the scalar exp(m_old − m_new) and reduced once per row after the loop.
    # SMOOTH: spread, per-lane partial sums of c_v (z_v − z_y); ARGMAX: the first column of m.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if SMOOTH:
        spread = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if ARGMAX:
        arg = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0)
        z = x.to(tl.float32)
        if HAS_SOFTCAP:
            z, e = _softcap(z, softcap, inv_softcap)
        if SMOOTH:
            d = tl.where(mask, z - x_t[:, None], 0.0)
            if HAS_CLASS_WEIGHT:
                w = tl.load(cw_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                d = d * w[None, :]
            spread += d
        z = tl.where(mask, z, float("-inf"))
        block_max = tl.max(z, axis=1)
        if ARGMAX:  # the block's first column holding its maximum, if that beats the row's
            first = tl.min(tl.where(z == block_max[:, None], cols[None, :], V), axis=1)
            arg = tl.where(block_max > m, first, arg)
        m_new = tl.maximum(m, block_max)
        # padding rows keep m = −inf: shift them by 0 instead (exp(−inf − 0) = 0, no NaN)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - shift)[:, None] + tl.exp(z - shift[:, None])
        m = m_new
    s = tl.sum(acc, axis=1)

    # lse = m + log s. Kept apart: z − m is exact for the logits that matter (Sterbenz), so
    # exp((z − m) − log s) and (m − z_y) + log s stay accurate when |z| is large (1e4: the
    # fp32 rounding of lse alone would be 2e-3 there). Padding rows (s = 0, m = −inf) get
    # m = 0, log s = 0, so pass 2 stays finite on them too.
    m = tl.where(row_ok, m, 0.0)
    log_s = tl.log(tl.where(row_ok, s, 1.0))
    # lse leaves as the pair hi + lo (hi = fl(m + log s), lo its rounding error, exact by
    # Fast2Sum since |m| ≥ |log s| wherever it matters): the backward rebuilds exp(z − lse)
    # as exp((z − hi) − lo) at full precision.
    lse_hi = m + log_s
    tl.store(lse_ptr + rows, lse_hi, mask=row_ok)
    tl.store(lse_lo_ptr + rows, (m - lse_hi) + log_s, mask=row_ok)
    if ARGMAX:
        tl.store(argmax_ptr + rows, arg.to(tl.int64), mask=row_ok)

    # ---- the row's loss (CERowMath): every option off leaves loss = nll ----------------------
    nll = (m - x_t) + log_s
    c_y = tl.full([BLOCK_N], 1.0, tl.float32)
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

    # ---- pass 2: gradient over x ------------------------------------------------------------
    if HAS_GRAD:
        scale = tl.load(grad_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        a, big_p, c_eps = _row_factors(
            nll, lse_hi, scale, c_y, eps, inv_v, class_sum, z_scale, token_scaling
        )
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = row_ok[:, None] & (cols < V)[None, :]
            ptrs = x_ptr + row_off[:, None] + cols[None, :]
            x = tl.load(ptrs, mask=mask, other=0.0)
            z = x.to(tl.float32)
            if HAS_SOFTCAP:
                z, e = _softcap(z, softcap, inv_softcap)
            p = tl.exp((z - m[:, None]) - log_s[:, None])
            w = 1.0
            if HAS_CLASS_WEIGHT and SMOOTH:
                w = tl.load(cw_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
            g = _grad_tile(
                p, cols[None, :] == tgt[:, None], a, big_p, c_eps, w, eps * inv_v, SMOOTH
            )
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
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Recompute mode: gradient over ``x`` from the saved ``lse = hi + lo`` (pass 2 of the
    forward)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    row_off = rows.to(tl.int64) * stride_x
    cols0 = tl.arange(0, BLOCK_V)
    tgt = tl.load(target_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    lse_lo = tl.load(lse_lo_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    scale = tl.load(grad_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    x_t = tl.load(x_ptr + row_off + tgt, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x_t, _ = _softcap(x_t, softcap, inv_softcap)
    c_y = tl.full([BLOCK_N], 1.0, tl.float32)
    if HAS_CLASS_WEIGHT:
        c_y = tl.load(cw_ptr + tgt, mask=row_ok, other=0.0).to(tl.float32)
    inv_v = 1.0 / V
    nll = (lse - x_t) + lse_lo
    a, big_p, c_eps = _row_factors(
        nll, lse, scale, c_y, eps, inv_v, class_sum, z_scale, token_scaling
    )
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = row_ok[:, None] & (cols < V)[None, :]
        ptrs = x_ptr + row_off[:, None] + cols[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0)
        z = x.to(tl.float32)
        if HAS_SOFTCAP:
            z, e = _softcap(z, softcap, inv_softcap)
        p = tl.exp((z - lse[:, None]) - lse_lo[:, None])
        w = 1.0
        if HAS_CLASS_WEIGHT and SMOOTH:
            w = tl.load(cw_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
        g = _grad_tile(p, cols[None, :] == tgt[:, None], a, big_p, c_eps, w, eps * inv_v, SMOOTH)
        if HAS_SOFTCAP:
            one_e = 1.0 + e
            g = g * (4.0 * e / (one_e * one_e))
        tl.store(ptrs, _cast_rne(g, x_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------

# GPU: one row per program for a real vocabulary (V = 32k–256k): 2048 columns per step over
# 8 warps = 8 logits per thread (one 16-byte load in bf16/fp16, two in fp32), 16–125 steps
# per row and a grid of n rows (thousands) to fill every SM. 4096 columns (16 per thread)
# needed 80 registers and spilled on sm_80 with fp32 + softcap + gradient; 2048 stays at
# ≤ 59 registers, ≥ 32 resident warps per SM (benchmarks/results/triton_ptxas.md). Small V
# packs several rows per program. Options that keep more live values per logit (label smoothing
# and the argmax in CE; softcap and the reverse KL / JSD in KL) need up to 80 registers at 8
# logits per thread: those kernels run 16 warps (4 logits per thread per step; 32–54
# registers, the same ≥ 32 resident warps).
GPU_BLOCK_V = 2048
GPU_NUM_WARPS = 8
GPU_HEAVY_NUM_WARPS = 16
# Interpreter: its cost is per step and per program, not per element, so use big tiles.
INTERP_BLOCK_V = 8192
INTERP_TILE = 1 << 16


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


def launch_config(n: int, V: int, interpreted: bool, heavy: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_V, num_warps)`` for an ``[n, V]`` chunk; ``heavy`` for a kernel
    flavour with more live values per logit (see ``GPU_HEAVY_NUM_WARPS``)."""
    if interpreted:
        block_v = min(triton.next_power_of_2(V), INTERP_BLOCK_V)
        block_n = max(1, min(triton.next_power_of_2(n), INTERP_TILE // block_v))
        return block_n, block_v, 4
    block_v = min(triton.next_power_of_2(V), GPU_BLOCK_V)
    block_n = max(1, min(triton.next_power_of_2(n), GPU_BLOCK_V // block_v))
    num_warps = GPU_NUM_WARPS if block_n * block_v >= 2048 else 4
    if heavy and num_warps == GPU_NUM_WARPS:
        num_warps = GPU_HEAVY_NUM_WARPS
    return block_n, block_v, num_warps


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


def _check(x: Tensor, **rows: Tensor | None) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [n, V] with unit column stride, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be fp32, bf16 or fp16, got {x.dtype}")
    n = x.shape[0]
    for name, t in rows.items():
        if t is not None and (t.shape != (n,) or t.device != x.device):
            raise ValueError(f"{name} must be [{n}] on {x.device}, got {tuple(t.shape)}")


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
    interpreted = _interpreted(x.device)
    heavy = math.label_smoothing > 0 or math.argmax
    block_n, block_v, num_warps = launch_config(n, V, interpreted, heavy)
    has_grad = grad_scale is not None
    scale = grad_scale.float().contiguous() if has_grad else lse  # dummy pointer when unused
    opts = _options(math, class_weight, V, lse)
    kernel_variant(_ce_fwd_kernel, interpreted)[(triton.cdiv(n, block_n),)](
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
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        num_warps=num_warps,
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
    interpreted = _interpreted(x.device)
    block_n, block_v, num_warps = launch_config(n, V, interpreted, math.label_smoothing > 0)
    hi, lo = split_lse(lse.contiguous(), torch.float32)
    opts = _options(math, class_weight, V, hi)
    kernel_variant(_ce_bwd_kernel, interpreted)[(triton.cdiv(n, block_n),)](
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
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


# ------------------------------------------------------------------------------------------
# ahead-of-time compile cases, read by benchmarks/triton_ptxas.py
# ------------------------------------------------------------------------------------------


def ptxas_case(
    name: str,
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int,
    aligned_ints: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One compile case (the dict benchmarks/triton_ptxas.py reads); every pointer argument and
    ``aligned_ints`` are seen as 16-divisible, as the runtime sees caching-allocator pointers
    and V, row strides for V = 32000/128256/151936/152064/256000."""
    aligned = tuple(k for k, t in signature.items() if t.startswith("*")) + aligned_ints
    return dict(
        name=name,
        kernel=kernel,
        signature=signature,
        constexprs=constexprs,
        aligned=aligned,
        num_warps=num_warps,
    )


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
    """Each kernel × dtype × gradient × softcap, with every option off and with every option on
    (weighted label smoothing, z-loss part, argmax: the most registers), at the GPU config for
    a real vocabulary."""
    block_n, block_v, num_warps = launch_config(4096, 128256, interpreted=False)
    heavy_warps = launch_config(4096, 128256, interpreted=False, heavy=True)[2]
    blocks = dict(BLOCK_N=block_n, BLOCK_V=block_v)
    cases: list[dict[str, Any]] = []
    for dt in ("fp32", "bf16", "fp16"):
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
                    cases.append(
                        ptxas_case(
                            f"ce_fwd[{dt},grad={int(grad)},softcap={int(softcap)}{tag}]",
                            _ce_fwd_kernel,
                            fwd,
                            dict(
                                HAS_GRAD=grad,
                                HAS_SOFTCAP=softcap,
                                RETURN_Z=options,
                                ARGMAX=options,
                                **flags,
                                **blocks,
                            ),
                            heavy_warps if options else num_warps,
                            ("V", "stride_x"),
                        )
                    )
                cases.append(
                    ptxas_case(
                        f"ce_bwd[{dt},softcap={int(softcap)}{tag}]",
                        _ce_bwd_kernel,
                        bwd,
                        dict(HAS_SOFTCAP=softcap, **flags, **blocks),
                        heavy_warps if options else num_warps,
                        ("V", "stride_x"),
                    )
                )
    return cases


PTXAS_CASES = _ptxas_cases()
