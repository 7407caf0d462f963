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

Options, each computed in the same sweep over the logits (see
:class:`~unlearn_kernels._options.CERowMath` for the per-row formula): label smoothing ε and
class weights ``c`` as ``torch.nn.functional.cross_entropy`` defines them (``mean`` then
divides by ``Σ_i c_{y_i}`` over the labelled rows), the z-loss ``s·lse²`` (weighted by
``c_{y_i}`` like the rest of the row), Liger-Kernel's token scaling (each row times its detached
``p_{y_i}``), and per-row logsumexp, argmax and accuracy outputs.

With ``sum``/``mean`` the gradient is computed during the forward sweep and backward only
scales it (``grad_output == 1`` hands it over without a copy when the graph is freed, see
:func:`~unlearn_kernels.ops.chunking.scale_saved_grads`). With ``none`` the forward keeps the
logsumexp and backward recomputes each chunk with the per-token upstream gradient. Double
backward is not supported: differentiating the gradient again raises a ``RuntimeError``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from unlearn_kernels._checks import (
    check_backend_dtype,
    check_class_weight,
    check_finite,
    check_flags,
    check_labels,
    check_linear,
    check_options,
    check_real,
    check_token_weight,
)
from unlearn_kernels._options import CEOptions, CERowMath
from unlearn_kernels.backends import backend_name, get_backend
from unlearn_kernels.ops import library
from unlearn_kernels.ops.autocast import autocast_cast, autocast_off
from unlearn_kernels.ops.chunking import (
    RowSelection,
    accumulate_dtype,
    allocate_grads,
    check_logits_dtype,
    finish_grads,
    first_order_only,
    mean_denominator,
    plan_chunks,
    reduction_scale,
    scale_saved_grads,
    scatter_rows,
    select_rows,
    sweep,
    sweep_loss_and_grads,
    sweep_row_losses,
    upstream_scale,
)

INF = float("inf")


class CrossEntropyOutput(NamedTuple):
    """What :func:`fused_linear_cross_entropy` returns when any ``return_*`` is asked; fields
    not asked are ``None``. Per-token fields have ``labels``' shape."""

    #: the loss, as without any ``return_*`` (it includes the z-loss)
    loss: Tensor
    #: the z-loss part of ``loss``, reduced like it (detached, for logging)
    z_loss: Tensor | None = None
    #: per-token ``lse(z_i)`` (accumulation dtype, detached), 0 on skipped rows
    lse: Tensor | None = None
    #: fraction of the selected rows whose argmax is the label (per token, 1/0, for "none")
    token_accuracy: Tensor | None = None
    #: per-token argmax of ``z_i`` (int64), −1 on skipped rows
    predicted_tokens: Tensor | None = None


