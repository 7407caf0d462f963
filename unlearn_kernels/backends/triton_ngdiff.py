"""Triton NGDiff combine (backend ``"triton"``): the two sweeps of
:func:`unlearn_kernels.ops.ngdiff.ngdiff_combine`, same contract as
:func:`unlearn_kernels.backends.torch_backend.ngdiff_sums` / ``ngdiff_write``::

    ngdiff_sums:   [‖F‖², ‖R‖², ⟨F,R⟩]    float64 [3] on the device
    ngdiff_write:  out_j = a·R_j + b·F_j   with [a, b] = coef (device fp32 [2]);
                   a zero coefficient drops its term (a NaN there never reaches out)

Work is cut into items of ``ITEM`` elements that never straddle a segment; one program owns
one item, walks it in ``BLOCK``-wide steps with fp32 per-lane accumulators and stores three
partial sums and two scales (an item whose max ``|x|`` is below ``2^-40`` is summed again
scaled by a power of two, so a nonzero gradient never reads as norm 0). The partials are
unscaled and added in item order in float64 by torch, so the result is deterministic (no
atomics) and no host synchronisation is needed: the coefficients stay on the device between
the sweeps.

Two kernel flavours per sweep: ``*_flat`` takes the pointers of one segment (the flat-buffer
fast path; the compiler sees 16-byte-aligned pointers and vectorises the loads), ``*_table``
reads each item's segment pointers from an int64 address table (one launch per dtype for a
list of separately allocated tensors; those pointers carry no alignment facts). Every load is
cast to fp32 at once and the store rounds back to nearest even (by hand for bf16, see
:func:`_to_element`), which keeps the interpreter (``TRITON_INTERPRET=1``) exact too.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_cross_entropy import device_function, kernel_variant, triton_interpreter_active

__all__ = ["PTXAS_CASES", "ngdiff_sums", "ngdiff_write"]

# GPU: 64k elements per program (a 40M-parameter list gives ~600 programs), 2048-wide steps
# over 8 warps: 8 elements per thread (two 16-byte fp32 loads per tensor), ≤ 48 registers.
GPU_ITEM = 1 << 16
GPU_BLOCK = 2048
GPU_NUM_WARPS = 8
# Interpreter: its cost is per step and per program, so one big step per program.
INTERP_ITEM = 1 << 16
INTERP_BLOCK = 1 << 16

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@device_function
def _range_sums(f_ptr, r_ptr, begin, end, sf, sr, BLOCK: tl.constexpr):
    """fp32 ``(Σ(sf·f)², Σ(sr·r)², Σ(sf·f)(sr·r))`` over elements ``[begin, end)``."""
    ff = tl.zeros([BLOCK], tl.float32)
    rr = tl.zeros([BLOCK], tl.float32)
    fr = tl.zeros([BLOCK], tl.float32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sf
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sr
        ff += f * f
        rr += r * r
        fr += f * r
    return tl.sum(ff, axis=0), tl.sum(rr, axis=0), tl.sum(fr, axis=0)


@device_function
def _range_max(x_ptr, begin, end, BLOCK: tl.constexpr):
    """fp32 ``max |x|`` over ``[begin, end)`` (a NaN may be skipped: see :func:`_item_sums`)."""
    m = tl.zeros([BLOCK], tl.float32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.abs(tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)))
    return tl.max(m, axis=0)


@device_function
def _tiny_scale(m):
    """``2^-e`` bringing ``m`` into ``[0.5, 1)`` (``e`` its ``frexp`` exponent; ``2^126`` for a
    subnormal ``m``) when ``0 < m < 2^-40``, else 1: torch_backend.tiny_scale on the bits."""
    biased = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    scale = ((253 - biased) << 23).to(tl.float32, bitcast=True)
    return tl.where((m > 0.0) & (m < 9.094947017729282e-13), scale, 1.0)


@device_function
def _item_sums(f_ptr, r_ptr, partial_ptr, pid, begin, end, BLOCK: tl.constexpr):
    """Store ``(Σf², Σr², Σf·r)`` of ``[begin, end)`` scaled by ``(sf, sr)``, and the scales.
    A side with max ``|x| < 2^-40`` has ``Σx² < 2^-60`` (an item holds at most ``2^16``
    elements): only then is its max read and, if tiny (:func:`_tiny_scale`), the item summed
    again scaled; torch unscales in float64. The max only decides the rescaling, so a NaN it
    skips still leaves the sums NaN."""
    ff, rr, fr = _range_sums(f_ptr, r_ptr, begin, end, 1.0, 1.0, BLOCK)
    sf = tl.full((), 1.0, tl.float32)
    sr = tl.full((), 1.0, tl.float32)
    if ff < 8.673617379884035e-19:  # 2^-60
        sf = _tiny_scale(_range_max(f_ptr, begin, end, BLOCK))
    if rr < 8.673617379884035e-19:
        sr = _tiny_scale(_range_max(r_ptr, begin, end, BLOCK))
    if (sf != 1.0) | (sr != 1.0):
        ff, rr, fr = _range_sums(f_ptr, r_ptr, begin, end, sf, sr, BLOCK)
    tl.store(partial_ptr + 5 * pid, ff)
    tl.store(partial_ptr + 5 * pid + 1, rr)
    tl.store(partial_ptr + 5 * pid + 2, fr)
    tl.store(partial_ptr + 5 * pid + 3, sf)
    tl.store(partial_ptr + 5 * pid + 4, sr)


@device_function
def _to_element(x, ptr):
    """fp32 ``x`` cast to ``ptr``'s element type, rounded to nearest even. For bf16 the
    rounding is done on the bits (then the cast is exact), because the interpreter's
    fp32 → bf16 cast truncates; compiled code gets the same result either way."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@device_function
