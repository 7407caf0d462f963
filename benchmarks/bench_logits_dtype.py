"""Accuracy and CPU cost of each ``logits_dtype`` with bf16 inputs.

    python -m benchmarks.bench_logits_dtype

bf16 hidden states and output weight (logits of standard deviation ``--logit-std``, so that
many fall in |z| ∈ [16, 32) where a bf16 logit is off by up to 0.06), 40% prompt rows, signed
token weights. Oracle: float64 autograd on the materialised logits of the same bf16 values.
Per mode (``logits_dtype="input"``, ``"float32"``, and PyTorch's ``F.cross_entropy`` on bf16
logits): the relative error of the loss, of ``dH`` and of ``dW`` (``‖g − g₆₄‖ / ‖g₆₄‖``), and
the fastest of ``--repeats`` forward + backward times on this CPU. Results in
``results/logits_dtype.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "logits_dtype.md"
MODES = ("input", "float32", "torch bf16")
NOTE = (
    'On CPU torch has no bf16 GEMM with an fp32 output, so `"float32"` runs the products in '
    "fp32 on an fp32 copy of the weight; its gradient products are fp32 too. On CUDA the GEMM "
    "writes fp32 logits from bf16 operands (`out_dtype`) and the logit gradient is cast to bf16 "
    "for `G·W` and `Gᵀ H` (fp32 accumulation), so the loss error there is that of this row and "
    "the gradient error lies between the two rows. The CPU default is the input dtype: fp32 "
    "products cost about 4× the bf16 ones on this machine (AVX-512 BF16; one 512 × 2048 × "
    "32000 product: 1.05 s fp32, 0.27 s bf16, fastest of 3), which the whole step above "
    "shows only in part at d = 512."
)


def make_inputs(n: int, d: int, vocab: int, logit_std: float):
    import torch

    torch.manual_seed(0)
    hidden = torch.randn(n, d).bfloat16()
    weight = (torch.randn(vocab, d) * logit_std / d**0.5).bfloat16()
    labels = torch.randint(0, vocab, (n,))
    labels[(torch.arange(n) % 10) < 4] = -100
    token_weight = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    return hidden, weight, labels, token_weight


def step(mode: str, hidden, weight, labels, token_weight):
    """Loss, dH and dW of one forward + backward in ``mode`` (fp64 for ``"oracle"``)."""
    import torch
    import torch.nn.functional as F

    import unlearn_kernels as uk

    dtype = torch.float64 if mode == "oracle" else hidden.dtype
    h = hidden.to(dtype, copy=True).requires_grad_()
    w = weight.to(dtype, copy=True).requires_grad_()
    if mode in ("oracle", "torch bf16"):
        rows = F.cross_entropy(h @ w.t(), labels, reduction="none")
        loss = (rows * token_weight.to(rows.dtype)).sum() / (labels != -100).sum()
    else:
        loss = uk.fused_linear_cross_entropy(
            h, w, labels, token_weight=token_weight, logits_dtype=mode
        )
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--logit-std", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    inputs = make_inputs(args.n, args.d, args.vocab, args.logit_std)
    oracle = step("oracle", *inputs)
    lines = [
        "## Logits dtype with bf16 inputs: accuracy and CPU cost",
        "",
        f"Command: `python -m benchmarks.bench_logits_dtype {shlex.join(argv or sys.argv[1:])}`",
        "",
        f"N={args.n}, d={args.d}, V={args.vocab}, bf16 inputs, logits std {args.logit_std}, "
        "40% prompt rows, signed token weights (one in three −1), reduction mean. Errors are "
        "relative to float64 autograd on the same bf16 values; times are the fastest of "
        f"{args.repeats} forward + backward runs on this CPU (a shared machine: ratios only).",
        "",
        "| mode | loss rel. error | dH rel. error | dW rel. error | CPU time s | × input |",
        "|---|---|---|---|---|---|",
    ]
    times = {}
    for mode in MODES:
        result = step(mode, *inputs)
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step(mode, *inputs)
            runs.append(time.perf_counter() - start)
        times[mode] = min(runs)
        errors = [relative(r, o) for r, o in zip(result, oracle, strict=True)]
        label = mode if mode == "torch bf16" else f'`logits_dtype="{mode}"`'
        if mode == "torch bf16":
            label = "PyTorch `F.cross_entropy` on bf16 logits"
        lines.append(
            f"| {label} | {errors[0]:.2e} | {errors[1]:.2e} | {errors[2]:.2e} "
            f"| {times[mode]:.3f} | {times[mode] / times['input']:.2f} |"
        )
    lines += ["", NOTE]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
