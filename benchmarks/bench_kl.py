"""Benchmark: fused_linear_kl and fused_linear_kl_topk against their matrix-product floor, unfused
PyTorch and Liger-Kernel's fused linear JSD (β = 0: forward KL), forward + backward.

Jobs, each in a fresh process:

* memory jobs (``kl_fused``, ``kl_unfused``, ``topk_fused``, ``liger_jsd``): one configuration
  measured by :func:`benchmarks.harness.measure` (a warm-up, then ``--repeats`` timed runs;
  peak resident memory above the inputs);
* time jobs: rounds of interleaved runs of what a ratio compares, so that both sides of a ratio
  see the same load on a shared machine — ``kl_time`` (the exact op, its floor, unfused
  PyTorch), ``topk_time`` (the top-k op, its floor), ``chunk_time`` (both ops and floors on one
  chunk of rows, where more rounds are affordable). A floor is the matrix products the op
  cannot avoid, chunked exactly as the op chunks them.

Shapes: hidden ``[N, d]`` (requires grad), a frozen output weight ``[V, d]`` shared by student
and reference (LoRA), cached reference hidden states ``[N, d]``; every row carries a loss.

    python -m benchmarks.bench_kl        # N=4096 d=2048 V=128256 → results/kl.md
    python -m benchmarks.bench_kl --n 256 --d 64 --vocab 4096 --out /tmp/kl_small.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import measure, run_isolated, time_calls

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kl.md"
MEMORY_JOBS = ("kl_fused", "kl_unfused", "topk_fused", "liger_jsd")
TIME_JOBS = ("kl_time", "topk_time", "chunk_time")
JOBS = MEMORY_JOBS + TIME_JOBS
TOPK = 32


def make_inputs(n: int, d: int, vocab: int) -> dict:
    """Seeded inputs; the top-k cache is synthetic (distinct ids, a normalised distribution)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = torch.randn(vocab, d, generator=gen) / d**0.5
    ref_hidden = hidden.detach() + 0.5 * torch.randn(n, d, generator=gen)
    stride = vocab // TOPK
    offset = torch.randint(0, stride, (n, 1), generator=gen)
    index = (torch.arange(TOPK) * stride + offset).to(torch.int32)
    logprob = torch.log_softmax(2 * torch.randn(n, TOPK + 1, generator=gen), dim=-1)
    return {
        "hidden": hidden,
        "weight": weight,
        "ref_hidden": ref_hidden,
        "index": index,
        "logprob": logprob[:, :TOPK].contiguous(),
        "tail": logprob[:, TOPK].contiguous(),
    }


def floor_fn(inputs: dict, with_reference: bool, rows: int | None = None) -> Callable[[], float]:
    """The products a fused op cannot avoid, chunked as it chunks: student logits, reference
    logits (exact KL only), and ``dH = G W`` (over the first ``rows`` rows if given)."""
    import torch

    from unlearn_kernels.ops.chunking import chunk_rows

    hidden, weight = inputs["hidden"].detach(), inputs["weight"]
    ref_hidden = inputs["ref_hidden"]
    n, vocab = rows or hidden.shape[0], weight.shape[0]

    def run() -> float:
        step = chunk_rows(n, vocab, None, 4)
        logits = torch.empty(step, vocab)
        ref_logits = torch.empty(step, vocab) if with_reference else None
        grad_hidden = torch.empty(n, hidden.shape[1])
        for start in range(0, n, step):
            end = min(start + step, n)
            torch.mm(hidden[start:end], weight.t(), out=logits[: end - start])
            if ref_logits is not None:
                torch.mm(ref_hidden[start:end], weight.t(), out=ref_logits[: end - start])
            torch.mm(logits[: end - start], weight, out=grad_hidden[start:end])
        return float("nan")

    return run


