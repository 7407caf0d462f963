"""A paper model of one fused cross-entropy step (forward + backward) on a GPU.

    python -m benchmarks.gpu_model                      # Llama-3-8B, H100, bf16, frozen weight
    python -m benchmarks.gpu_model --gpu A100 --trainable --json

For ``n`` response rows of width ``d``, a ``[V, d]`` output weight and one GPU, each design's
HBM bytes, GEMM FLOPs, peak extra memory and roofline time ``max(FLOPs / peak FLOP/s,
bytes / HBM bandwidth)``. Designs:

- ``ours``: the chunk plan :func:`unlearn_kernels.ops.chunking.plan_chunks` makes for CUDA
  (imported, not copied) with ``--logits-dtype`` (default ``auto``: fp32 logits for bf16), per
  chunk: gather the rows, the logits GEMM, the epilogue (two reads of the logits and one write
  of their gradient), the gradient cast to the input dtype when the logits are wider, ``G W``
  scattered into ``dH`` (and ``dW += Gᵀ H`` into an fp32 accumulator, by the GEMM);
- ``ours_input``: the same with ``logits_dtype="input"``;
- ``ours_before``: the driver before this change: the budget ``max(512, 256 MiB / 4V)`` rows
  whatever the dtype, logits in the input dtype, a copy of all selected rows, a staging ``dH``
  scattered at the end, and with a trainable weight ``Gᵀ H`` as an input-dtype ``[V, d]``
  temporary added to the fp32 accumulator;
- ``liger``: Liger-Kernel's fused linear cross-entropy as its design reads: chunks of
  ``2^⌈log2 ⌈n / ⌈V/d⌉⌉⌉`` rows, input-dtype logits overwritten by their gradient, the full
  ``dH`` computed in forward (a chunk-sized product copied into it), every row (no row
  selection: ``--prompt-fraction`` rows are computed too);
- ``cce``: cut-cross-entropy's design: no logits in memory; a forward kernel streams ``W`` once
  for the logsumexp, a backward kernel recomputes each logits tile (a third GEMM) and
  accumulates ``dH`` (and ``dW``) from it; modelled as a lower bound (every operand moved once
  per pass).

Model rules: a GEMM reads each operand and writes its output once (L2 reuse inside one GEMM
assumed perfect), so the weight is read once per GEMM per chunk; the CE epilogue reads the
logits twice and writes their gradient once; FLOPs count the GEMMs only (``2·m·V·d`` each).
``peak_extra_bytes`` is the memory above the inputs *and* the returned gradients (``dH``, and
``dW`` when trained), the measure of the CPU acceptance test; ``returned_grad_bytes`` lists
those gradients separately.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch

from unlearn_kernels.ops.chunking import CHUNK_BUDGET_BYTES, MIN_CHUNK_ROWS, ChunkPlan, plan_chunks

#: (dense bf16/fp16 tensor-core FLOP/s, HBM bytes/s, HBM bytes) of SXM parts
GPUS = {
    "H100": (989e12, 3.35e12, 80e9),
    "A100": (312e12, 2.039e12, 80e9),
    "H200": (989e12, 4.8e12, 141e9),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Llama-3-8B's output layer and a step of 32768 response tokens
LLAMA3_8B = {"n": 32768, "d": 4096, "vocab": 128256}
DESIGNS = ("ours", "ours_input", "ours_before", "liger", "cce")


@dataclass(frozen=True)
class Shape:
    n: int  # response rows (those that carry a loss)
    d: int
    vocab: int
    dtype: torch.dtype
    trainable: bool
    #: rows that carry no loss, as a fraction of all rows (computed by designs without selection)
    prompt_fraction: float = 0.0

    @property
    def size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def total_rows(self) -> int:
        return round(self.n / (1.0 - self.prompt_fraction))


@dataclass
class Estimate:
    design: str
    peak_extra_bytes: int
    returned_grad_bytes: int
    hbm_bytes: int
    flops: int
    roofline_ms: float
    rows_per_chunk: int
    n_chunks: int
    logits_dtype: str


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _returned(shape: Shape) -> int:
    """``dH`` over all rows, and ``dW`` when trained, in the input dtype."""
    grads = shape.total_rows * shape.d * shape.size
    return grads + (shape.vocab * shape.d * shape.size if shape.trainable else 0)


def _finish(
    design: str,
    shape: Shape,
    gpu: str,
    peak: int,
    hbm: int,
    flops: int,
    rows: int,
    chunks: int,
    logits: torch.dtype,
) -> Estimate:
    flop_rate, bandwidth, _ = GPUS[gpu]
    ms = 1e3 * max(flops / flop_rate, hbm / bandwidth)
    name = str(logits).removeprefix("torch.")
    return Estimate(design, peak, _returned(shape), hbm, flops, ms, rows, chunks, name)


def row_vectors(n: int) -> int:
    """Per-row vectors of a sweep: index, target (int64), loss, scale (fp32), lse (fp64)."""
    return n * (8 + 8 + 4 + 4 + 8)


def ours(shape: Shape, plan: ChunkPlan, design: str = "ours", gpu: str = "H100") -> Estimate:
    """The traffic, FLOPs and peak memory of the sweep :func:`~unlearn_kernels.ops.chunking.
    sweep` runs for ``plan`` (a CE step, ``sum``/``mean``: gradients in the forward sweep)."""
    v, d, es = shape.vocab, shape.d, shape.size
    lg, op = _size(plan.logits_dtype), _size(plan.operand_dtype)
    w = v * d * op
    hbm = flops = 0
    for start, end in plan.bounds():
        k = end - start
        hbm += k * d * (es + op)  # gather the chunk's rows
        hbm += k * d * op + w + k * v * lg  # logits GEMM
        hbm += 3 * k * v * lg  # epilogue: two reads, one write
        if plan.casts_gradient:
            hbm += k * v * (lg + op)
        hbm += k * v * op + w + 2 * k * d * op  # G W into the rows buffer
        hbm += 2 * k * d * es  # scattered into dH
        flops += 4 * k * v * d
        if shape.trainable:
            hbm += k * v * op + k * d * op + 2 * v * d * 4  # dW += Gᵀ H (fp32 read + write)
            flops += 2 * k * v * d
    if plan.n_rows < shape.total_rows:
        hbm += shape.total_rows * d * es  # dH zeroed
    peak = sum(plan.buffer_bytes().values()) + row_vectors(plan.n_rows)
    if shape.trainable and es != 4:  # an fp32 weight's accumulator is its returned gradient
        peak += v * d * 4  # the fp32 dW accumulator
        hbm += v * d * (4 + es)  # cast to the input dtype
    return _finish(
        design, shape, gpu, peak, hbm, flops, plan.rows, plan.n_chunks, plan.logits_dtype
    )


def ours_before(shape: Shape, gpu: str = "H100") -> Estimate:
    """The driver before chunks were sized by their dtype (see the module docstring)."""
    n, v, d, es = shape.n, shape.vocab, shape.d, shape.size
    target = max(MIN_CHUNK_ROWS, CHUNK_BUDGET_BYTES // (4 * v))
    chunks = max(1, math.ceil(n / target))
    rows = math.ceil(n / chunks)
    w = v * d * es
    hbm = 2 * n * d * es  # index_select of all selected rows
    flops = 0
    for start in range(0, n, rows):
        k = min(rows, n - start)
        hbm += k * d * es + w + k * v * es + 3 * k * v * es  # logits GEMM, epilogue
        hbm += k * v * es + w + k * d * es  # G W into the staging dH
        flops += 4 * k * v * d
        if shape.trainable:  # bf16/fp16: Gᵀ H as a [V, d] temporary, then add_ into fp32
            temporary = v * d * (2 * es) if es != 4 else 0
            hbm += k * v * es + k * d * es + 2 * v * d * 4 + temporary
            flops += 2 * k * v * d
    hbm += 3 * shape.total_rows * d * es  # zeros + scatter of the staging dH
    # the peak: rows copy + staging dH + (logits chunk, or dH once the sweep has ended)
    peak = 2 * n * d * es + max(rows * v * es, 0) + row_vectors(n)
    if shape.trainable and es != 4:
        peak += v * d * 4 + v * d * es  # fp32 accumulator and the per-chunk temporary
        hbm += v * d * (4 + es)
    return _finish("ours_before", shape, gpu, peak, hbm, flops, rows, chunks, shape.dtype)


def liger(shape: Shape, gpu: str = "H100") -> Estimate:
    """Liger-Kernel's chunking (see the module docstring), over every row."""
    n, v, d, es = shape.total_rows, shape.vocab, shape.d, shape.size
    factor = math.ceil(v / d)
    rows = 2 ** math.ceil(math.log2(math.ceil(n / factor)))
    w = v * d * es
    hbm = flops = 0
    chunks = math.ceil(n / rows)
    for start in range(0, n, rows):
        k = min(rows, n - start)
        hbm += k * d * es + w + k * v * es + 3 * k * v * es
        hbm += k * v * es + w + k * d * es + 2 * k * d * es  # product, copied into dH
        flops += 4 * k * v * d
        if shape.trainable:
            hbm += k * v * es + k * d * es + 2 * v * d * 4
            flops += 2 * k * v * d
    peak = rows * v * es + rows * d * es + n * 4
    if shape.trainable and es != 4:
        peak += v * d * 4
    return _finish("liger", shape, gpu, peak, hbm, flops, rows, chunks, shape.dtype)


