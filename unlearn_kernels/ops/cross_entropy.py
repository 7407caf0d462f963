"""Fused linear, response-only cross-entropy with signed per-token weights.

For the selected rows ``i`` (label ≠ ignore_index, weight ≠ 0), with ``z_i = W h_i (+ b)``
(softcapped ``z ← c·tanh(z/c)`` if asked)::

    ℓ_i = lse(z_i) − z_{i, y_i}
    loss = Σ_i w_i ℓ_i                      (sum)
         = Σ_i w_i ℓ_i / #{i : y_i ≠ ignore} (mean)
         = [w_i ℓ_i]_i, 0 on ignored rows    (none)
    ∂loss/∂z_i = w_i (softmax(z_i) − e_{y_i}) (/ count for mean)

The sign of ``w_i`` sets the direction: +1 descends (retain rows), −1 ascends (forget rows),
so gradient ascent and descent run in one pass. ``[N, V]`` logits never exist: see
:mod:`unlearn_kernels.ops.chunking`.

With ``sum``/``mean`` the gradient is computed during the forward sweep and backward only
scales it (``grad_output == 1`` hands it over without a copy when the graph is freed, see
:func:`~unlearn_kernels.ops.chunking.scale_saved_grads`). With ``none`` the forward keeps the
logsumexp and backward recomputes each chunk with the per-token upstream gradient. Double
backward is not supported: differentiating the gradient again raises a ``RuntimeError``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unlearn_kernels._checks import (
    check_backend_dtype,
    check_finite,
    check_labels,
    check_linear,
    check_options,
    check_token_weight,
)
from unlearn_kernels.backends import backend_name, get_backend
from unlearn_kernels.ops.chunking import (
    accumulate_dtype,
    allocate_grads,
    finish_grads,
    first_order_only,
    scale_saved_grads,
    select_rows,
    sweep,
    sweep_loss_and_grads,
    sweep_row_losses,
    upstream_scale,
)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd function over flattened inputs: ``hidden [N, d]``, ``labels [N]``."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        token_weight: Tensor | None,
        ignore_index: int,
        reduction: str,
        softcap: float | None,
        chunk_size: int | None,
        backend: str,
    ) -> Tensor:
        epilogues = get_backend(backend, hidden.device)
        acc_dtype = accumulate_dtype(hidden.dtype)
        selection = select_rows(labels, token_weight, ignore_index, acc_dtype)
        rows = hidden.index_select(0, selection.index)
        target = selection.target
        ctx.reduction, ctx.softcap, ctx.chunk_size, ctx.backend = (
            reduction,
            softcap,
            chunk_size,
            backend,
        )
        ctx.n_total = hidden.shape[0]

        def row_epilogue(start: int, end: int, logits: Tensor, grad_scale: Tensor | None):
            return epilogues.ce_forward(logits, target[start:end], grad_scale, softcap)

        if reduction == "none":
            loss, (lse,) = sweep_row_losses(
                rows, weight, bias, selection, ctx.n_total, row_epilogue, 1, chunk_size
            )
            ctx.save_for_backward(
                hidden, weight, bias, rows, selection.index, target, selection.weight, lse
            )
            return loss
        needs = ctx.needs_input_grad[:3]
        loss, grads = sweep_loss_and_grads(
            rows, weight, bias, selection, reduction, needs, ctx.n_total, row_epilogue, chunk_size
        )
        ctx.save_for_backward(hidden, weight, bias, *grads)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        with torch.no_grad():
            if ctx.reduction == "none":
                grads = _recompute_backward(ctx, grad_output)
            else:
                grads = scale_saved_grads(ctx.saved_tensors[3:], grad_output)
        grads = first_order_only("fused_linear_cross_entropy", ctx.saved_tensors[:3], grads)
        return (*grads, None, None, None, None, None, None, None)


def _recompute_backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """``reduction='none'``: rebuild each chunk and write ``g_i w_i (softmax − e_y)`` over it."""
    _, weight, bias, rows, index, target, token_weight, lse = ctx.saved_tensors
    epilogues = get_backend(ctx.backend, rows.device)
    scale = upstream_scale(grad_output, index, token_weight, accumulate_dtype(rows.dtype))
    grads = allocate_grads(rows, weight, bias, ctx.needs_input_grad[:3])

    def backward(start: int, end: int, logits: Tensor) -> None:
        epilogues.ce_backward(
            logits, target[start:end], lse[start:end], scale[start:end], ctx.softcap
        )

    sweep(rows, weight, bias, backward, grads, ctx.chunk_size)
    return finish_grads(grads, ctx.n_total, index, weight, bias)


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    token_weight: Tensor | None = None,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Signed response-only cross-entropy of ``hidden @ weightᵀ (+ bias)`` against ``labels``.

    Args:
        hidden: ``[N, d]`` or ``[B, T, d]`` final hidden states, already shifted so row ``i``
            predicts ``labels[i]``.
        weight: ``[V, d]`` output weight (frozen or trainable).
        labels: ``[N]`` or ``[B, T]`` in ``[0, V) ∪ {ignore_index}``.
        token_weight: per-token signed weights ``w_i`` (not differentiated); rows with
            ``w_i = 0`` are skipped like ignored rows but still count for ``mean``.
        bias: optional ``[V]``.
        reduction: ``"mean"`` (``Σ w_i ℓ_i / #labelled``), ``"sum"`` or ``"none"``.
        softcap: ``c`` in ``z ← c·tanh(z/c)``.
        chunk_size: rows per chunk; default from a 256 MiB logits budget, at least 512 rows.
        backend: ``"torch"``, ``"cpu"`` or ``"triton"``; default by device (see
            :mod:`unlearn_kernels.backends`).

    Returns:
        The loss in fp32 (fp64 for fp64 inputs): a scalar, or for ``"none"`` per-token
        losses of ``labels``' shape.
    """
    vocab, d = check_linear(hidden, weight, bias)
    check_labels(labels, hidden, vocab, ignore_index)
    check_token_weight(token_weight, hidden)
    check_options(reduction, chunk_size, softcap)
    backend = backend_name(backend, hidden.device)
    check_backend_dtype(backend, hidden)
    check_finite(hidden=hidden, weight=weight, bias=bias, token_weight=token_weight)
    loss = FusedLinearCrossEntropyFunction.apply(
        hidden.reshape(-1, d),
        weight,
        bias,
        labels.reshape(-1),
        None if token_weight is None else token_weight.detach().reshape(-1),
        ignore_index,
        reduction,
        None if softcap is None else float(softcap),
        chunk_size,
        backend,
    )
    return loss.reshape(labels.shape) if reduction == "none" else loss
