"""CE and KL on a CUDA GPU: time (CUDA events) and peak memory (``max_memory_allocated``) of the
fused ops against unfused PyTorch, ``torch.compile``, Liger-Kernel and cut-cross-entropy (when
installed), one CSV. Run by ``benchmarks/gpu_check.sh``.

    python -m benchmarks.gpu_bench --out benchmarks/results/gpu_check.csv

Shape: ``--n`` rows (``--prompt-fraction`` of them prompt, label -100), ``--d``, V = 128256,
bf16, frozen output weight; KL against cached reference hidden states (exact mode). Each
method: one warm-up, then ``--repeats`` timed forward + backward; peak memory above what was
allocated before the warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import unlearn_kernels as uk
from unlearn_kernels._io import write_text_atomically

FIELDS = ("loss", "method", "n", "d", "vocab", "dtype", "median_ms", "min_ms", "peak_extra_mib")


def _inputs(n: int, d: int, vocab: int, prompt_fraction: float):
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, d, device="cuda") * d**-0.5).bfloat16()
    ref_hidden = (hidden.detach() + 0.3 * torch.randn_like(hidden)).bfloat16()
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[torch.rand(n, device="cuda") < prompt_fraction] = -100
    return hidden, weight, ref_hidden, labels


def _kl_unfused(hidden, weight, ref_hidden, labels):
    keep = labels != -100
    logq = torch.log_softmax((hidden @ weight.t()).float(), -1)
    with torch.no_grad():
        logp = torch.log_softmax((ref_hidden @ weight.t()).float(), -1)
    return F.kl_div(logq[keep], logp[keep], log_target=True, reduction="batchmean")


def methods(
    hidden, weight, ref_hidden, labels
) -> dict[tuple[str, str], Callable[[], torch.Tensor]]:
    """``(loss, method) -> step`` returning the loss; the step's backward is run by the caller."""

    def ce_unfused():
        return F.cross_entropy((hidden @ weight.t()).float(), labels)

    compiled_ce = torch.compile(ce_unfused)
    compiled_kl = torch.compile(_kl_unfused)
    steps = {
        ("ce", "fused"): lambda: uk.fused_linear_cross_entropy(hidden, weight, labels),
        ("ce", "fused_input_logits"): lambda: uk.fused_linear_cross_entropy(
            hidden, weight, labels, logits_dtype="input"
        ),
        ("ce", "unfused"): ce_unfused,
        ("ce", "compiled"): compiled_ce,
        ("kl", "fused"): lambda: uk.fused_linear_kl(hidden, weight, ref_hidden, labels=labels),
        ("kl", "unfused"): lambda: _kl_unfused(hidden, weight, ref_hidden, labels),
        ("kl", "compiled"): lambda: compiled_kl(hidden, weight, ref_hidden, labels),
    }
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        steps["ce", "liger"] = lambda: liger(weight, hidden, labels)
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        from cut_cross_entropy import linear_cross_entropy

        steps["ce", "cce"] = lambda: linear_cross_entropy(hidden, weight, labels, shift=False)
    return steps


def measure(step: Callable[[], torch.Tensor], hidden: torch.Tensor, repeats: int) -> dict:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step().backward()
    hidden.grad = None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step().backward()
        end.record()
        torch.cuda.synchronize()
        hidden.grad = None
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "peak_extra_mib": peak / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--prompt-fraction", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.csv"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no GPU found")
    hidden, weight, ref_hidden, labels = _inputs(args.n, args.d, args.vocab, args.prompt_fraction)
    rows = []
    for (loss, method), step in methods(hidden, weight, ref_hidden, labels).items():
        try:
            result = measure(step, hidden, args.repeats)
        except Exception as err:  # a peer failing must not hide the others' numbers
            print(f"{loss}/{method} failed: {err}")
            continue
        row = {"loss": loss, "method": method, "n": args.n, "d": args.d, "vocab": args.vocab}
        rows.append({**row, "dtype": "bf16", **result})
        print(rows[-1], flush=True)
    lines = [",".join(FIELDS)] + [",".join(str(r[f]) for f in FIELDS) for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