def _range_write(f_ptr, r_ptr, o_ptr, begin, end, a, b, BLOCK: tl.constexpr):
    """``o = a·r + b·f`` over ``[begin, end)``; a zero coefficient drops its term."""
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(a != 0.0, a * r, 0.0) + tl.where(b != 0.0, b * f, 0.0)
        tl.store(o_ptr + offs, _to_element(d, o_ptr), mask=mask)


@triton.jit
def _sums_flat(f_ptr, r_ptr, partial_ptr, n, ITEM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    begin = pid.to(tl.int64) * ITEM
    end = tl.minimum(begin + ITEM, n)
    _item_sums(f_ptr, r_ptr, partial_ptr, pid, begin, end, BLOCK)


@triton.jit
def _sums_table(f_tab, r_tab, items, partial_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(items + 3 * pid)
    begin = tl.load(items + 3 * pid + 1)
    end = tl.load(items + 3 * pid + 2)
    f_ptr = tl.load(f_tab + seg).to(tl.pointer_type(DTYPE))
    r_ptr = tl.load(r_tab + seg).to(tl.pointer_type(DTYPE))
    _item_sums(f_ptr, r_ptr, partial_ptr, pid, begin, end, BLOCK)


@triton.jit
def _write_flat(f_ptr, r_ptr, o_ptr, coef_ptr, n, ITEM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    begin = pid.to(tl.int64) * ITEM
    end = tl.minimum(begin + ITEM, n)
    _range_write(f_ptr, r_ptr, o_ptr, begin, end, tl.load(coef_ptr), tl.load(coef_ptr + 1), BLOCK)


@triton.jit
def _write_table(f_tab, r_tab, o_tab, items, coef_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(items + 3 * pid)
    begin = tl.load(items + 3 * pid + 1)
    end = tl.load(items + 3 * pid + 2)
    f_ptr = tl.load(f_tab + seg).to(tl.pointer_type(DTYPE))
    r_ptr = tl.load(r_tab + seg).to(tl.pointer_type(DTYPE))
    o_ptr = tl.load(o_tab + seg).to(tl.pointer_type(DTYPE))
    _range_write(f_ptr, r_ptr, o_ptr, begin, end, tl.load(coef_ptr), tl.load(coef_ptr + 1), BLOCK)


def _config(device: torch.device) -> tuple[bool, int, int, int]:
    """``(interpreted, ITEM, BLOCK, num_warps)``."""
    if triton_interpreter_active():
        if device.type != "cpu":
            raise ValueError(
                f"under TRITON_INTERPRET=1 the NGDiff kernels need CPU tensors, got {device}"
            )
        return True, INTERP_ITEM, INTERP_BLOCK, 4
    if device.type != "cuda":
        raise ValueError(
            f"the triton backend needs CUDA tensors, got device {device}; to run it on CPU "
            "tensors set TRITON_INTERPRET=1 before triton is first imported"
        )
    return False, GPU_ITEM, GPU_BLOCK, GPU_NUM_WARPS


def _groups(segments: list[Tensor]) -> list[list[int]]:
    """Segment indices grouped by dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, s in enumerate(segments):
        groups.setdefault(s.dtype, []).append(i)
    return list(groups.values())


def _table(tensors: list[Tensor], device: torch.device) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)


def _items(segments: list[Tensor], item: int, device: torch.device) -> Tensor:
    """int64 ``[n_items, 3]``: (segment, begin, end) for fixed ``item``-sized pieces."""
    rows = [
        (s, b, min(b + item, t.numel()))
        for s, t in enumerate(segments)
        for b in range(0, t.numel(), item)
    ]
    return torch.tensor(rows, dtype=torch.int64).to(device)


def ngdiff_sums(forget: list[Tensor], retain: list[Tensor]) -> Tensor:
    """``[‖F‖², ‖R‖², ⟨F,R⟩]`` (float64 ``[3]``, on the device) over contiguous 1-D segments."""
    device = forget[0].device
    interpreted, item, block, num_warps = _config(device)
    if len(forget) == 1:
        n = forget[0].numel()
        partial = torch.empty(triton.cdiv(n, item), 5, dtype=torch.float32, device=device)
        kernel_variant(_sums_flat, interpreted)[(partial.shape[0],)](
            forget[0], retain[0], partial, n, ITEM=item, BLOCK=block, num_warps=num_warps
        )
        return _unscaled_total(partial)
    partials = []
    for group in _groups(forget):
        fs, rs = [forget[i] for i in group], [retain[i] for i in group]
        items = _items(fs, item, device)
        partial = torch.empty(items.shape[0], 5, dtype=torch.float32, device=device)
        kernel_variant(_sums_table, interpreted)[(items.shape[0],)](
            _table(fs, device),
            _table(rs, device),
            items,
            partial,
            DTYPE=_TL_DTYPES[fs[0].dtype],
            BLOCK=block,
            num_warps=num_warps,
        )
        partials.append(partial)
    return _unscaled_total(torch.cat(partials))


def _unscaled_total(partial: Tensor) -> Tensor:
    """Item partials ``[n, 5]`` (three scaled sums, ``sf``, ``sr``) unscaled and added in
    item order, in float64."""
    p = partial.double()
    sf, sr = p[:, 3], p[:, 4]
    return (p[:, :3] / torch.stack([sf * sf, sr * sr, sf * sr], dim=1)).sum(0)


def ngdiff_write(
    forget: list[Tensor], retain: list[Tensor], out: list[Tensor], coef: Tensor
) -> None:
    """``out_j = a·R_j + b·F_j`` with ``[a, b] = coef`` (fp32 ``[2]`` on the device)."""
    device = forget[0].device
    interpreted, item, block, num_warps = _config(device)
    coef = coef.to(device=device, dtype=torch.float32).contiguous()
    if len(forget) == 1:
        n = forget[0].numel()
        kernel_variant(_write_flat, interpreted)[(triton.cdiv(n, item),)](
            forget[0], retain[0], out[0], coef, n, ITEM=item, BLOCK=block, num_warps=num_warps
        )
        return
    for group in _groups(forget):
        fs = [forget[i] for i in group]
        items = _items(fs, item, device)
        kernel_variant(_write_table, interpreted)[(items.shape[0],)](
            _table(fs, device),
            _table([retain[i] for i in group], device),
            _table([out[i] for i in group], device),
            items,
            coef,
            DTYPE=_TL_DTYPES[fs[0].dtype],
            BLOCK=block,
            num_warps=num_warps,
        )


# ------------------------------------------------------------------------------------------
# ahead-of-time compile cases, read by benchmarks/triton_ptxas.py
# ------------------------------------------------------------------------------------------


def _ptxas_cases() -> list[dict[str, Any]]:
    """Both sweeps × both flavours × fp32/bf16/fp16 at the GPU configuration. Flat-path
    pointers come from the caching allocator (16-byte aligned); table-path pointers are
    loaded at run time, so only the tables themselves are aligned arguments."""
    cases: list[dict[str, Any]] = []
    for dt, tl_dt in (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)):
        cases.append(
            dict(
                name=f"ngdiff_sums_flat[{dt}]",
                kernel=_sums_flat,
                signature={
                    "f_ptr": f"*{dt}",
                    "r_ptr": f"*{dt}",
                    "partial_ptr": "*fp32",
                    "n": "i64",
                },
                constexprs=dict(ITEM=GPU_ITEM, BLOCK=GPU_BLOCK),
                aligned=("f_ptr", "r_ptr", "partial_ptr"),
                num_warps=GPU_NUM_WARPS,
            )
        )
        cases.append(
            dict(
                name=f"ngdiff_write_flat[{dt}]",
                kernel=_write_flat,
                signature={
                    "f_ptr": f"*{dt}",
                    "r_ptr": f"*{dt}",
                    "o_ptr": f"*{dt}",
                    "coef_ptr": "*fp32",
                    "n": "i64",
                },
                constexprs=dict(ITEM=GPU_ITEM, BLOCK=GPU_BLOCK),
                aligned=("f_ptr", "r_ptr", "o_ptr", "coef_ptr"),
                num_warps=GPU_NUM_WARPS,
            )
        )
        cases.append(
            dict(
                name=f"ngdiff_sums_table[{dt}]",
                kernel=_sums_table,
                signature={
                    "f_tab": "*i64",
                    "r_tab": "*i64",
                    "items": "*i64",
                    "partial_ptr": "*fp32",
                },
                constexprs=dict(DTYPE=tl_dt, BLOCK=GPU_BLOCK),
                aligned=("f_tab", "r_tab", "items", "partial_ptr"),
                num_warps=GPU_NUM_WARPS,
            )
        )
        cases.append(
            dict(
                name=f"ngdiff_write_table[{dt}]",
                kernel=_write_table,
                signature={
                    "f_tab": "*i64",
                    "r_tab": "*i64",
                    "o_tab": "*i64",
                    "items": "*i64",
                    "coef_ptr": "*fp32",
                },
                constexprs=dict(DTYPE=tl_dt, BLOCK=GPU_BLOCK),
                aligned=("f_tab", "r_tab", "o_tab", "items", "coef_ptr"),
                num_warps=GPU_NUM_WARPS,
            )
        )
    return cases


PTXAS_CASES = _ptxas_cases()
