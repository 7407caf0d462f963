"""NGDiff combine (docs/design.md §2): the normalised gradient difference of two task gradients.

Over lists of gradient tensors ``F_j`` (forget) and ``R_j`` (retain)::

    sweep 1:  ‖F‖², ‖R‖², ⟨F,R⟩            (one read of both lists, fp32 accumulation)
    sweep 2:  out_j = a·R_j + b·F_j,        a = 1/max(‖R‖, eps),  b = forget_sign/max(‖F‖, eps)

With the default ``forget_sign = −1`` and ``F``, ``R`` the gradients of the forget and retain
NLL, ``out = R/‖R‖ − F/‖F‖``: descending along it lowers the retain loss and raises the
forget loss (``⟨out, R⟩ = ‖R‖(1 − cos) ≥ 0``, ``⟨out, F⟩ = ‖F‖(cos − 1) ≤ 0``).

Tiny gradients: fp32 squares of elements below ~1e-19 lose precision and below ~1e-23 vanish,
so a piece of a segment whose max ``|x|`` lies in ``(0, 2^-40)`` is summed again after scaling
by an exact power of two and unscaled in float64 (every backend,
:func:`~unlearn_kernels.backends.torch_backend.tiny_scale`): a nonzero gradient never reads as
norm 0, and its direction term is kept whatever ``eps`` allows.

Zero and non-finite gradients (the documented rule, :func:`combine_coefficients`):

- a zero gradient (an empty forget batch) contributes nothing: its coefficient is set to 0 and
  the other task's unit direction is written;
- a gradient whose fp32 norm is not finite (it holds inf/NaN, or its squares overflow: an
  exploded gradient) is *dropped*: its coefficient is 0 and its tensors are never read by the
  write sweep, so no NaN reaches ``out``; with both dropped, ``out`` is all zeros.

``out`` therefore always holds finite values with ``|out_j| ≤ 2`` elementwise. The returned
norms report what was seen (inf/NaN included); the cosine is ``⟨F,R⟩/(max(‖F‖,eps)·
max(‖R‖,eps))`` (0 when a gradient is zero, NaN when a norm is not finite).

Fast path: tensors that are consecutive views of one flat buffer (for example LoRA gradients
allocated by :func:`unlearn_kernels.train.ngdiff.flat_like`) are coalesced into one segment,
so each sweep is a single pass over contiguous memory. Partial sums are taken over a fixed
partition of the segments, so every backend is bit-reproducible run to run.

Sharded gradients (FSDP2's ``fully_shard``: each process holds a shard of every gradient, a
``DTensor``): with ``process_group`` the three sums of the local shards are all-reduced (one
all-reduce of three float64 numbers) before the coefficients are formed, so the norms and the
cosine are global, and the write sweep stays one pass over the local shards. ``DTensor``
gradients are combined through their local tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from unlearn_kernels.backends import get_backend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NGDiffNorms(NamedTuple):
    """Global norms of the two task gradients and their cosine (fp32 scalar tensors)."""

    forget_norm: Tensor
    retain_norm: Tensor
    cosine: Tensor


class _Plan(NamedTuple):
    """Contiguous segments handed to a backend, and the copies back into ``out``."""

    forget: list[Tensor]
    retain: list[Tensor]
    out: list[Tensor]
    copy_back: list[tuple[Tensor, Tensor]]  # (user's out_j, segment written by the kernel)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (sharing its memory), else ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _as_list(name: str, value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if not isinstance(value, (Tensor, list, tuple)):
        raise ValueError(
            f"{name} must be a tensor or a list/tuple of tensors, got {type(value).__name__}"
        )
    tensors = [value] if isinstance(value, Tensor) else list(value)
    if not tensors:
        raise ValueError(f"{name} must hold at least one tensor")
    for j, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}[{j}] must be a torch.Tensor, got {type(t).__name__}")
    return [local_tensor(t) for t in tensors]


def _first(mismatch: list[bool]) -> int:
    return mismatch.index(True)


def _validate(
    forget: list[Tensor], retain: list[Tensor], out: list[Tensor], eps: float, forget_sign: float
) -> None:
    for name, value in (("eps", eps), ("forget_sign", forget_sign)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a float, got {type(value).__name__}")
    if not (torch.finfo(torch.float32).tiny <= eps < float("inf")):
        raise ValueError(f"eps must be a finite float ≥ 1.2e-38 (1/eps fits fp32), got {eps!r}")
    if float(forget_sign) not in (-1.0, 1.0):
        raise ValueError(f"forget_sign must be -1.0 or 1.0, got {forget_sign!r}")
    n = len(forget)
    device, shapes, dtypes = forget[0].device, [t.shape for t in forget], [t.dtype for t in forget]
    unsupported = [d not in SUPPORTED_DTYPES for d in dtypes]
    if any(unsupported):
        j = _first(unsupported)
        raise ValueError(f"forget_grads[{j}] must be float32, bfloat16 or float16, got {dtypes[j]}")
    for name, tensors in (("forget_grads", forget), ("retain_grads", retain), ("out", out)):
        if len(tensors) != n:
            raise ValueError(
                f"{name} must hold {n} tensors (one per forget_grads tensor), got {len(tensors)}"
            )
        wrong = [t.device != device for t in tensors]
        if any(wrong):
            j = _first(wrong)
            raise ValueError(
                f"{name}[{j}] is on {tensors[j].device}, expected {device} like forget_grads[0]"
            )
        wrong = [t.shape != s for t, s in zip(tensors, shapes, strict=True)]
        if any(wrong):
            j = _first(wrong)
            raise ValueError(
                f"{name}[{j}] must have shape {tuple(shapes[j])}, got {tuple(tensors[j].shape)}"
            )
        wrong = [t.dtype != d for t, d in zip(tensors, dtypes, strict=True)]
        if any(wrong):
            j = _first(wrong)
            raise ValueError(
                f"{name}[{j}] must be {dtypes[j]} like forget_grads[{j}], got {tensors[j].dtype}"
            )


def _inside_storage(t: Tensor, nbytes: int) -> bool:
    """Whether ``nbytes`` bytes from ``t``'s first element lie inside ``t``'s storage."""
    storage = t.untyped_storage()
    return t.data_ptr() + nbytes <= storage.data_ptr() + storage.nbytes()


def _plan(forget: list[Tensor], retain: list[Tensor], out: list[Tensor]) -> _Plan:
    """Segments for the backends: each maximal run of tensors that are back to back in memory
    in all three lists (views of one flat buffer) becomes one 1-D view of the first tensor's
    storage; any other tensor is its own segment (a contiguous copy if strided, written back
    for ``out``)."""
    plan = _Plan([], [], [], [])
    lists = (forget, retain, out)
    n = len(forget)
    pf, pr, po = ([t.data_ptr() for t in ts] for ts in lists)
    size = [t.nbytes for t in forget]  # the same in every list (shapes and dtypes match)
    dtype = [t.dtype for t in forget]
    contig = [
        a.is_contiguous() and b.is_contiguous() and c.is_contiguous()
        for a, b, c in zip(*lists, strict=True)
    ]
    # joins[k]: tensor k starts where tensor k - 1 ends, in all three lists
    joins = [False] + [
        contig[k]
        and contig[k - 1]
        and dtype[k] == dtype[k - 1]
        and pf[k] == pf[k - 1] + size[k - 1]
        and pr[k] == pr[k - 1] + size[k - 1]
        and po[k] == po[k - 1] + size[k - 1]
        for k in range(1, n)
    ]
    i = 0
    while i < n:
        k = i + 1
        if size[i] == 0:
            i = k
            continue
        if contig[i]:
            while k < n and joins[k]:
                k += 1
            nbytes = sum(size[i:k])
            if k > i + 1 and all(_inside_storage(ts[i], nbytes) for ts in lists):
                total = nbytes // forget[i].element_size()
                segment = [ts[i].as_strided((total,), (1,)) for ts in lists]
            else:
                k = i + 1
                segment = [forget[i], retain[i], out[i]]
        else:
            segment = [forget[i].contiguous(), retain[i].contiguous(), out[i]]
            if not out[i].is_contiguous():
                segment[2] = torch.empty_like(out[i], memory_format=torch.contiguous_format)
                plan.copy_back.append((out[i], segment[2]))
        plan.forget.append(segment[0])
        plan.retain.append(segment[1])
        plan.out.append(segment[2])
        i = k
    return plan


def combine_coefficients(
    forget_norm: Tensor, retain_norm: Tensor, *, eps: float = 1e-12, forget_sign: float = -1.0
) -> Tensor:
    """``[a, b]`` (fp32) with ``a = 1/max(‖R‖, eps)``, ``b = forget_sign/max(‖F‖, eps)``.

    The coefficient of a gradient whose norm is zero or not finite is 0: a zero gradient
    contributes nothing either way, and a non-finite one is dropped (never read).
    """
    norms = torch.stack([retain_norm, forget_norm])
    coef = torch.stack([1.0 / retain_norm.clamp_min(eps), forget_sign / forget_norm.clamp_min(eps)])
    return torch.where(norms.isfinite() & (norms > 0), coef, 0.0).float()


def ngdiff_combine(
    forget_grads: Tensor | Sequence[Tensor],
    retain_grads: Tensor | Sequence[Tensor],
    out: Tensor | Sequence[Tensor] | None = None,
    *,
    eps: float = 1e-12,
    forget_sign: float = -1.0,
    backend: str | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> NGDiffNorms:
    """Write ``out_j = R_j/max(‖R‖,eps) + forget_sign·F_j/max(‖F‖,eps)``; return the norms.

    ``forget_grads`` / ``retain_grads``: tensors (or one tensor) of matching shapes, fp32/bf16/
    fp16 (``F_j`` and ``R_j`` share a dtype; the list may mix dtypes), all on one device.
    ``out`` defaults to ``retain_grads`` (in place: in the NGDiff step the retain gradients
    are the parameters' ``.grad``, so the direction lands where the optimizer reads it);
    ``out_j`` may also be ``F_j`` or memory disjoint from both lists. Norms are global over
    the lists, accumulated in fp32 over a fixed partition and summed in float64. See the
    module docstring for zero and non-finite gradients. With ``process_group`` the lists are
    this process's shards of gradients sharded over the group (FSDP): the norms are global
    (every process of the group must call this).
    """
    forget = _as_list("forget_grads", forget_grads)
    retain = _as_list("retain_grads", retain_grads)
    outs = retain if out is None else _as_list("out", out)
    _validate(forget, retain, outs, eps, forget_sign)
    with torch.no_grad():
        plan = _plan(forget, retain, outs)
        kernels = get_backend(backend, forget[0].device)
        if plan.forget:
            sums = kernels.ngdiff_sums(plan.forget, plan.retain)
        else:  # every (local) tensor is empty
            sums = torch.zeros(3, dtype=torch.float64, device=forget[0].device)
        if process_group is not None:
            dist.all_reduce(sums, group=process_group)
        norms = sums[:2].sqrt()
        forget_norm, retain_norm = norms[0], norms[1]
        coef = combine_coefficients(forget_norm, retain_norm, eps=eps, forget_sign=forget_sign)
        if plan.forget:
            kernels.ngdiff_write(plan.forget, plan.retain, plan.out, coef)
        for dst, src in plan.copy_back:
            dst.copy_(src)
        cosine = sums[2] / (forget_norm.clamp_min(eps) * retain_norm.clamp_min(eps))
        cosine = torch.where(norms.isfinite().all(), cosine.clamp(-1.0, 1.0), float("nan"))
    return NGDiffNorms(forget_norm.float(), retain_norm.float(), cosine.float())
