"""The chunk driver shared by every fused op and every backend.

1. :func:`select_rows` keeps the rows that carry a loss (label ≠ ignore_index and token weight
   ≠ 0) *before* any matrix product, so prompt and padding rows cost nothing.
2. :func:`plan_chunks` sizes the chunks: ``m`` rows whose ``[m, V]`` logits buffer, in the dtype
   it really has (:func:`logits_dtype_for`), fits :data:`CHUNK_BUDGET_BYTES`, ``m`` a multiple
   of :data:`ROW_MULTIPLE` (whole GEMM tiles), at least :data:`MIN_CHUNK_ROWS`, and the chunks
   of near-equal size.
3. :func:`sweep` walks the selected rows chunk by chunk. Per chunk it gathers the chunk's hidden
   rows into one reused ``[m, d]`` buffer, forms the logits ``X = H_c Wᵀ (+ b)`` into one
   reused ``[m, V]`` buffer, lets the backend epilogue finish the loss and overwrite ``X`` with
   ``G = ∂loss/∂X``, then projects ``dW += Gᵀ H_c`` and ``db += Σ_rows G`` into fp32
   accumulators and ``G W`` into the gathered-rows buffer, from where it is scattered straight
   into the rows of the final ``[N, d]`` ``dH``. No copy of all the selected rows and no staging
   ``dH`` exist: beyond the inputs and the returned gradients, a sweep holds one chunk of logits
   (plus one of reference logits for KL, and on CUDA with fp32 logits of bf16/fp16 inputs their
   gradient cast to the input dtype for the products) and one ``[m, d]`` buffer.

Logits dtype (``logits_dtype``): ``"auto"`` gives fp32 logits for bf16/fp16 inputs on CUDA (the
GEMM writes fp32: ``torch.mm(..., out_dtype=torch.float32)``) and the input dtype on CPU, where
torch has no GEMM with a wider output and fp32 products cost ~4× the bf16 ones
(``benchmarks/results/logits_dtype.md``); ``"input"`` keeps the input dtype everywhere;
``"float32"`` forces fp32 logits (on CPU by running the products in fp32 on an fp32 copy of the
weight). fp32 and fp64 inputs always have logits of their own dtype.

4. Every loss forward is one of two sweeps over a :data:`RowEpilogue`:
   :func:`sweep_row_losses` (``reduction='none'``: per-row losses and the statistics its
   recompute-mode backward needs) or :func:`sweep_loss_and_grads` (``sum``/``mean``/
   ``batchmean``: the reduced loss and its gradients in the same sweep); both also keep any
   per-row outputs the op returns (logsumexp, argmax, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

#: Default budget for one chunk's logits buffer, in the buffer's own dtype.
CHUNK_BUDGET_BYTES = 256 * 2**20
#: Below this many rows the products stop running at full speed (measured on CPU and GPU).
MIN_CHUNK_ROWS = 512
#: Chunk row counts are multiples of this (GEMM tile heights divide it), except a shorter last
#: chunk and chunks of fewer rows than there are.
ROW_MULTIPLE = 128
#: Values of the ops' ``logits_dtype`` option.
LOGITS_DTYPES = ("auto", "input", "float32")
#: V-slices of the CPU's bf16/fp16 ``dW`` update (each product rounded to bf16, then added in
#: fp32), bounding its temporary to ``V/8 × d``.
CPU_DW_SLICES = 8
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/fp16/bf16 inputs; fp64 stays fp64 (for ``gradcheck``)."""
    return torch.promote_types(dtype, torch.float32)


def check_logits_dtype(logits_dtype: str) -> str:
    """``logits_dtype`` is one of :data:`LOGITS_DTYPES` (``ValueError`` naming it otherwise)."""
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
    return logits_dtype


def logits_dtype_for(dtype: torch.dtype, device_type: str, mode: str = "auto") -> torch.dtype:
    """The dtype of the chunk logits for inputs of ``dtype`` on ``device_type`` (see the module
    docstring): fp32 for bf16/fp16 inputs with ``"float32"``, or ``"auto"`` on CUDA; else
    ``dtype``."""
    check_logits_dtype(mode)
    if dtype not in _LOW_PRECISION or mode == "input":
        return dtype
    if mode == "float32" or device_type == "cuda":
        return torch.float32
    return dtype


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


