"""Float64 oracles (DESIGN.md §5) and the helpers every kernel test shares."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from unlearn_kernels.backends import cpu_extension_available


def available_backends() -> list:
    """Every backend that can run on CPU tensors here, as pytest params.

    With ``UNLEARN_KERNELS_REQUIRE_ALL=1`` (set by CI) a missing backend fails instead of
    skipping, so a broken build cannot pass silently.
    """
    required = os.environ.get("UNLEARN_KERNELS_REQUIRE_ALL") == "1"
    params = [pytest.param("torch", id="torch")]
    for name, ok in (
        ("cpu", cpu_extension_available()),
        ("triton", importlib.util.find_spec("triton") is not None),
    ):
        if ok or required:
            params.append(pytest.param(name, id=name))
        else:
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(f"{name} missing")))
    return params


def rel_err(out: Tensor | None, ref: Tensor | None) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (absolute when ``ref`` is zero); NaN never passes."""
    if ref is None:
        assert out is None
        return 0.0
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    diff = (out - ref).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def generator() -> tuple[torch.Generator, int]:
    """A fresh random generator each call; its seed goes into failure messages."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) ^ int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def ce_oracle(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    token_weight: Tensor | None,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    upstream: Tensor | None,
) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """Loss and (dH, dW, db) of the signed cross-entropy, by float64 autograd on full logits."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_()
    z = leaves[0].reshape(-1, weight.shape[1]) @ leaves[1].t()
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = labels.reshape(-1)
    per_token = F.cross_entropy(z, flat.long(), ignore_index=ignore_index, reduction="none")
    if token_weight is not None:
        per_token = per_token * token_weight.reshape(-1).double()
    if reduction == "none":
        loss = per_token.reshape(labels.shape)
    else:
        loss = per_token.sum()
        if reduction == "mean":
            loss = loss / max(int((flat != ignore_index).sum()), 1)
    inputs = [*leaves, *([b] if b is not None else [])]
    grads = torch.autograd.grad(
        loss,
        inputs,
        grad_outputs=None if upstream is None else upstream.double(),
        allow_unused=True,
    )
    grads = list(grads) + ([None] if b is None else [])
    return loss.detach(), tuple(grads)
