"""``torch.autocast`` for the fused ops: their matrix products follow autocast's dtype, as
``torch.mm`` would.

Under an enabled autocast region for the inputs' device, the public ops first cast the operands
of their products (hidden states, output weights, biases) to autocast's dtype, as autocast casts
``torch.mm``'s inputs (float64 is left alone, as autocast leaves it); the casts are ordinary
autograd ops, so gradients reach fp32 parameters in fp32. The autograd functions then run with
autocast off (:func:`autocast_off`), so every product inside sees exactly those dtypes and the
epilogues accumulate in fp32 as for any bf16/fp16 input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def autocast_cast(*tensors: Any) -> tuple[Any, ...]:
    """``tensors`` cast to autocast's dtype when autocast is enabled for the device of the first
    (floating tensors other than float64; anything else, ``None`` and non-tensors included, as
    given: the input checks that follow name them)."""
    first = tensors[0]
    if not isinstance(first, Tensor):
        return tensors
    device = first.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype)
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        else t
        for t in tensors
    )


def autocast_off(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run an autograd ``forward(ctx, first, ...)``/``backward(ctx, first, ...)`` with autocast
    disabled on the device of its first tensor argument."""

    @functools.wraps(method)
    def run(ctx: Any, first: Tensor, *rest: Any) -> Any:
        device = first.device.type
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return method(ctx, first, *rest)
        with torch.autocast(device, enabled=False):
            return method(ctx, first, *rest)

    return run