def chunk_rows(n_rows: int, vocab: int, chunk_size: int | None, element_size: int) -> int:
    """Rows per chunk: ``chunk_size`` if given; else the most rows, a multiple of
    :data:`ROW_MULTIPLE` and at least :data:`MIN_CHUNK_ROWS`, whose ``[rows, vocab]`` buffer of
    ``element_size``-byte logits fits :data:`CHUNK_BUDGET_BYTES`, lowered (still a multiple of
    :data:`ROW_MULTIPLE`) so the chunks of ``n_rows`` come out of near-equal size."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n_rows))
    fits = CHUNK_BUDGET_BYTES // (element_size * vocab) // ROW_MULTIPLE * ROW_MULTIPLE
    target = max(MIN_CHUNK_ROWS, fits)
    if n_rows <= target:
        return max(1, n_rows)
    n_chunks = -(-n_rows // target)
    balanced = -(-n_rows // n_chunks)
    return -(-balanced // ROW_MULTIPLE) * ROW_MULTIPLE


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ChunkPlan:
    """How a sweep walks ``n_rows`` selected rows through a ``[vocab, d]`` output layer: what
    :func:`sweep` allocates and loops over, and what ``benchmarks/gpu_model.py`` models."""

    n_rows: int
    #: rows per chunk (the last chunk may be shorter)
    rows: int
    vocab: int
    d: int
    input_dtype: torch.dtype
    logits_dtype: torch.dtype
    #: dtype of the products' operands: the input dtype, fp32 for fp32 logits on CPU
    operand_dtype: torch.dtype

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.rows)

    def bounds(self) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of every chunk."""
        for start in range(0, self.n_rows, self.rows):
            yield start, min(start + self.rows, self.n_rows)

    @property
    def casts_gradient(self) -> bool:
        """Whether the logit gradient is cast to the operand dtype before the products (fp32
        logits of bf16/fp16 inputs on CUDA)."""
        return self.logits_dtype != self.operand_dtype

    def buffer_bytes(self, logits_buffers: int = 1, row_buffers: int = 1) -> dict[str, int]:
        """Bytes of the buffers a sweep allocates: ``logits_buffers`` ``[m, V]`` logits (2 for
        KL: student and reference), the gradient cast when :attr:`casts_gradient`,
        ``row_buffers`` ``[m, d]`` gathered rows (2 for exact KL), and the fp32 weight copy
        of fp32 logits on CPU (per weight the sweep multiplies by)."""
        m = min(self.rows, self.n_rows)
        logits, operand = _element_size(self.logits_dtype), _element_size(self.operand_dtype)
        sizes = {
            "logits": logits_buffers * m * self.vocab * logits,
            "rows": row_buffers * m * self.d * operand,
        }
        if self.casts_gradient:
            sizes["gradient_cast"] = m * self.vocab * operand
        if self.operand_dtype != self.input_dtype:
            sizes["weight_copy"] = self.vocab * self.d * operand
        return sizes


def plan_chunks(
    n_rows: int,
    vocab: int,
    d: int,
    dtype: torch.dtype,
    device_type: str,
    logits_dtype: str = "auto",
    chunk_size: int | None = None,
) -> ChunkPlan:
    """The :class:`ChunkPlan` of ``n_rows`` selected rows of ``dtype`` inputs on
    ``device_type`` (``"cpu"``/``"cuda"``), chunked by :func:`chunk_rows` for the logits' real
    element size (:func:`logits_dtype_for`)."""
    logits = logits_dtype_for(dtype, device_type, logits_dtype)
    operand = dtype if device_type == "cuda" else logits
    rows = chunk_rows(n_rows, vocab, chunk_size, _element_size(logits))
    return ChunkPlan(n_rows, rows, vocab, d, dtype, logits, operand)


def operand(tensor: Tensor | None, plan: ChunkPlan) -> Tensor | None:
    """A weight in the plan's operand dtype (a copy only for fp32 logits on CPU)."""
    return None if tensor is None else tensor.to(plan.operand_dtype)


