"""Fused linear, response-only forward KL to a cached reference, with signed per-token weights.

For the selected rows ``i`` (label ≠ ignore_index, weight ≠ 0), with student logits
``z_i = W h_i`` and temperature ``τ``::

    q_i = softmax(z_i / τ),  p_i = softmax(z_ref,i / τ)
    KL_i = Σ_v p_iv (log p_iv − log q_iv)          ∂KL_i/∂z_i = (q_i − p_i) / τ
    loss = Σ_i w_i KL_i (sum), / #labelled rows (mean), [w_i KL_i]_i, 0 elsewhere (none)

The reference is a cache, never a second model:

* exact (:func:`fused_linear_kl` with ``ref_hidden``): reference logits
  ``z_ref = W_ref h_ref`` are rebuilt chunk by chunk next to the student's;
* streamed (``ref_logits``): rows of a cached ``[N, V]`` logits tensor (e.g. a memory-mapped
  bf16 safetensors tensor) are read one chunk at a time;
* top-k (:func:`fused_linear_kl_topk`): cached top-k log-probs ``log p_k`` and the tail's
  log-mass ``log p_t``; the approximate loss
  ``KL̃_i = Σ_{k∈K} p_k log(p_k/q_k) + p_t log(p_t/q_t)``, ``q_t = Σ_{v∉K} q_v``, has gradient
  ``(q_v − p_v)/τ`` on the top-k and ``q_v (1 − p_t/q_t)/τ`` off it (for ``Σ_K p_k + p_t = 1``;
  the kernels differentiate the loss exactly otherwise, see ``torch_backend._topk_grad``).

A reference row that is no distribution — reference logits with a NaN or ``+inf``, or all
``−inf``; top-k log-probs or a tail log-mass with a NaN or ``+inf`` — gives that row a NaN loss
and a NaN gradient on every backend (a ``ValueError`` with ``UNLEARN_KERNELS_CHECK_FINITE=1``).
``−inf`` entries are zero probabilities and contribute 0.

The reference is a constant target: no gradient flows to ``ref_hidden``, ``ref_weight`` or
``ref_logits`` (pass the frozen original weight as ``ref_weight`` if ``weight`` is trained).
Gradient modes as in :mod:`unlearn_kernels.ops.cross_entropy`: computed during the forward
sweep for ``sum``/``mean``; for ``none`` the logsumexps are saved and each chunk recomputed in
backward with the per-token upstream gradient. Double backward raises a ``RuntimeError``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unlearn_kernels._checks import (
    check_backend_dtype,
    check_finite,
    check_linear,
    check_log_values,
    check_options,
    check_reference,
    check_selection,
    check_temperature,
    check_topk,
    loss_rows,
)
from unlearn_kernels.backends import backend_name, get_backend
from unlearn_kernels.ops.chunking import (
    RowSelection,
    accumulate_dtype,
    allocate_grads,
    finish_grads,
    first_order_only,
    linear_into,
    scale_saved_grads,
    select_rows,
    sweep,
    sweep_loss_and_grads,
    sweep_row_losses,
    upstream_scale,
)


def _selection(
    n_total: int,
    labels: Tensor | None,
    token_weight: Tensor | None,
    ignore_index: int,
    dtype: torch.dtype,
    device: torch.device,
) -> RowSelection:
    """Rows selected by ``labels``/``token_weight``; every row when neither is given."""
    if labels is None and token_weight is None:
        index = torch.arange(n_total, device=device)
        return RowSelection(index, torch.zeros_like(index), None, n_total)
    return select_rows(labels, token_weight, ignore_index, dtype)


class _ReferenceLogits:
    """Reference logits of chunk ``[start, end)`` of the selected rows, in one reused buffer:
    rebuilt as ``H_ref Wᵣᵀ`` (exact) or copied from rows of cached logits (streamed)."""

    def __init__(
        self,
        ref_rows: Tensor | None,
        ref_weight: Tensor | None,
        ref_logits: Tensor | None,
        index: Tensor,
        like: Tensor,
    ) -> None:
        self.ref_rows, self.ref_weight, self.ref_logits = ref_rows, ref_weight, ref_logits
        if ref_logits is not None:
            index = index.to(ref_logits.device)
        self.index = index
        self.like = like
        self.buffer: Tensor | None = None

    def __call__(self, start: int, end: int, vocab: int) -> Tensor:
        if self.buffer is None:  # the first chunk is the largest
            self.buffer = self.like.new_empty(end - start, vocab)
        out = self.buffer[: end - start]
        if self.ref_logits is None:
            return linear_into(out, self.ref_rows[start:end], self.ref_weight, None)
        return out.copy_(self.ref_logits.index_select(0, self.index[start:end]))


class FusedLinearKLFunction(torch.autograd.Function):
    """Autograd function over flattened inputs: ``hidden [N, d]``; exactly one of
    ``ref_hidden [N, d]`` (with ``ref_weight``) and ``ref_logits [N, V]``."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        ref_hidden: Tensor | None,
        ref_weight: Tensor | None,
        ref_logits: Tensor | None,
        labels: Tensor | None,
        token_weight: Tensor | None,
        temperature: float,
        ignore_index: int,
        reduction: str,
        chunk_size: int | None,
        backend: str,
    ) -> Tensor:
        epilogues = get_backend(backend, hidden.device)
        acc_dtype = accumulate_dtype(hidden.dtype)
        selection = _selection(
            hidden.shape[0], labels, token_weight, ignore_index, acc_dtype, hidden.device
        )
        rows = hidden.index_select(0, selection.index)
        ref_rows = None
        if ref_hidden is not None:
            ref_rows = ref_hidden.index_select(0, selection.index).to(hidden.dtype)
        reference = _ReferenceLogits(ref_rows, ref_weight, ref_logits, selection.index, rows)
        vocab = weight.shape[0]
        ctx.reduction, ctx.temperature, ctx.chunk_size, ctx.backend = (
            reduction,
            temperature,
            chunk_size,
            backend,
        )
        ctx.n_total, ctx.ref_logits = hidden.shape[0], ref_logits

        def row_epilogue(start: int, end: int, logits: Tensor, grad_scale: Tensor | None):
            ref = reference(start, end, vocab)
            return epilogues.kl_forward(logits, ref, grad_scale, temperature)

        if reduction == "none":
            loss, (lse, lse_ref) = sweep_row_losses(
                rows, weight, None, selection, ctx.n_total, row_epilogue, 2, chunk_size
            )
            ctx.save_for_backward(
                hidden,
                weight,
                rows,
                ref_rows,
                ref_weight,
                selection.index,
                selection.weight,
                lse,
                lse_ref,
            )
            return loss
        needs = (*ctx.needs_input_grad[:2], False)
        loss, grads = sweep_loss_and_grads(
            rows, weight, None, selection, reduction, needs, ctx.n_total, row_epilogue, chunk_size
        )
        ctx.save_for_backward(hidden, weight, *grads[:2])
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        with torch.no_grad():
            if ctx.reduction == "none":
                grads = _kl_recompute(ctx, grad_output)
            else:
                grads = scale_saved_grads(ctx.saved_tensors[2:], grad_output)
        grads = first_order_only("fused_linear_kl", ctx.saved_tensors[:2], grads)
        return (*grads, *[None] * 10)