def _class_weight_denominator(labels: Tensor, class_weight: Tensor, ignore_index: int) -> float:
    """``Σ c_{y_i}`` over labelled rows, as ``F.cross_entropy(weight=, reduction="mean")``."""
    labelled = labels[labels != ignore_index].long()
    return float(class_weight.double()[labelled].sum())


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd function over flattened inputs: ``hidden [N, d]``, ``labels [N]``. Returns the
    five fields of :class:`CrossEntropyOutput` over the ``N`` rows (``None`` where not asked);
    only the loss is differentiable."""

    @staticmethod
    @autocast_off
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        token_weight: Tensor | None,
        class_weight: Tensor | None,
        options: CEOptions,
    ) -> tuple[Tensor | None, ...]:
        epilogues = get_backend(options.backend, hidden.device)
        acc_dtype = accumulate_dtype(hidden.dtype)
        selection = select_rows(labels, token_weight, options.ignore_index, acc_dtype)
        plan = plan_chunks(
            selection.index.numel(),
            *weight.shape,
            hidden.dtype,
            hidden.device.type,
            options.logits_dtype,
            options.chunk_size,
        )
        target = selection.target
        math = options.math
        ctx.options, ctx.n_total, ctx.plan = options, hidden.shape[0], plan
        outputs = (torch.float64, *[acc_dtype] * math.z_loss, *[torch.int64] * math.argmax)

        def row_epilogue(start: int, end: int, logits: Tensor, grad_scale: Tensor | None):
            result = epilogues.ce_forward(logits, target[start:end], grad_scale, math, class_weight)
            return tuple(value for value in result if value is not None)

        if options.reduction == "none":
            loss, (lse, *extras) = sweep_row_losses(
                hidden, weight, bias, selection, row_epilogue, outputs, plan
            )
            ctx.save_for_backward(
                hidden,
                weight,
                bias,
                selection.index,
                target,
                selection.weight,
                lse,
                class_weight,
            )
            z_loss = None
            if math.z_loss:
                z_part = extras[0] if selection.weight is None else extras[0] * selection.weight
                z_loss = scatter_rows(z_part, selection.index, ctx.n_total)
        else:
            if class_weight is not None and options.reduction == "mean":
                denominator = _class_weight_denominator(labels, class_weight, options.ignore_index)
                denominator = denominator if denominator > 0 else 1.0
            else:
                denominator = mean_denominator(selection, options.reduction)
            needs = ctx.needs_input_grad[:3]
            loss, grads, (lse, *extras) = sweep_loss_and_grads(
                hidden, weight, bias, selection, denominator, needs, row_epilogue, outputs, plan
            )
            ctx.save_for_backward(hidden, weight, bias, *grads)
            z_loss = None
            if math.z_loss:
                z_loss = torch.dot(extras[0], reduction_scale(selection, denominator, extras[0]))
        results = (
            z_loss,
            scatter_rows(lse.to(acc_dtype), selection.index, ctx.n_total)
            if options.return_lse
            else None,
            *_argmax_outputs(extras[-1] if math.argmax else None, selection, ctx.n_total, options),
        )
        ctx.mark_non_differentiable(*[r for r in results if r is not None])
        return (loss, *results)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_output: Tensor, *_unused: Tensor | None):
        with torch.no_grad():
            if ctx.options.reduction == "none":
                grads = _recompute_backward(ctx, grad_output)
            else:
                grads = scale_saved_grads(ctx.saved_tensors[3:], grad_output)
        grads = first_order_only("fused_linear_cross_entropy", ctx.saved_tensors[:3], grads)
        return (*grads, None, None, None, None)


def _argmax_outputs(
    argmax: Tensor | None, selection: RowSelection, n_total: int, options: CEOptions
) -> tuple[Tensor | None, Tensor | None]:
    """``(token_accuracy, predicted_tokens)`` from the selected rows' argmax, as asked."""
    accuracy = predicted = None
    if options.return_token_accuracy:
        correct = (argmax == selection.target).to(torch.float32)
        if options.reduction == "none":
            accuracy = scatter_rows(correct, selection.index, n_total)
        else:
            accuracy = correct.sum() / max(correct.numel(), 1)
    if options.return_predicted_tokens:
        predicted = argmax.new_full((n_total,), -1).index_copy_(0, selection.index, argmax)
    return accuracy, predicted


def _recompute_backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """``reduction='none'``: rebuild each chunk and write ``g_i w_i ∂ℓ_i/∂z_i`` over it."""
    hidden, weight, bias, index, target, token_weight, lse, class_weight = ctx.saved_tensors
    options = ctx.options
    epilogues = get_backend(options.backend, hidden.device)
    scale = upstream_scale(grad_output, index, token_weight, accumulate_dtype(hidden.dtype))
    grads = allocate_grads(hidden, index.numel(), weight, bias, ctx.needs_input_grad[:3])

    def backward(start: int, end: int, logits: Tensor) -> None:
        epilogues.ce_backward(
            logits,
            target[start:end],
            lse[start:end],
            scale[start:end],
            options.math,
            class_weight,
        )

    sweep(hidden, index, weight, bias, backward, grads, ctx.plan)
    return finish_grads(grads, weight, bias)


