"""Fused linear, response-only divergences to a cached reference, with signed per-token weights.

For the selected rows ``i`` (label ≠ ignore_index, weight ≠ 0), with student logits
``z_i = cap(W h_i + b)`` (softcap ``cap(z) = c·tanh(z/c)`` if asked) and temperature ``τ``::

    q_i = softmax(z_i / τ),  p_i = softmax(z_ref,i / τ)
    KL_i = Σ_v p_iv (log p_iv − log q_iv)          ∂KL_i/∂z_i = (q_i − p_i) / τ
    loss = Σ_i w_i KL_i (sum), / #labelled rows (mean), / hidden.shape[0] (batchmean),
           [w_i KL_i]_i, 0 elsewhere (none)

``direction="reverse"`` gives ``KL(q ‖ p)`` (gradient ``q (log q − log p − KL)/τ``) and
``beta`` Liger-Kernel's generalised Jensen–Shannon divergence
``β KL(p ‖ m) + (1 − β) KL(q ‖ m)``, ``m = βp + (1 − β)q`` (β = 0 forward, β = 1 reverse).

The reference is a cache, never a second model:

* exact (:func:`fused_linear_kl` with ``ref_hidden``): reference logits
  ``z_ref = cap(W_ref h_ref + b_ref)`` are rebuilt chunk by chunk next to the student's;
* streamed (``ref_logits``): rows of a cached ``[N, V]`` logits tensor (e.g. a memory-mapped
  bf16 safetensors tensor) are read one chunk at a time;
* top-k (:func:`fused_linear_kl_topk`, forward KL only): cached top-k log-probs ``log p_k`` and
  the tail's log-mass ``log p_t``; the approximate loss
  ``KL̃_i = Σ_{k∈K} p_k log(p_k/q_k) + p_t log(p_t/q_t)``, ``q_t = Σ_{v∉K} q_v``, has gradient
  ``(q_v − p_v)/τ`` on the top-k and ``q_v (1 − p_t/q_t)/τ`` off it (for ``Σ_K p_k + p_t = 1``;
  the kernels differentiate the loss exactly otherwise, see ``torch_backend._topk_grad``).

The reference is a constant target: no gradient flows to ``ref_hidden``, ``ref_weight``,
``ref_bias`` or ``ref_logits`` (pass the frozen original weight as ``ref_weight`` if ``weight``
is trained). Gradient modes as in :mod:`unlearn_kernels.ops.cross_entropy`: computed during the
forward sweep for ``sum``/``mean``/``batchmean``; for ``none`` the logsumexps (and the
reverse/JSD centre) are saved and each chunk recomputed in backward with the per-token upstream
gradient. Double backward raises a ``RuntimeError``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from unlearn_kernels._checks import (
    KL_REDUCTIONS,
    check_backend_dtype,
    check_finite,
    check_linear,
    check_log_values,
    check_options,
    check_real,
    check_reference,
    check_selection,
    check_temperature,
    check_topk,
    loss_rows,
)
from unlearn_kernels._options import KLOptions, KLRowMath
from unlearn_kernels.backends import backend_name, get_backend
from unlearn_kernels.ops import library
from unlearn_kernels.ops.autocast import autocast_cast, autocast_off
from unlearn_kernels.ops.chunking import (
    ChunkPlan,
    RowEpilogue,
    RowSelection,
    accumulate_dtype,
    allocate_grads,
    check_logits_dtype,
    finish_grads,
    first_order_only,
    gather_rows,
    linear_into,
    mean_denominator,
    operand,
    plan_chunks,
    scale_saved_grads,
    select_rows,
    sweep,
    sweep_loss_and_grads,
    sweep_row_losses,
    upstream_scale,
)
from unlearn_kernels.ops.streaming import StreamedRows

DIRECTIONS = ("forward", "reverse")


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


def _plan(hidden: Tensor, weight: Tensor, selection: RowSelection, options: KLOptions) -> ChunkPlan:
    """The chunk plan of the selected rows (the reference buffers follow the student's)."""
    return plan_chunks(
        selection.index.numel(),
        *weight.shape,
        hidden.dtype,
        hidden.device.type,
        options.logits_dtype,
        options.chunk_size,
    )


class _ReferenceLogits:
    """Reference logits of chunk ``[start, end)`` of the selected rows, in one reused buffer of
    the plan's logits dtype: rebuilt as ``H_ref[index] Wᵣᵀ (+ b_ref)`` from rows gathered into a
    chunk-sized buffer (exact), or copied from rows of cached logits (streamed; from CPU
    memory to CUDA through :class:`~unlearn_kernels.ops.streaming.StreamedRows`, the next
    chunk's copy overlapping this chunk's work)."""

    def __init__(
        self,
        ref_hidden: Tensor | None,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        ref_logits: Tensor | None,
        index: Tensor,
        plan: ChunkPlan,
        device: torch.device,
    ) -> None:
        self.ref_hidden, self.ref_logits, self.index = ref_hidden, ref_logits, index
        self.ref_weight = operand(ref_weight, plan)
        self.ref_bias = None if ref_bias is None else ref_bias.to(plan.logits_dtype)
        m = min(plan.rows, plan.n_rows)
        self.buffer = torch.empty(m, plan.vocab, dtype=plan.logits_dtype, device=device)
        self.rows = self.streamed = None
        if ref_hidden is not None:
            self.rows = torch.empty(m, plan.d, dtype=plan.operand_dtype, device=device)
        elif ref_logits.device.type == "cpu" and device.type == "cuda":
            self.streamed = StreamedRows(ref_logits, index, list(plan.bounds()), device)

    def __call__(self, start: int, end: int) -> Tensor:
        out = self.buffer[: end - start]
        chunk = self.index[start:end]
        if self.ref_logits is None:
            rows = gather_rows(self.rows[: end - start], self.ref_hidden, chunk)
            return linear_into(out, rows, self.ref_weight, self.ref_bias)
        if self.streamed is not None:
            return self.streamed.take(start, end, out)
        return gather_rows(out, self.ref_logits, chunk)


def _reduced_forward(
    ctx,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    selection: RowSelection,
    row_epilogue: RowEpilogue,
    stats: tuple[torch.dtype, ...],
) -> Tensor:
    """``sum``/``mean``/``batchmean`` forward of a KL function: the loss; the inputs and their
    gradients saved (see :func:`_first_order`)."""
    options = ctx.options
    loss, grads, _ = sweep_loss_and_grads(
        hidden,
        weight,
        bias,
        selection,
        mean_denominator(selection, options.reduction, options.batch),
        ctx.needs_input_grad[:3],
        row_epilogue,
        stats,
        ctx.plan,
    )
    ctx.save_for_backward(hidden, weight, bias, *grads)
    return loss


def _first_order(ctx, op: str, grad_output: Tensor, recompute) -> tuple[Tensor | None, ...]:
    """Backward of a KL function whose saved tensors start with ``(hidden, weight, bias)``:
    the saved gradients scaled (``sum``/``mean``/``batchmean``) or ``recompute(ctx,
    grad_output)`` (``none``), under no_grad, then guarded against double backward."""
    with torch.no_grad():
        if ctx.options.reduction == "none":
            grads = recompute(ctx, grad_output)
        else:
            grads = scale_saved_grads(ctx.saved_tensors[3:], grad_output)
    return first_order_only(op, ctx.saved_tensors[:3], grads)


class FusedLinearKLFunction(torch.autograd.Function):
    """Autograd function over flattened inputs: ``hidden [N, d]``; exactly one of
    ``ref_hidden [N, d]`` (with ``ref_weight``, ``ref_bias``) and ``ref_logits [N, V]``."""

    @staticmethod
    @autocast_off
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ref_hidden: Tensor | None,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        ref_logits: Tensor | None,
        labels: Tensor | None,
        token_weight: Tensor | None,
        options: KLOptions,
    ) -> Tensor:
        epilogues = get_backend(options.backend, hidden.device)
        acc_dtype = accumulate_dtype(hidden.dtype)
        selection = _selection(
            hidden.shape[0], labels, token_weight, options.ignore_index, acc_dtype, hidden.device
        )
        plan = _plan(hidden, weight, selection, options)
        reference = _ReferenceLogits(
            ref_hidden, ref_weight, ref_bias, ref_logits, selection.index, plan, hidden.device
        )
        ctx.options, ctx.n_total, ctx.plan = options, hidden.shape[0], plan
        ctx.ref_logits = ref_logits

        def row_epilogue(start: int, end: int, logits: Tensor, grad_scale: Tensor | None):
            ref = reference(start, end)
            return epilogues.kl_forward(logits, ref, grad_scale, options.math)

        stats = (torch.float64,) * 3
        if options.reduction != "none":
            return _reduced_forward(ctx, hidden, weight, bias, selection, row_epilogue, stats)
        loss, (lse, lse_ref, centre) = sweep_row_losses(
            hidden, weight, bias, selection, row_epilogue, stats, plan
        )
        ctx.save_for_backward(
            hidden,
            weight,
            bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            selection.index,
            selection.weight,
            lse,
            lse_ref,
            centre,
        )
        return loss

    @staticmethod
    @autocast_off
    def backward(ctx, grad_output: Tensor):
        grads = _first_order(ctx, "fused_linear_kl", grad_output, _kl_recompute)
        return (*grads, *[None] * 7)


