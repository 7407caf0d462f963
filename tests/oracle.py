"""Float64 oracles (docs/design.md §5) and the helpers every kernel test shares."""

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


def ce_terms(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    token_weight: Tensor | None,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    *,
    label_smoothing: float = 0.0,
    class_weight: Tensor | None = None,
    lse_square_scale: float = 0.0,
    token_scaling: bool = False,
) -> dict:
    """The signed cross-entropy with every option, in float64 on materialised logits:
    ``loss``/``z_loss`` (reduced), per-token ``lse``, the logits ``z`` and the float64 leaves
    ``inputs`` (hidden, weight[, bias]) that ``loss`` depends on. The per-token loss is
    ``F.cross_entropy(weight=, label_smoothing=)``'s plus ``c_y s lse²``, times ``p_y`` (detached)
    with token scaling, times ``w_i``; ``mean`` divides by ``Σ c_{y_i}`` (the labelled count
    without class weights), as torch does."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_()
    z = leaves[0].reshape(-1, weight.shape[1]) @ leaves[1].t()
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = labels.reshape(-1).long()
    valid = flat != ignore_index
    safe = flat.clamp_min(0)
    c = None if class_weight is None else class_weight.double()
    per_token = F.cross_entropy(
        z,
        flat,
        weight=c,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    lse = z.logsumexp(1)
    c_y = torch.ones_like(lse) if c is None else c[safe]
    z_part = torch.where(valid, c_y * lse_square_scale * lse.square(), 0.0)
    if token_scaling:
        pi = torch.exp(z.gather(1, safe[:, None]).squeeze(1) - lse).detach()
        per_token, z_part = per_token * pi, z_part * pi
    per_token = per_token + z_part
    if token_weight is not None:
        w = token_weight.reshape(-1).double()
        per_token, z_part = per_token * w, z_part * w
    if reduction == "none":
        loss, z_loss = per_token.reshape(labels.shape), z_part.reshape(labels.shape)
    else:
        loss, z_loss = per_token.sum(), z_part.sum()
        if reduction == "mean":
            denominator = float(c_y[valid].sum()) if c is not None else int(valid.sum())
            denominator = denominator if denominator > 0 else 1
            loss, z_loss = loss / denominator, z_loss / denominator
    inputs = [*leaves, *([b] if b is not None else [])]
    return {
        "loss": loss,
        "z_loss": z_loss.detach(),
        "lse": lse.detach(),
        "z": z.detach(),
        "inputs": inputs,
    }


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
    **options,
) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """Loss and (dH, dW, db) of the signed cross-entropy (with the ``options`` of
    :func:`ce_terms`), by float64 autograd on full logits."""
    terms = ce_terms(
        hidden, weight, labels, token_weight, bias, ignore_index, reduction, softcap, **options
    )
    loss = terms["loss"]
    grads = torch.autograd.grad(
        loss,
        terms["inputs"],
        grad_outputs=None if upstream is None else upstream.double(),
        allow_unused=True,
    )
    grads = list(grads) + ([None] if bias is None else [])
    return loss.detach(), tuple(grads)