def shifted(values: Tensor | None, fill: float) -> Tensor | None:
    """``values[..., 1:]`` with ``fill`` appended along the last (time) dimension: row ``t``
    then holds what position ``t`` predicts, and the last position predicts nothing."""
    if values is None:
        return None
    pad = values.new_full((*values.shape[:-1], 1), fill)
    return torch.cat([values[..., 1:], pad], dim=-1)


def cross_entropy_row_math(
    *,
    reduction: str,
    chunk_size: int | None,
    softcap: float | None,
    label_smoothing: float,
    class_weight_sum: float | None,
    lse_square_scale: float,
    token_scaling: bool,
    shift: bool,
    return_z_loss: bool,
    return_lse: bool,
    return_token_accuracy: bool,
    return_predicted_tokens: bool,
) -> CERowMath:
    """The tensor-free options of :func:`fused_linear_cross_entropy`, validated (a
    ``ValueError`` names the argument), as the epilogues' row math."""
    check_options(reduction, chunk_size, softcap)
    check_flags(
        token_scaling=token_scaling,
        shift=shift,
        return_z_loss=return_z_loss,
        return_lse=return_lse,
        return_token_accuracy=return_token_accuracy,
        return_predicted_tokens=return_predicted_tokens,
    )
    return CERowMath(
        softcap=None if softcap is None else float(softcap),
        label_smoothing=check_real("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True),
        class_weight_sum=class_weight_sum,
        lse_square_scale=check_real("lse_square_scale", lse_square_scale, 0.0, INF, high_open=True),
        token_scaling=token_scaling,
        argmax=return_token_accuracy or return_predicted_tokens,
        z_loss=return_z_loss,
    )


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
    label_smoothing: float = 0.0,
    class_weight: Tensor | None = None,
    lse_square_scale: float = 0.0,
    token_scaling: bool = False,
    shift: bool = False,
    return_z_loss: bool = False,
    return_lse: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    chunk_size: int | None = None,
    logits_dtype: str = "auto",
    backend: str | None = None,
) -> Tensor | CrossEntropyOutput:
    """Signed response-only cross-entropy of ``hidden @ weightᵀ (+ bias)`` against ``labels``.

    Args:
        hidden: ``[N, d]`` or ``[B, T, d]`` final hidden states, already shifted so row ``i``
            predicts ``labels[i]`` (unless ``shift``).
        weight: ``[V, d]`` output weight (frozen or trainable).
        labels: ``[N]`` or ``[B, T]`` in ``[0, V) ∪ {ignore_index}``.
        token_weight: per-token signed weights ``w_i`` (not differentiated); rows with
            ``w_i = 0`` are skipped like ignored rows but still count for ``mean``.
        bias: optional ``[V]``.
        ignore_index: the label of rows that carry no loss.
        reduction: ``"mean"`` (``Σ w_i ℓ_i / #labelled``, or ``/ Σ c_{y_i}`` with class
            weights), ``"sum"`` or ``"none"``.
        softcap: ``c`` in ``z ← c·tanh(z/c)``.
        label_smoothing: ε in ``[0, 1)``: the target is ``(1 − ε) e_y + ε/V``, as in
            ``torch.nn.functional.cross_entropy``.
        class_weight: ``[V]`` non-negative per-class weights ``c`` (``F.cross_entropy``'s
            ``weight``): row ``i``'s loss is weighted by ``c_{y_i}`` (and the smoothing term by
            ``c_v``); combines with ``token_weight``.
        lse_square_scale: ``s ≥ 0`` of the z-loss: each row adds ``c_{y_i} s·lse(z_i)²``.
        token_scaling: multiply each row's loss by its detached ``softmax(z_i)_{y_i}``
            (Liger-Kernel's ``use_token_scaling``).
        shift: ``labels`` (and ``token_weight``) are not yet shifted (``labels=input_ids``):
            row ``t`` predicts ``labels[..., t + 1]`` with weight ``token_weight[..., t + 1]``
            and the last position of each sequence predicts nothing; ``hidden`` is not copied.
        return_z_loss: also return the z-loss part of the loss.
        return_lse: also return the per-token logsumexp ``lse(z_i)``.
        return_token_accuracy: also return the accuracy of the argmax over the selected rows.
        return_predicted_tokens: also return the per-token argmax.
        chunk_size: rows per chunk; default: the logits buffer within 256 MiB (in its own
            dtype), a multiple of 128 rows, at least 512.
        logits_dtype: ``"auto"`` (fp32 logits for bf16/fp16 inputs on CUDA, the input dtype
            on CPU), ``"input"`` (the input dtype: half the memory, bf16-rounded logits) or
            ``"float32"``; see :mod:`unlearn_kernels.ops.chunking`.
        backend: ``"torch"``, ``"cpu"`` or ``"triton"``; default by device (see
            :mod:`unlearn_kernels.backends`).

    Under ``torch.autocast`` the products run in autocast's dtype (as ``torch.mm`` would;
    gradients reach fp32 parameters through the casts); the loss still accumulates in fp32.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs): a scalar, or for ``"none"`` per-token
        losses of ``labels``' shape. With any ``return_*``, a :class:`CrossEntropyOutput`
        holding it and the fields asked for.
    """
    if torch.compiler.is_compiling():  # one opaque operator in the graph
        return library.call("cross_entropy", **locals())
    hidden, weight, bias = autocast_cast(hidden, weight, bias)
    vocab, d = check_linear(hidden, weight, bias)
    check_labels(labels, hidden, vocab, ignore_index)
    check_token_weight(token_weight, hidden)
    check_class_weight(class_weight, vocab, hidden.device)
    returns = {
        "return_z_loss": return_z_loss,
        "return_lse": return_lse,
        "return_token_accuracy": return_token_accuracy,
        "return_predicted_tokens": return_predicted_tokens,
    }
    math = cross_entropy_row_math(
        reduction=reduction,
        chunk_size=chunk_size,
        softcap=softcap,
        label_smoothing=label_smoothing,
        class_weight_sum=None if class_weight is None else float(class_weight.double().sum()),
        lse_square_scale=lse_square_scale,
        token_scaling=token_scaling,
        shift=shift,
        **returns,
    )
    backend = backend_name(backend, hidden.device)
    check_backend_dtype(backend, hidden)
    check_finite(hidden=hidden, weight=weight, bias=bias, token_weight=token_weight)
    if shift:
        labels, token_weight = shifted(labels.long(), ignore_index), shifted(token_weight, 0.0)
    options = CEOptions(
        math=math,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        backend=backend,
        logits_dtype=check_logits_dtype(logits_dtype),
        return_lse=return_lse,
        return_token_accuracy=return_token_accuracy,
        return_predicted_tokens=return_predicted_tokens,
    )
    loss, *extras = FusedLinearCrossEntropyFunction.apply(
        hidden.reshape(-1, d),
        weight,
        bias,
        labels.reshape(-1),
        None if token_weight is None else token_weight.detach().reshape(-1),
        None if class_weight is None else class_weight.detach(),
        options,
    )
    per_token = labels.shape if reduction == "none" else ()
    loss = loss.reshape(per_token)
    if not any(returns.values()):
        return loss
    z_loss, lse, accuracy, predicted = extras
    return CrossEntropyOutput(
        loss=loss,
        z_loss=None if z_loss is None else z_loss.reshape(per_token),
        lse=None if lse is None else lse.reshape(labels.shape),
        token_accuracy=None if accuracy is None else accuracy.reshape(per_token),
        predicted_tokens=None if predicted is None else predicted.reshape(labels.shape),
    )