def _kl_recompute(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """``reduction='none'``: rebuild each chunk and write ``g_i w_i ∂D_i/∂x_i`` over it."""
    (
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        index,
        token_weight,
        lse,
        lse_ref,
        centre,
    ) = ctx.saved_tensors
    options, plan = ctx.options, ctx.plan
    epilogues = get_backend(options.backend, hidden.device)
    scale = upstream_scale(grad_output, index, token_weight, lse.dtype)
    reference = _ReferenceLogits(
        ref_hidden, ref_weight, ref_bias, ctx.ref_logits, index, plan, hidden.device
    )
    grads = allocate_grads(hidden, index.numel(), weight, bias, ctx.needs_input_grad[:3])

    def backward(start: int, end: int, logits: Tensor) -> None:
        epilogues.kl_backward(
            logits,
            reference(start, end),
            lse[start:end],
            lse_ref[start:end],
            centre[start:end],
            scale[start:end],
            options.math,
        )

    sweep(hidden, index, weight, bias, backward, grads, plan)
    return finish_grads(grads, weight, bias)


class FusedLinearKLTopkFunction(torch.autograd.Function):
    """Autograd function over flattened inputs: ``hidden [N, d]``, ``index``/``logprob``
    ``[N, k]``, ``tail_logprob [N]``."""

    @staticmethod
    @autocast_off
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        topk_index: Tensor,
        topk_logprob: Tensor,
        tail_logprob: Tensor,
        labels: Tensor | None,
        token_weight: Tensor | None,
        options: KLOptions,
    ) -> Tensor:
        epilogues = get_backend(options.backend, hidden.device)
        acc_dtype = accumulate_dtype(hidden.dtype)
        selection = _selection(
            hidden.shape[0], labels, token_weight, options.ignore_index, acc_dtype, hidden.device
        )
        plan = _plan(hidden, weight, selection, options)
        index = topk_index.index_select(0, selection.index)
        logprob = topk_logprob.index_select(0, selection.index)
        tail = tail_logprob.index_select(0, selection.index)
        ctx.options, ctx.n_total, ctx.plan = options, hidden.shape[0], plan

        def row_epilogue(start: int, end: int, logits: Tensor, grad_scale: Tensor | None):
            cache = (index[start:end], logprob[start:end], tail[start:end])
            return epilogues.kl_topk_forward(logits, *cache, grad_scale, options.math)

        stats = (torch.float64,) * 2
        if options.reduction != "none":
            return _reduced_forward(ctx, hidden, weight, bias, selection, row_epilogue, stats)
        loss, (lse, lse_tail) = sweep_row_losses(
            hidden, weight, bias, selection, row_epilogue, stats, plan
        )
        ctx.save_for_backward(
            hidden,
            weight,
            bias,
            index,
            logprob,
            tail,
            selection.index,
            selection.weight,
            lse,
            lse_tail,
        )
        return loss

    @staticmethod
    @autocast_off
    def backward(ctx, grad_output: Tensor):
        grads = _first_order(ctx, "fused_linear_kl_topk", grad_output, _topk_recompute)
        return (*grads, *[None] * 6)


