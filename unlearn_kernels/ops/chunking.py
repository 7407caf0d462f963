"""The chunk driver shared by every fused op and every backend.

1. :func:`select_rows` keeps the rows that carry a loss (label ≠ ignore_index and token weight
   ≠ 0) *before* any matrix product, so prompt and padding rows cost nothing.
2. :func:`sweep` walks those rows in chunks of ``m`` rows. Per chunk it forms the logits
   ``X = H_c Wᵀ (+ b)`` with torch's matmul into one reused ``[m, V]`` buffer, lets the
   backend epilogue finish the loss and overwrite ``X`` with ``G = ∂loss/∂X``, then projects
   ``dH_c = G W``, ``dW += Gᵀ H_c`` (fp32 accumulator) and ``db += Σ_rows G``.

At most one chunk of logits (plus one of reference logits for KL) is ever alive.

3. Every loss forward is one of two sweeps over a :data:`RowEpilogue`:
   :func:`sweep_row_losses` (``reduction='none'``: per-row losses and the statistics its
   recompute-mode backward needs) or :func:`sweep_loss_and_grads` (``sum``/``mean``/
   ``batchmean``: the reduced loss and its gradients in the same sweep); both also keep any
   per-row outputs the op returns (logsumexp, argmax, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: Default budget for one chunk of fp32 logits.
CHUNK_BUDGET_BYTES = 256 * 2**20
#: Below this many rows the products stop running at full speed (measured on CPU and GPU).
MIN_CHUNK_ROWS = 512


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/fp16/bf16 inputs; fp64 stays fp64 (for ``gradcheck``)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class RowSelection:
    """The rows of the flattened batch that enter the products."""

    index: Tensor  # int64 [n]: positions in the flattened batch
    target: Tensor  # int64 [n]: their labels (0 where no label is needed)
    weight: Tensor | None  # [n]: their token weights (accumulation dtype), None for all ones
    n_labelled: int  # rows with label != ignore_index: the denominator of "mean"


def select_rows(
    labels: Tensor | None, token_weight: Tensor | None, ignore_index: int, dtype: torch.dtype
) -> RowSelection:
    """Rows with ``labels != ignore_index`` (if given) and ``token_weight != 0`` (if given);
    their token weights are returned in ``dtype``."""
    if labels is None and token_weight is None:
        raise ValueError("labels or token_weight is needed to select the rows that carry a loss")
    ref = labels if labels is not None else token_weight
    keep = torch.ones(ref.numel(), dtype=torch.bool, device=ref.device)
    n_labelled = ref.numel()
    if labels is not None:
        keep = labels.reshape(-1).long() != ignore_index  # int64: -100 is no uint8 value
        n_labelled = int(keep.sum())
    if token_weight is not None:
        keep = keep & (token_weight.reshape(-1) != 0)
    index = keep.nonzero().squeeze(1)
    if labels is not None:
        target = labels.reshape(-1).index_select(0, index).long()
    else:
        target = torch.zeros_like(index)
    weight = None
    if token_weight is not None:
        weight = token_weight.reshape(-1).index_select(0, index).to(dtype)
    return RowSelection(index, target, weight, n_labelled)


def chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else ``max(512, budget / 4V)`` balanced so the
    chunks of ``n_rows`` come out of near-equal size (no small, slow last product)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n_rows))
    target = max(MIN_CHUNK_ROWS, CHUNK_BUDGET_BYTES // (4 * vocab))
    n_chunks = max(1, -(-n_rows // target))
    return max(1, -(-n_rows // n_chunks))


def linear_into(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out ← h Wᵀ (+ b)`` without allocating."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


@dataclass
class GradTargets:
    """Where :func:`sweep` projects the logit gradient; ``None`` entries are skipped."""

    hidden: Tensor | None = None  # [n, d], hidden's dtype: dH for the selected rows
    weight: Tensor | None = None  # [V, d] fp32 (fp64) accumulator
    bias: Tensor | None = None  # [V] fp32 (fp64) accumulator

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None


#: ``epilogue(start, end, logits)``: finish the loss of rows ``[start, end)`` and, when the sweep
#: has gradient targets, overwrite ``logits`` with ``∂loss/∂logits``.
Epilogue = Callable[[int, int, Tensor], None]


def sweep(
    hidden_rows: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    epilogue: Epilogue,
    grads: GradTargets,
    chunk_size: int | None,
) -> None:
    """Run ``epilogue`` over every chunk of ``hidden_rows @ weightᵀ`` and project gradients."""
    n = hidden_rows.shape[0]
    if n == 0:
        return
    rows = chunk_rows(n, weight.shape[0], chunk_size)
    buffer = torch.empty(rows, weight.shape[0], dtype=hidden_rows.dtype, device=hidden_rows.device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h = hidden_rows[start:end]
        logits = linear_into(buffer[: end - start], h, weight, bias)
        epilogue(start, end, logits)
        project(logits, h, weight, grads, start, end)


def project(g: Tensor, h: Tensor, weight: Tensor, grads: GradTargets, start: int, end: int) -> None:
    """``dH[start:end] = G W``, ``dW += Gᵀ H``, ``db += Σ G`` (the last two in fp32)."""
    if grads.hidden is not None:
        torch.mm(g, weight, out=grads.hidden[start:end])
    if grads.weight is not None:
        if g.dtype == grads.weight.dtype:
            grads.weight.addmm_(g.t(), h)
        else:
            grads.weight.add_(g.t() @ h)
    if grads.bias is not None:
        grads.bias.add_(g.sum(0, dtype=grads.bias.dtype))


def allocate_grads(
    hidden_rows: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]
) -> GradTargets:
    """Gradient targets for the ``(hidden, weight, bias)`` inputs that need a gradient."""
    need_hidden, need_weight, need_bias = needs
    acc = {"dtype": accumulate_dtype(weight.dtype), "device": weight.device}
    return GradTargets(
        hidden=torch.empty_like(hidden_rows) if need_hidden else None,
        weight=torch.zeros(weight.shape, **acc) if need_weight else None,
        bias=torch.zeros(weight.shape[0], **acc) if need_bias and bias is not None else None,
    )


def finish_grads(
    grads: GradTargets, n_total: int, index: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Scatter ``dH`` back to all ``n_total`` rows (zeros elsewhere) and cast to input dtypes."""
    grad_hidden = None
    if grads.hidden is not None:
        grad_hidden = grads.hidden.new_zeros(n_total, grads.hidden.shape[1])
        grad_hidden.index_copy_(0, index, grads.hidden)
    grad_weight = None if grads.weight is None else grads.weight.to(weight.dtype)
    grad_bias = None if grads.bias is None or bias is None else grads.bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def reduction_scale(selection: RowSelection, denominator: float, like: Tensor) -> Tensor:
    """``s_i = w_i / D``: the reduced loss is ``Σ_i s_i ℓ_i`` and ``s_i`` scales row ``i``'s
    logit gradient (``D`` from :func:`mean_denominator`, 1 for ``sum``)."""
    scale = torch.full_like(like, 1.0 / denominator)
    return scale if selection.weight is None else scale.mul_(selection.weight)