def _kl_recompute(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``reduction='none'``: rebuild each chunk and write ``g_i w_i (q − p)/τ`` over it."""
    _, weight, rows, ref_rows, ref_weight, index, token_weight, lse, lse_ref = ctx.saved_tensors
    epilogues = get_backend(ctx.backend, rows.device)
    scale = upstream_scale(grad_output, index, token_weight, lse.dtype)
    reference = _ReferenceLogits(ref_rows, ref_weight, ctx.ref_logits, index, rows)
    grads = allocate_grads(rows, weight, None, (*ctx.needs_input_grad[:2], False))
    vocab = weight.shape[0]

    def backward(start: int, end: int, logits: Tensor) -> None:
        epilogues.kl_backward(
            logits,
            reference(start, end, vocab),
            lse[start:end],
            lse_ref[start:end],
            scale[start:end],
            ctx.temperature,
        )

    sweep(rows, weight, None, backward, grads, ctx.chunk_size)
    return finish_grads(grads, ctx.n_total, index, weight, None)[:2]


class FusedLinearKLTopkFunction(torch.autograd.Function):
    """Autograd function over flattened inputs: ``hidden [N, d]``, ``index``/``logprob``
    ``[N, k]``, ``tail_logprob [N]``."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        topk_index: Tensor,
        topk_logprob: Tensor,
        tail_logprob: Tensor,
        labels: Tensor | None,
        token_weight: Tensor | None,
        temperature: float,
        ignore_index: int,
        reduction: str,
        chunk_size: int | None,
        backend: str,
    ) -> Tensor:
        epilogues = get_backend(backend, hidden.device)
        acc_dtype = accumulate_dtype(hidden.dtype)
        selection = _selection(
            hidden.shape[0], labels, token_weight, ignore_index, acc_dtype, hidden.device
        )
        rows = hidden.index_select(0, selection.index)
        index = topk_index.index_select(0, selection.index)
        logprob = topk_logprob.index_select(0, selection.index)
        tail = tail_logprob.index_select(0, selection.index)
        ctx.reduction, ctx.temperature, ctx.chunk_size, ctx.backend = (
            reduction,
            temperature,
            chunk_size,
            backend,
        )
        ctx.n_total = hidden.shape[0]

        def row_epilogue(start: int, end: int, logits: Tensor, grad_scale: Tensor | None):
            cache = (index[start:end], logprob[start:end], tail[start:end])
            return epilogues.kl_topk_forward(logits, *cache, grad_scale, temperature)

        if reduction == "none":
            loss, (lse, lse_tail) = sweep_row_losses(
                rows, weight, None, selection, ctx.n_total, row_epilogue, 2, chunk_size
            )
            ctx.save_for_backward(
                hidden,
                weight,
                rows,
                index,
                logprob,
                tail,
                selection.index,
                selection.weight,
                lse,
                lse_tail,
            )
            return loss
        needs = (*ctx.needs_input_grad[:2], False)
        loss, grads = sweep_loss_and_grads(
            rows, weight, None, selection, reduction, needs, ctx.n_total, row_epilogue, chunk_size
        )
        ctx.save_for_backward(hidden, weight, *grads[:2])
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        with torch.no_grad():
            if ctx.reduction == "none":
                grads = _topk_recompute(ctx, grad_output)
            else:
                grads = scale_saved_grads(ctx.saved_tensors[2:], grad_output)
        grads = first_order_only("fused_linear_kl_topk", ctx.saved_tensors[:2], grads)
        return (*grads, *[None] * 10)