def op_fn(config: str, inputs: dict, backend: str, rows: int | None = None) -> Callable[[], float]:
    """Forward + backward of one configuration (over the first ``rows`` rows if given);
    returns the loss."""
    import torch
    import torch.nn.functional as F

    import unlearn_kernels as uk

    leaf = inputs["hidden"]
    hidden, ref_hidden = leaf[:rows], inputs["ref_hidden"][:rows]
    weight = inputs["weight"]

    def backward(loss: torch.Tensor) -> float:
        loss.backward()
        leaf.grad = None
        return float(loss)

    if config == "kl_fused":
        return lambda: backward(uk.fused_linear_kl(hidden, weight, ref_hidden, backend=backend))
    if config == "topk_fused":
        cache = tuple(inputs[key][:rows] for key in ("index", "logprob", "tail"))
        return lambda: backward(uk.fused_linear_kl_topk(hidden, weight, *cache, backend=backend))
    if config == "kl_unfused":

        def unfused() -> float:
            log_q = torch.log_softmax(hidden @ weight.t(), dim=-1)
            log_p = torch.log_softmax(ref_hidden @ weight.t(), dim=-1)
            return backward(F.kl_div(log_q, log_p, reduction="batchmean", log_target=True))

        return unfused
    if config == "liger_jsd":
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
        return lambda: backward(jsd(hidden, weight, ref_hidden, weight, None))
    raise ValueError(f"unknown config {config!r}")


def measure_memory(config: str, args: argparse.Namespace) -> dict:
    """``config`` in this process: times, peak memory above the inputs, loss."""
    inputs = make_inputs(args.n, args.d, args.vocab)
    return measure(op_fn(config, inputs, args.backend), args.memory_repeats)


def measure_times(job: str, args: argparse.Namespace) -> dict:
    """Interleaved runs (``--repeats`` rounds) of the configurations a ratio compares:
    ``kl_time``: floor (3 products), fused, unfused; ``topk_time``: floor (2 products), fused;
    ``chunk_time``: both fused ops and their floors on one chunk of rows."""
    from unlearn_kernels.ops.chunking import chunk_rows

    inputs = make_inputs(args.n, args.d, args.vocab)
    backend = args.backend
    if job == "kl_time":
        fns = {
            "floor": floor_fn(inputs, True),
            "fused": op_fn("kl_fused", inputs, backend),
            "unfused": op_fn("kl_unfused", inputs, backend),
        }
    elif job == "topk_time":
        fns = {"floor": floor_fn(inputs, False), "fused": op_fn("topk_fused", inputs, backend)}
    else:
        rows = chunk_rows(args.n, args.vocab, None, 4)
        fns = {
            "kl_floor": floor_fn(inputs, True, rows),
            "kl_fused": op_fn("kl_fused", inputs, backend, rows),
            "topk_floor": floor_fn(inputs, False, rows),
            "topk_fused": op_fn("topk_fused", inputs, backend, rows),
        }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name] += time_calls(fn, 1)
    return {"times": times}


def spawn(job: str, args: argparse.Namespace) -> dict:
    """Run one job in a fresh process (Liger's Triton kernels: interpreted on CPU)."""
    env = {"TRITON_INTERPRET": "1"} if job == "liger_jsd" else None
    flags = ["--worker", job, "--backend", args.backend]
    for flag in ("n", "d", "vocab", "repeats", "memory_repeats"):
        flags += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return run_isolated("benchmarks.bench_kl", flags, env=env)


def cache_bytes(d: int, vocab: int) -> list[tuple[str, int]]:
    """Reference bytes per response token of each way to cache the reference."""
    return [
        ("exact: hidden states, fp32", 4 * d),
        ("exact: hidden states, bf16", 2 * d),
        ("top-k, k=32: int32 ids + fp32 log-probs + fp32 tail log-mass", 8 * TOPK + 4),
        ("full logits, bf16", 2 * vocab),
    ]