def mean_denominator(selection: RowSelection, reduction: str, batch: int = 1) -> float:
    """``D`` of :func:`reduction_scale`: the number of labelled rows for ``mean`` (at least 1),
    ``batch`` for ``batchmean``, 1 for ``sum``."""
    if reduction == "mean":
        return float(max(selection.n_labelled, 1))
    return float(batch) if reduction == "batchmean" else 1.0


def upstream_scale(
    grad_output: Tensor, index: Tensor, weight: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """``g_i w_i`` of the selected rows: the row scale of a recompute-mode (``none``) backward."""
    scale = grad_output.reshape(-1).index_select(0, index).to(dtype)
    return scale if weight is None else scale.mul_(weight)


def graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph`` or ``create_graph``), so
    that tensors saved for it may be read again by a later backward. Unknown means kept."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def scale_saved_grads(
    grads: tuple[Tensor | None, ...], grad_output: Tensor
) -> tuple[Tensor | None, ...]:
    """Gradients saved by a forward sweep, times ``grad_output``.

    The saved tensors themselves are returned only when ``grad_output == 1`` and this backward
    frees the graph: nothing else holds them afterwards, so whoever receives them (``.grad``)
    owns them, and no copy is made. Otherwise fresh tensors are returned, so that a later
    backward through the retained graph finds its saved gradients intact whatever is done to
    the results (zeroed, clipped in place), as with plain PyTorch.
    """
    if not graph_kept() and torch.equal(grad_output, torch.ones_like(grad_output)):
        return grads
    return tuple(None if g is None else g * grad_output for g in grads)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the gradients a fused op's backward returns under ``create_graph=True``,
    connected to the op's inputs; differentiating through it raises."""

    @staticmethod
    def forward(ctx, op: str, n_inputs: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.op = op
        return tuple(t.detach() for t in tensors[n_inputs:])

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        raise RuntimeError(
            f"{ctx.op} does not support double backward: its gradient is computed by a fused "
            "sweep that records no graph of its own, so differentiating that gradient again "
            "(a Hessian-vector product through create_graph=True) is not available"
        )


def first_order_only(
    op: str, inputs: tuple[Tensor | None, ...], grads: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """``grads`` as they are, unless this backward records a graph (``create_graph=True``):
    then they are returned through :class:`_FirstOrderOnly`, so that a second backward through
    them raises a clear error instead of silently missing the op's second-order term."""
    if not torch.is_grad_enabled():
        return grads
    anchors = tuple(t for t in inputs if t is not None and t.requires_grad)
    present = [g for g in grads if g is not None]
    if not anchors or not present:
        return grads
    guarded = iter(_FirstOrderOnly.apply(op, len(anchors), *anchors, *present))
    return tuple(None if g is None else next(guarded) for g in grads)


def scatter_rows(row_loss: Tensor, index: Tensor, n_total: int) -> Tensor:
    """Per-row losses of the selected rows back to all ``n_total`` rows, 0 elsewhere."""
    return row_loss.new_zeros(n_total).index_copy_(0, index, row_loss)


#: ``row_epilogue(start, end, logits, grad_scale)`` → ``(row_loss, *row_outputs)``: a backend
#: epilogue bound to the op's per-row inputs; with ``grad_scale`` (rows ``[start, end)`` of it)
#: it also overwrites ``logits`` with the scaled gradient. ``row_outputs`` are per-row values
#: the op keeps (statistics for a recompute, or results it returns), in the dtypes it names.
RowEpilogue = Callable[[int, int, Tensor, Tensor | None], tuple[Tensor, ...]]


def _swept(
    hidden_rows: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    row_epilogue: RowEpilogue,
    grad_scale: Tensor | None,
    grads: GradTargets,
    outputs: tuple[torch.dtype, ...],
    chunk_size: int | None,
) -> tuple[Tensor, list[Tensor]]:
    """Per-row losses (accumulation dtype) and the ``outputs`` of every selected row."""
    n, device = hidden_rows.shape[0], hidden_rows.device
    row_loss = torch.empty(n, dtype=accumulate_dtype(hidden_rows.dtype), device=device)
    kept = [torch.empty(n, dtype=dtype, device=device) for dtype in outputs]

    def epilogue(start: int, end: int, logits: Tensor) -> None:
        row_scale = None if grad_scale is None else grad_scale[start:end]
        row_loss[start:end], *values = row_epilogue(start, end, logits, row_scale)
        for buffer, value in zip(kept, values, strict=True):
            buffer[start:end] = value

    sweep(hidden_rows, weight, bias, epilogue, grads, chunk_size)
    return row_loss, kept


def sweep_row_losses(
    hidden_rows: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    selection: RowSelection,
    n_total: int,
    row_epilogue: RowEpilogue,
    outputs: tuple[torch.dtype, ...],
    chunk_size: int | None,
) -> tuple[Tensor, list[Tensor]]:
    """``reduction='none'`` forward: ``[w_i ℓ_i]`` over all ``n_total`` rows (0 where not
    selected) and the epilogue's per-row ``outputs`` (e.g. fp64 statistics for the recompute)."""
    row_loss, kept = _swept(
        hidden_rows, weight, bias, row_epilogue, None, GradTargets(), outputs, chunk_size
    )
    if selection.weight is not None:
        row_loss.mul_(selection.weight)
    return scatter_rows(row_loss, selection.index, n_total), kept


def sweep_loss_and_grads(
    hidden_rows: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    selection: RowSelection,
    denominator: float,
    needs: tuple[bool, bool, bool],
    n_total: int,
    row_epilogue: RowEpilogue,
    outputs: tuple[torch.dtype, ...],
    chunk_size: int | None,
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None], list[Tensor]]:
    """``sum``/``mean`` forward: the loss ``Σ_i s_i ℓ_i`` (:func:`reduction_scale`), in the
    same sweep the gradients of ``(hidden, weight, bias)`` that ``needs`` asks for, and the
    epilogue's per-row ``outputs``."""
    acc = accumulate_dtype(hidden_rows.dtype)
    rows = torch.empty(hidden_rows.shape[0], dtype=acc, device=hidden_rows.device)
    scale = reduction_scale(selection, denominator, rows)
    grads = allocate_grads(hidden_rows, weight, bias, needs)
    row_loss, kept = _swept(
        hidden_rows,
        weight,
        bias,
        row_epilogue,
        scale if grads.any else None,
        grads,
        outputs,
        chunk_size,
    )
    loss = torch.dot(row_loss, scale)
    return loss, finish_grads(grads, n_total, selection.index, weight, bias), kept