def cce(shape: Shape, gpu: str = "H100") -> Estimate:
    """cut-cross-entropy's tiled kernels, as a lower bound (see the module docstring)."""
    n, v, d, es = shape.total_rows, shape.vocab, shape.d, shape.size
    w = v * d * es
    hbm = n * d * es + w + n * 8  # forward: logsumexp
    hbm += n * d * es + w + n * 8 + n * d * es  # backward: recompute, dH
    flops = 2 * n * v * d + 4 * n * v * d
    peak = n * 4
    if shape.trainable:
        hbm += v * d * 4
        flops += 2 * n * v * d
    return _finish("cce", shape, gpu, peak, hbm, flops, n, 1, torch.float32)


def estimates(shape: Shape, gpu: str, logits_dtype: str = "auto") -> list[Estimate]:
    """Every design of the module docstring for ``shape`` on ``gpu``."""

    def plan(mode: str) -> ChunkPlan:
        return plan_chunks(shape.n, shape.vocab, shape.d, shape.dtype, "cuda", mode)

    return [
        ours(shape, plan(logits_dtype), "ours", gpu),
        ours(shape, plan("input"), "ours_input", gpu),
        ours_before(shape, gpu),
        liger(shape, gpu),
        cce(shape, gpu),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=LLAMA3_8B["n"], help="response rows")
    parser.add_argument("--d", type=int, default=LLAMA3_8B["d"])
    parser.add_argument("--vocab", type=int, default=LLAMA3_8B["vocab"])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--gpu", choices=GPUS, default="H100")
    parser.add_argument("--trainable", action="store_true", help="trainable output weight")
    parser.add_argument("--logits-dtype", choices=("auto", "input", "float32"), default="auto")
    parser.add_argument("--prompt-fraction", type=float, default=0.0)
    parser.add_argument("--json", action="store_true", help="one JSON object per design")
    args = parser.parse_args(argv)
    if args.n <= 0 or args.d <= 0 or args.vocab <= 0:
        raise ValueError("--n, --d and --vocab must be positive")
    if not 0.0 <= args.prompt_fraction < 1.0:
        raise ValueError(f"--prompt-fraction must be in [0, 1), got {args.prompt_fraction}")
    shape = Shape(
        args.n, args.d, args.vocab, DTYPES[args.dtype], args.trainable, args.prompt_fraction
    )
    rows = estimates(shape, args.gpu, args.logits_dtype)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return
    before = next(r for r in rows if r.design == "ours_before")
    print(
        f"n={args.n} d={args.d} V={args.vocab} {args.dtype} on {args.gpu}, "
        f"{'trainable' if args.trainable else 'frozen'} weight"
    )
    print(
        f"{'design':<12}{'logits':>9}{'rows':>7}{'chunks':>7}{'peak extra MB':>14}"
        f"{'+ grads MB':>11}{'HBM GB':>9}{'× before':>9}{'TFLOP':>8}{'roofline ms':>12}"
    )
    for r in rows:
        print(
            f"{r.design:<12}{r.logits_dtype:>9}{r.rows_per_chunk:>7}{r.n_chunks:>7}"
            f"{r.peak_extra_bytes / 1e6:>14.0f}{r.returned_grad_bytes / 1e6:>11.0f}"
            f"{r.hbm_bytes / 1e9:>9.1f}{r.hbm_bytes / before.hbm_bytes:>9.2f}"
            f"{r.flops / 1e12:>8.1f}{r.roofline_ms:>12.1f}"
        )


if __name__ == "__main__":
    main()