def _topk_recompute(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """``reduction='none'``: rebuild each chunk and write the scaled top-k gradient over it."""
    hidden, weight, bias, index, logprob, tail, row_index, token_weight, lse, lse_tail = (
        ctx.saved_tensors
    )
    options = ctx.options
    epilogues = get_backend(options.backend, hidden.device)
    scale = upstream_scale(grad_output, row_index, token_weight, lse.dtype)
    grads = allocate_grads(hidden, row_index.numel(), weight, bias, ctx.needs_input_grad[:3])

    def backward(start: int, end: int, logits: Tensor) -> None:
        epilogues.kl_topk_backward(
            logits,
            index[start:end],
            logprob[start:end],
            tail[start:end],
            lse[start:end],
            lse_tail[start:end],
            scale[start:end],
            options.math,
        )

    sweep(hidden, row_index, weight, bias, backward, grads, ctx.plan)
    return finish_grads(grads, weight, bias)


# ---- options ------------------------------------------------------------------------------


def kl_row_math(
    *,
    reduction: str,
    chunk_size: int | None,
    temperature: float,
    softcap: float | None,
    direction: str = "forward",
    beta: float | None = None,
) -> KLRowMath:
    """The tensor-free options of the fused KL functions, validated (a ``ValueError`` names the
    argument), as the epilogues' row math (β: 0 forward, 1 reverse, else the JSD)."""
    check_options(reduction, chunk_size, softcap, KL_REDUCTIONS)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if beta is not None and direction != "forward":
        raise ValueError("pass direction or beta (the generalised JSD), not both")
    if beta is None:
        beta = 0.0 if direction == "forward" else 1.0
    return KLRowMath(
        temperature=check_temperature(temperature),
        softcap=None if softcap is None else float(softcap),
        beta=check_real("beta", beta, 0.0, 1.0),
    )


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
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    softcap: float | None = None,
    direction: str = "forward",
    beta: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    logits_dtype: str = "auto",
    backend: str | None = None,
) -> Tensor:
    """Divergence ``Σ_i w_i D(p_i, q_i)`` from a cached reference to ``hidden @ weightᵀ``:
    forward KL ``KL(p ‖ q)`` by default.

    Args:
        hidden: ``[N, d]`` or ``[B, T, d]`` student final hidden states (shifted like labels).
        weight: ``[V, d]`` student output weight (frozen or trainable).
        ref_hidden: exact mode: cached reference hidden states of ``hidden``'s shape (any float
            dtype, e.g. a bf16 cache; cast to ``hidden``'s dtype row by row).
        ref_weight: reference output weight; default ``weight`` (under LoRA the shared frozen
            layer; pass the original weight when ``weight`` is trained).
        ref_logits: streamed mode: cached reference logits ``[*hidden.shape[:-1], V]`` in any
            float dtype, on any device (e.g. a memory-mapped bf16 CPU tensor); only the selected
            rows are read, one chunk at a time. They are final logits: softcap is not applied.
        labels: rows with ``labels == ignore_index`` carry no loss (values are not used
            otherwise); without labels and token_weight every row counts.
        token_weight: signed per-token weights ``w_i`` (not differentiated); ``w_i = 0`` skips
            the row (it still counts for ``mean``).
        bias: optional ``[V]`` student output bias (differentiated).
        ref_bias: reference output bias (exact mode); default ``bias`` when ``ref_weight`` is
            defaulted too (the reference shares the head), else none.
        softcap: ``c`` in ``z ← c·tanh(z/c)``, applied to the student's logits and to the
            reference logits rebuilt from ``ref_hidden``.
        direction: ``"forward"`` ``KL(p ‖ q)`` or ``"reverse"`` ``KL(q ‖ p)``.
        beta: the generalised Jensen–Shannon divergence ``β KL(p ‖ m) + (1 − β) KL(q ‖ m)``,
            ``m = βp + (1 − β)q``, as Liger-Kernel's fused linear JSD defines it: β in
            ``[0, 1]``, β = 0 the forward and β = 1 the reverse KL (``direction`` stays default).
        temperature: ``τ > 0``; ``p = softmax(z_ref/τ)``, ``q = softmax(z/τ)``, no ``τ²`` factor.
        ignore_index: the label of rows that carry no loss.
        reduction: ``"mean"`` (over rows with a label, or all rows without labels), ``"sum"``,
            ``"batchmean"`` (the sum over ``hidden.shape[0]``, as ``F.kl_div``) or ``"none"``
            (per-token ``w_i D_i``, 0 on skipped rows).
        chunk_size: rows per chunk; default: each logits buffer within 256 MiB in its own
            dtype, a multiple of 128 rows, at least 512 (two such buffers are alive: student
            and reference logits).
        logits_dtype: ``"auto"`` (fp32 logits for bf16/fp16 inputs on CUDA, the input dtype
            on CPU), ``"input"`` or ``"float32"``; see :mod:`unlearn_kernels.ops.chunking`.
        backend: ``"torch"``, ``"cpu"`` or ``"triton"``; default by device.

    Under ``torch.autocast`` the products run in autocast's dtype, as ``torch.mm`` would.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs); gradients flow to ``hidden``, ``weight`` and
        ``bias``.
    """
    if torch.compiler.is_compiling():  # one opaque operator in the graph
        return library.call("kl", **locals())
    hidden, weight, bias, ref_weight, ref_bias = autocast_cast(
        hidden, weight, bias, ref_weight, ref_bias
    )
    vocab, d = check_linear(hidden, weight, bias)
    if ref_hidden is not None and ref_weight is None:
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
    check_reference(hidden, weight, ref_hidden, ref_weight, ref_bias, ref_logits)
    check_selection(labels, token_weight, hidden, vocab, ignore_index)
    math = kl_row_math(
        reduction=reduction,
        chunk_size=chunk_size,
        temperature=temperature,
        softcap=softcap,
        direction=direction,
        beta=beta,
    )
    backend = backend_name(backend, hidden.device)
    check_backend_dtype(backend, hidden)
    check_finite(
        hidden=hidden,
        weight=weight,
        bias=bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        token_weight=token_weight,
    )
    rows = loss_rows(labels, token_weight, ignore_index)
    check_log_values(hidden.shape[:-1].numel(), rows, nonempty=True, ref_logits=ref_logits)
    options = KLOptions(
        math=replace(math, softcap_ref=ref_hidden is not None and math.softcap is not None),
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        backend=backend,
        logits_dtype=check_logits_dtype(logits_dtype),
        batch=hidden.shape[0],
    )
    loss = FusedLinearKLFunction.apply(
        hidden.reshape(-1, d),
        weight,
        bias,
        None if ref_hidden is None else ref_hidden.detach().reshape(-1, d),
        None if ref_weight is None else ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(),
        None if ref_logits is None else ref_logits.detach().reshape(-1, vocab),
        None if labels is None else labels.reshape(-1),
        None if token_weight is None else token_weight.detach().reshape(-1),
        options,
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
    bias: Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    logits_dtype: str = "auto",
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
        softcap: ``c`` in ``z ← c·tanh(z/c)`` for the student's logits (the cached log-probs
            are the reference's final ones).

    The other arguments and the return value are those of :func:`fused_linear_kl`.
    """
    if torch.compiler.is_compiling():  # one opaque operator in the graph
        return library.call("kl_topk", **locals())
    hidden, weight, bias = autocast_cast(hidden, weight, bias)
    vocab, d = check_linear(hidden, weight, bias)
    check_selection(labels, token_weight, hidden, vocab, ignore_index)
    rows = loss_rows(labels, token_weight, ignore_index)
    check_topk(hidden, vocab, ref_topk_index, ref_topk_logprob, ref_tail_logprob, rows)
    math = kl_row_math(
        reduction=reduction, chunk_size=chunk_size, temperature=temperature, softcap=softcap
    )
    backend = backend_name(backend, hidden.device)
    check_backend_dtype(backend, hidden)
    check_finite(hidden=hidden, weight=weight, bias=bias, token_weight=token_weight)
    check_log_values(
        hidden.shape[:-1].numel(),
        rows,
        ref_topk_logprob=ref_topk_logprob,
        ref_tail_logprob=ref_tail_logprob,
    )
    options = KLOptions(
        math=math,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        backend=backend,
        logits_dtype=check_logits_dtype(logits_dtype),
        batch=hidden.shape[0],
    )
    k = ref_topk_index.shape[-1]
    loss = FusedLinearKLTopkFunction.apply(
        hidden.reshape(-1, d),
        weight,
        bias,
        ref_topk_index.reshape(-1, k).long(),
        ref_topk_logprob.detach().reshape(-1, k),
        ref_tail_logprob.detach().reshape(-1),
        None if labels is None else labels.reshape(-1),
        None if token_weight is None else token_weight.detach().reshape(-1),
        options,
    )
    return loss.reshape(hidden.shape[:-1]) if reduction == "none" else loss