def _topk_recompute(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``reduction='none'``: rebuild each chunk and write the scaled top-k gradient over it."""
    _, weight, rows, index, logprob, tail, row_index, token_weight, lse, lse_tail = (
        ctx.saved_tensors
    )
    epilogues = get_backend(ctx.backend, rows.device)
    scale = upstream_scale(grad_output, row_index, token_weight, lse.dtype)
    grads = allocate_grads(rows, weight, None, (*ctx.needs_input_grad[:2], False))

    def backward(start: int, end: int, logits: Tensor) -> None:
        epilogues.kl_topk_backward(
            logits,
            index[start:end],
            logprob[start:end],
            tail[start:end],
            lse[start:end],
            lse_tail[start:end],
            scale[start:end],
            ctx.temperature,
        )

    sweep(rows, weight, None, backward, grads, ctx.chunk_size)
    return finish_grads(grads, ctx.n_total, row_index, weight, None)[:2]


# ---- public functions --------------------------------------------------------------------


def fused_linear_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    *,
    ref_logits: Tensor | None = None,
    labels: Tensor | None = None,
    token_weight: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Forward KL ``Σ_i w_i KL(p_i ‖ q_i)`` from a cached reference to ``hidden @ weightᵀ``.

    Args:
        hidden: ``[N, d]`` or ``[B, T, d]`` student final hidden states (shifted like labels).
        weight: ``[V, d]`` student output weight (frozen or trainable).
        ref_hidden: exact mode: cached reference hidden states of ``hidden``'s shape (any float
            dtype, e.g. a bf16 cache; cast to ``hidden``'s dtype row by row).
        ref_weight: reference output weight, default ``weight`` (under LoRA the shared frozen
            layer; pass the original weight when ``weight`` is trained).
        ref_logits: streamed mode: cached reference logits ``[*hidden.shape[:-1], V]`` in any
            float dtype, on any device (e.g. a memory-mapped bf16 CPU tensor); only the selected
            rows are read, one chunk at a time.
        labels: rows with ``labels == ignore_index`` carry no loss (values are not used
            otherwise); without labels and token_weight every row counts.
        token_weight: signed per-token weights ``w_i`` (not differentiated); ``w_i = 0`` skips
            the row (it still counts for ``mean``).
        temperature: ``τ > 0``; ``p = softmax(z_ref/τ)``, ``q = softmax(z/τ)``, no ``τ²`` factor.
        reduction: ``"mean"`` (over rows with a label, or all rows without labels), ``"sum"``
            or ``"none"`` (per-token ``w_i KL_i``, 0 on skipped rows).
        chunk_size: rows per chunk; default from a 256 MiB logits budget (two such buffers
            are alive: student and reference logits).
        backend: ``"torch"``, ``"cpu"`` or ``"triton"``; default by device.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs); gradients flow to ``hidden`` and ``weight``.
    """
    vocab, d = check_linear(hidden, weight, None)
    check_reference(hidden, weight, ref_hidden, ref_weight, ref_logits)
    check_selection(labels, token_weight, hidden, vocab, ignore_index)
    check_options(reduction, chunk_size)
    temperature = check_temperature(temperature)
    backend = backend_name(backend, hidden.device)
    check_backend_dtype(backend, hidden)
    check_finite(
        hidden=hidden,
        weight=weight,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        token_weight=token_weight,
    )
    rows = loss_rows(labels, token_weight, ignore_index)
    check_log_values(hidden.shape[:-1].numel(), rows, nonempty=True, ref_logits=ref_logits)
    if ref_hidden is not None and ref_weight is None:
        ref_weight = weight
    loss = FusedLinearKLFunction.apply(
        hidden.reshape(-1, d),
        weight,
        None if ref_hidden is None else ref_hidden.detach().reshape(-1, d),
        None if ref_weight is None else ref_weight.detach(),
        None if ref_logits is None else ref_logits.detach().reshape(-1, vocab),
        None if labels is None else labels.reshape(-1),
        None if token_weight is None else token_weight.detach().reshape(-1),
        temperature,
        ignore_index,
        reduction,
        chunk_size,
        backend,
    )
    return loss.reshape(hidden.shape[:-1]) if reduction == "none" else loss


def fused_linear_kl_topk(
    hidden: Tensor,
    weight: Tensor,
    ref_topk_index: Tensor,
    ref_topk_logprob: Tensor,
    ref_tail_logprob: Tensor,
    *,
    labels: Tensor | None = None,
    token_weight: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Top-k forward KL ``Σ_i w_i KL̃_i`` from cached reference top-k log-probs.

    ``KL̃_i = Σ_{k∈K_i} p_k log(p_k/q_k) + p_t log(p_t/q_t)`` with ``q = softmax(z_i/τ)``,
    ``q_t = Σ_{v∉K_i} q_v`` (computed directly, not as ``1 − Σ_K q_k``). Only the student's
    logits are formed. ``k = V`` (with ``p_t = 0``) gives the exact KL.

    Args:
        ref_topk_index: ``[*hidden.shape[:-1], k]`` distinct token ids per row (any k ≤ V).
            Only the rows that carry a loss are read or validated, so the zero-padded
            ``[B, T, k]`` tensors of :meth:`ReferenceBatch.to_padded
            <unlearn_kernels.train.reference_cache.ReferenceBatch.to_padded>` go in as they are.
        ref_topk_logprob: ``log p_k`` of the same shape (any float dtype), the reference
            log-probs at the same temperature ``τ``.
        ref_tail_logprob: ``[*hidden.shape[:-1]]`` ``log p_t = log(1 − Σ_K p_k)``; ``−inf``
            for an empty tail.

    The other arguments and the return value are those of :func:`fused_linear_kl`.
    """
    vocab, d = check_linear(hidden, weight, None)
    check_selection(labels, token_weight, hidden, vocab, ignore_index)
    rows = loss_rows(labels, token_weight, ignore_index)
    check_topk(hidden, vocab, ref_topk_index, ref_topk_logprob, ref_tail_logprob, rows)
    check_options(reduction, chunk_size)
    temperature = check_temperature(temperature)
    backend = backend_name(backend, hidden.device)
    check_backend_dtype(backend, hidden)
    check_finite(hidden=hidden, weight=weight, token_weight=token_weight)
    check_log_values(
        hidden.shape[:-1].numel(),
        rows,
        ref_topk_logprob=ref_topk_logprob,
        ref_tail_logprob=ref_tail_logprob,
    )
    k = ref_topk_index.shape[-1]
    loss = FusedLinearKLTopkFunction.apply(
        hidden.reshape(-1, d),
        weight,
        ref_topk_index.reshape(-1, k).long(),
        ref_topk_logprob.detach().reshape(-1, k),
        ref_tail_logprob.detach().reshape(-1),
        None if labels is None else labels.reshape(-1),
        None if token_weight is None else token_weight.detach().reshape(-1),
        temperature,
        ignore_index,
        reduction,
        chunk_size,
        backend,
    )
    return loss.reshape(hidden.shape[:-1]) if reduction == "none" else loss
