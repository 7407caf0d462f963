"""The instruction-set copies of the CPU epilogue against each other (setup.py compiles each
kernel file for DEFAULT, AVX2 and AVX512; ``_C.set_isa`` picks one).

    python -m benchmarks.bench_cpu_isa   # writes benchmarks/results/cpu_isa.md

Epilogue only (no matrix product): one chunk of logits ``[n, V]`` swept by the CPU backend as
the fused losses call it — cross-entropy forward with the gradient written over the logits
(plain, and with Gemma's softcap), the forward KL with its gradient, in fp32 and bf16. Every
copy this CPU runs is timed in the same process, rounds interleaving the copies (the machine
is shared, so all see the same load); the report gives per-copy medians and fastest rounds and
each copy's ratio to AVX2 (the only vector path before runtime dispatch).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from unlearn_kernels import _C
from unlearn_kernels._options import CERowMath, KLRowMath
from unlearn_kernels.backends import cpu_backend

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_isa.md"


Case = Callable[[], tuple[Callable[[], object], Callable[[], object]]]


def cases(n: int, vocab: int) -> dict[str, Case]:
    """Name → a factory that builds the inputs and returns ``(restore, call)``: the epilogue
    overwrites the logits with the gradient, so ``restore`` (untimed) copies them back first."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, vocab, (n,), generator=g)
    scale32, scale64 = torch.full((n,), 1.0 / n), torch.full((n,), 1.0 / n, dtype=torch.float64)

    def ce(dtype: torch.dtype, softcap: float | None) -> Case:
        def build() -> tuple[Callable[[], object], Callable[[], object]]:
            source = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
            x = source.clone()
            math = CERowMath(softcap=softcap)
            return (
                lambda: x.copy_(source),
                lambda: cpu_backend.ce_forward(x, target, scale32, math),
            )

        return build

    def kl(dtype: torch.dtype) -> Case:
        def build() -> tuple[Callable[[], object], Callable[[], object]]:
            source = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
            x_ref = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
            x = source.clone()
            math = KLRowMath()
            return (
                lambda: x.copy_(source),
                lambda: cpu_backend.kl_forward(x, x_ref, scale64, math),
            )

        return build

    return {
        "CE fp32": ce(torch.float32, None),
        "CE fp32 softcap": ce(torch.float32, 30.0),
        "CE bf16": ce(torch.bfloat16, None),
        "KL fp32": kl(torch.float32),
        "KL bf16": kl(torch.bfloat16),
    }


def runnable_isas() -> list[str]:
    found = []
    for isa in _C.compiled_isas():
        try:
            _C.set_isa(isa)
        except ValueError:
            continue
        found.append(isa)
    return found


def run(n: int, vocab: int, rounds: int) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    isas = runnable_isas()
    times: dict[str, dict[str, list[float]]] = {}
    for name, build in cases(n, vocab).items():
        restore, call = build()
        times[name] = {isa: [] for isa in isas}
        for isa in isas:  # warm-up of each copy
            _C.set_isa(isa)
            restore()
            call()
        for _ in range(rounds):
            for isa in isas:
                _C.set_isa(isa)
                restore()
                start = time.perf_counter()
                call()
                times[name][isa].append(time.perf_counter() - start)
        print(name, {isa: round(statistics.median(t) * 1e3, 2) for isa, t in times[name].items()})
    return isas, times


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def page(args: argparse.Namespace, isas: list[str], times: dict) -> str:
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python -m benchmarks.bench_cpu_isa " + shlex.join(sys.argv[1:])
    lines = [
        "# CPU epilogue: the instruction-set copies side by side",
        "",
        f"Made by `{command.strip()}` on {cpu_name()} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; compiled "
        f"{', '.join(_C.compiled_isas())}, chosen at import here: {_C.active_isa()}. "
        f"Load average after the run: {load} (the machine is shared: one run, ratios only).",
        "",
        f"Epilogue only, one chunk of {args.n} × {args.vocab} logits, gradient written over it "
        f"(the logits are restored, untimed, before each call); {args.rounds} interleaved "
        "rounds after one warm-up per copy. ms: median (fastest round).",
        "",
        "| case | "
        + " | ".join(f"{isa} ms" for isa in isas)
        + " | "
        + " | ".join(f"{isa} / avx2" for isa in isas if isa != "avx2")
        + " |",
        "|---|" + "---|" * (2 * len(isas) - ("avx2" in isas)),
    ]
    for name, per_isa in times.items():
        med = {isa: statistics.median(t) for isa, t in per_isa.items()}
        cells = [f"{med[isa] * 1e3:.2f} ({min(per_isa[isa]) * 1e3:.2f})" for isa in isas]
        if "avx2" in isas:
            cells += [f"{med[isa] / med['avx2']:.2f}" for isa in isas if isa != "avx2"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="rows of the chunk")
    parser.add_argument("--vocab", type=int, default=32000, help="columns (vocabulary)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    before = _C.active_isa()
    try:
        isas, times = run(args.n, args.vocab, args.rounds)
    finally:
        _C.set_isa(before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page(args, isas, times))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