def _stats(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return ordered[0], ordered[len(ordered) // 2]


def report(results: dict, args: argparse.Namespace) -> str:
    """The markdown page: commands, memory table, time ratios, cache sizes."""
    commands = sorted({r["command"] for r in results.values() if "command" in r})
    lines = [
        "# fused_linear_kl / fused_linear_kl_topk: CPU benchmark",
        "",
        f"N={args.n}, d={args.d}, V={args.vocab}, fp32, frozen output weight shared by student "
        f"and reference (LoRA), every row a response row, forward + backward, fused ops on "
        f"backend `{args.backend}`, 2 threads; time ratios come from interleaved rounds, so both "
        "sides of a ratio see the same load.",
        "",
        "Commands (each runs the jobs it names, each in its own process; the other jobs' "
        "results are kept from `kl.json` beside this page):",
        "",
        "```",
        *commands,
        "```",
        "",
        "## Peak memory (one run per configuration, each in its own process)",
        "",
        "| configuration | peak above inputs (MB) | time of that run (s) | loss |",
        "| --- | ---: | ---: | ---: |",
    ]
    names = {
        "kl_fused": "fused_linear_kl (exact)",
        "kl_unfused": "unfused PyTorch: 2 × log_softmax + F.kl_div",
        "topk_fused": f"fused_linear_kl_topk (k={TOPK})",
        "liger_jsd": "Liger fused linear JSD, β = 0 (Triton interpreted; time is a note only)",
    }
    for job, name in names.items():
        r = results.get(job, {})
        if "peak_above_inputs" in r:
            peak, seconds = r["peak_above_inputs"] / 2**20, r["median"]
            lines.append(f"| {name} | {peak:.0f} | {seconds:.1f} | {r['value']:.6f} |")
        else:
            lines.append(f"| {name} | {' '.join(r.get('error', ['not run']))} | | |")
    lines += [
        "",
        f"## Time (interleaved rounds in one process; min / median of {args.repeats})",
        "",
        "| measurement | configuration | min (s) | median (s) |",
        "| --- | --- | ---: | ---: |",
    ]
    for job in ("kl_time", "topk_time", "chunk_time"):
        for name, times in results.get(job, {}).get("times", {}).items():
            low, mid = _stats(times)
            lines.append(f"| {job} | {name} | {low:.2f} | {mid:.2f} |")
    lines += ["", "## Ratios against the targets of issue 3", ""]
    lines += _ratios(results)
    lines += [
        "",
        "## Reference cache, bytes per response token",
        "",
        "| cache | bytes / token |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {size:,} |" for name, size in cache_bytes(args.d, args.vocab)]
    return "\n".join(lines) + "\n"


def _ratios(results: dict) -> list[str]:
    """Target lines, each ratio as min / median over the interleaved rounds."""

    def ratio(job: str, top: str, bottom: str) -> str:
        times = results.get(job, {}).get("times", {})
        if top not in times or bottom not in times:
            return "not measured"
        pairs = sorted(a / b for a, b in zip(times[top], times[bottom], strict=True))
        best = min(times[top]) / min(times[bottom])
        return f"{best:.3f} (of minima; per round median {pairs[len(pairs) // 2]:.3f})"

    lines = [
        f"- exact KL / its 3 products: {ratio('kl_time', 'fused', 'floor')} — target ≤ 1.10",
        f"- exact KL / unfused PyTorch: {ratio('kl_time', 'fused', 'unfused')} — target ≤ 0.65",
        f"- its 3 products / unfused PyTorch: {ratio('kl_time', 'floor', 'unfused')} — the least"
        " any fused op can reach here: every row is a response row, so there is nothing to skip",
        f"- top-k KL / its 2 products: {ratio('topk_time', 'fused', 'floor')} — target ≤ 1.05",
        f"- one chunk, exact KL / its products: {ratio('chunk_time', 'kl_fused', 'kl_floor')}",
        f"- one chunk, top-k KL / its products: {ratio('chunk_time', 'topk_fused', 'topk_floor')}",
    ]
    fused, unfused = results.get("kl_fused", {}), results.get("kl_unfused", {})
    if "peak_above_inputs" in fused and "peak_above_inputs" in unfused:
        share = fused["peak_above_inputs"] / unfused["peak_above_inputs"]
        lines.append(f"- exact KL peak / unfused peak: {share:.3f} — target ≤ 0.10")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each timing job")
    parser.add_argument(
        "--memory-repeats", type=int, default=1, help="timed runs of a memory job after warm-up"
    )
    parser.add_argument("--backend", default="cpu", help="backend of the fused ops")
    parser.add_argument("--configs", nargs="+", default=list(JOBS), choices=JOBS, help="jobs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=JOBS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = measure_memory if args.worker in MEMORY_JOBS else measure_times
        print(json.dumps(job(args.worker, args)))
        return
    command = "python -m benchmarks.bench_kl " + shlex.join(argv or sys.argv[1:])
    shape = {"n": args.n, "d": args.d, "vocab": args.vocab, "backend": args.backend}
    # Results of the same shape kept from earlier runs (a job can be re-run alone).
    store = args.out.with_suffix(".json")
    results: dict = {}
    if store.exists():
        kept = json.loads(store.read_text())
        if kept.get("shape") == shape:
            results.update(kept["results"])
    for job in args.configs:
        results[job] = {**spawn(job, args), "command": command.strip()}
        print(job, json.dumps(results[job]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps({"shape": shape, "results": results}, indent=1) + "\n")
    page = report(results, args)
    args.out.write_text(page)
    print(page)


if __name__ == "__main__":
    main()