def linear_into(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out ← h Wᵀ (+ b)`` without allocating; a wider ``out`` (fp32 for bf16/fp16 ``h``, on
    CUDA) is written by the GEMM itself (``out_dtype``), the bias then taken in ``out``'s
    dtype."""
    if out.dtype == h.dtype:
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)
    if bias is None:
        return torch.mm(h, weight.t(), out_dtype=out.dtype, out=out)
    return torch.addmm(bias.to(out.dtype), h, weight.t(), out_dtype=out.dtype, out=out)


def gather_rows(out: Tensor, source: Tensor, index: Tensor) -> Tensor:
    """``out ← source[index]`` (cast to ``out``'s dtype; a temporary only when it differs)."""
    if source.dtype == out.dtype and source.device == out.device:
        return torch.index_select(source, 0, index.to(source.device), out=out)
    return out.copy_(source.index_select(0, index.to(source.device)))


def accumulate_outer(acc: Tensor, g: Tensor, h: Tensor) -> None:
    """``acc += gᵀ h`` accumulated in ``acc``'s dtype by the GEMM itself where torch has one
    (same dtypes, or ``out_dtype`` on CUDA); bf16/fp16 on CPU: products of V-slices (each
    rounded to the input dtype, :data:`CPU_DW_SLICES` of them) added in fp32, the cheapest
    correct path there (fp32 products cost ~4× the bf16 ones)."""
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), h)
    elif acc.device.type == "cuda":
        torch.addmm(acc, g.t(), h, out_dtype=acc.dtype, out=acc)
    else:
        step = -(-acc.shape[0] // CPU_DW_SLICES)
        for v in range(0, acc.shape[0], step):
            acc[v : v + step].add_(g[:, v : v + step].t() @ h)


@dataclass
class GradTargets:
    """Where :func:`sweep` projects the logit gradient; ``None`` entries are skipped."""

    hidden: Tensor | None = None  # [N, d], hidden's dtype: the final dH, all rows
    weight: Tensor | None = None  # [V, d] fp32 (fp64) accumulator
    bias: Tensor | None = None  # [V] fp32 (fp64) accumulator

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None


#: ``epilogue(start, end, logits)``: finish the loss of rows ``[start, end)`` and, when the sweep
#: has gradient targets, overwrite ``logits`` with ``∂loss/∂logits``.
Epilogue = Callable[[int, int, Tensor], None]


def sweep(
    hidden: Tensor,
    index: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    epilogue: Epilogue,
    grads: GradTargets,
    plan: ChunkPlan,
) -> None:
    """Run ``epilogue`` over every chunk of ``hidden[index] @ weightᵀ`` and project gradients
    (``hidden`` ``[N, d]``, ``index`` the ``plan.n_rows`` selected rows)."""
    if plan.n_rows == 0:
        return
    m, device = min(plan.rows, plan.n_rows), hidden.device
    w, b = operand(weight, plan), None if bias is None else bias.to(plan.logits_dtype)
    logits = torch.empty(m, plan.vocab, dtype=plan.logits_dtype, device=device)
    rows = torch.empty(m, plan.d, dtype=plan.operand_dtype, device=device)
    cast = None
    if plan.casts_gradient and (grads.hidden is not None or grads.weight is not None):
        cast = torch.empty(m, plan.vocab, dtype=plan.operand_dtype, device=device)
    for start, end in plan.bounds():
        chunk = index[start:end]
        h = gather_rows(rows[: end - start], hidden, chunk)
        x = linear_into(logits[: end - start], h, w, b)
        epilogue(start, end, x)
        project(x, h, w, grads, chunk, cast)


def project(
    g: Tensor, h: Tensor, weight: Tensor, grads: GradTargets, index: Tensor, cast: Tensor | None
) -> None:
    """``dW += Gᵀ H``, ``db += Σ G`` (fp32 accumulators), then ``dH[index] = G W``, computed
    into ``h`` (the chunk's gathered rows, no longer needed) and scattered into the final
    ``dH``; ``G`` is first cast into ``cast`` when it is wider than the operands."""
    if grads.bias is not None:
        grads.bias.add_(g.sum(0, dtype=grads.bias.dtype))
    if cast is not None:
        g = cast[: g.shape[0]].copy_(g)
    if grads.weight is not None:
        accumulate_outer(grads.weight, g, h)
    if grads.hidden is not None:
        dh = torch.mm(g, weight, out=h)
        grads.hidden.index_copy_(0, index, dh.to(grads.hidden.dtype))


def allocate_grads(
    hidden: Tensor,
    n_selected: int,
    weight: Tensor,
    bias: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> GradTargets:
    """Gradient targets for the ``(hidden, weight, bias)`` inputs that need a gradient; ``dH``
    is the final ``[N, d]`` gradient (zeros unless all ``N`` rows are selected)."""
    need_hidden, need_weight, need_bias = needs
    acc = {"dtype": accumulate_dtype(weight.dtype), "device": weight.device}
    grad_hidden = None
    if need_hidden:
        full = n_selected == hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if full else torch.zeros_like(hidden)
    return GradTargets(
        hidden=grad_hidden,
        weight=torch.zeros(weight.shape, **acc) if need_weight else None,
        bias=torch.zeros(weight.shape[0], **acc) if need_bias and bias is not None else None,
    )


def finish_grads(
    grads: GradTargets, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``(hidden, weight, bias)``, the last two cast to the input dtypes."""
    grad_weight = None if grads.weight is None else grads.weight.to(weight.dtype)
    grad_bias = None if grads.bias is None or bias is None else grads.bias.to(bias.dtype)
    return grads.hidden, grad_weight, grad_bias


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
    hidden: Tensor,
    index: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    row_epilogue: RowEpilogue,
    grad_scale: Tensor | None,
    grads: GradTargets,
    outputs: tuple[torch.dtype, ...],
    plan: ChunkPlan,
) -> tuple[Tensor, list[Tensor]]:
    """Per-row losses (accumulation dtype) and the ``outputs`` of every selected row."""
    n, device = plan.n_rows, hidden.device
    row_loss = torch.empty(n, dtype=accumulate_dtype(hidden.dtype), device=device)
    kept = [torch.empty(n, dtype=dtype, device=device) for dtype in outputs]

    def epilogue(start: int, end: int, logits: Tensor) -> None:
        row_scale = None if grad_scale is None else grad_scale[start:end]
        row_loss[start:end], *values = row_epilogue(start, end, logits, row_scale)
        for buffer, value in zip(kept, values, strict=True):
            buffer[start:end] = value

    sweep(hidden, index, weight, bias, epilogue, grads, plan)
    return row_loss, kept


def sweep_row_losses(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    selection: RowSelection,
    row_epilogue: RowEpilogue,
    outputs: tuple[torch.dtype, ...],
    plan: ChunkPlan,
) -> tuple[Tensor, list[Tensor]]:
    """``reduction='none'`` forward: ``[w_i ℓ_i]`` over all ``N`` rows of ``hidden`` (0 where
    not selected) and the epilogue's per-row ``outputs`` (e.g. fp64 statistics for the
    recompute)."""
    row_loss, kept = _swept(
        hidden, selection.index, weight, bias, row_epilogue, None, GradTargets(), outputs, plan
    )
    if selection.weight is not None:
        row_loss.mul_(selection.weight)
    return scatter_rows(row_loss, selection.index, hidden.shape[0]), kept


def sweep_loss_and_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    selection: RowSelection,
    denominator: float,
    needs: tuple[bool, bool, bool],
    row_epilogue: RowEpilogue,
    outputs: tuple[torch.dtype, ...],
    plan: ChunkPlan,
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None], list[Tensor]]:
    """``sum``/``mean`` forward: the loss ``Σ_i s_i ℓ_i`` (:func:`reduction_scale`), in the
    same sweep the gradients of ``(hidden, weight, bias)`` that ``needs`` asks for, and the
    epilogue's per-row ``outputs``."""
    acc = accumulate_dtype(hidden.dtype)
    rows = torch.empty(plan.n_rows, dtype=acc, device=hidden.device)
    scale = reduction_scale(selection, denominator, rows)
    grads = allocate_grads(hidden, plan.n_rows, weight, bias, needs)
    row_loss, kept = _swept(
        hidden,
        selection.index,
        weight,
        bias,
        row_epilogue,
        scale if grads.any else None,
        grads,
        outputs,
        plan,
    )
    loss = torch.dot(row_loss, scale)
    return loss, finish_grads(grads, weight, bias), kept
