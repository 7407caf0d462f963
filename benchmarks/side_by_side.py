"""The quick side-by-side run: each fused loss against unfused PyTorch, at a modest shape.

    python -m benchmarks.side_by_side

For every fused loss: its value beside the unfused one (they must agree), forward+backward
time, and peak memory above the inputs, each method measured in its own process.
"""

from __future__ import annotations

import argparse

from benchmarks.harness import fmt_bytes, run_isolated

#: (name, benchmark module, its flags, its flag for timed runs, fused method, unfused method)
LOSSES = [
    (
        "cross-entropy",
        "benchmarks.bench_cross_entropy",
        ["--frozen"],
        "--repeats",
        "fused",
        "unfused",
    ),
    ("forward KL", "benchmarks.bench_kl", [], "--memory-repeats", "kl_fused", "kl_unfused"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    shape = ["--n", str(args.n), "--d", str(args.d), "--vocab", str(args.vocab)]
    print(
        f"N={args.n} d={args.d} V={args.vocab} fp32, frozen output weight; cross-entropy: 40% "
        "prompt rows; KL: every row, against cached reference hidden states"
    )
    print(f"{'loss':<16}{'fused':>14}{'unfused':>14}{'rel diff':>10}{'time ×':>9}{'memory ×':>10}")
    worst = 0.0
    for name, module, extra, repeats_flag, fused_method, unfused_method in LOSSES:
        flags = [*shape, *extra, repeats_flag, str(args.repeats), "--worker"]
        fused = run_isolated(module, [*flags, fused_method])
        unfused = run_isolated(module, [*flags, unfused_method])
        if "error" in fused or "error" in unfused:
            print(f"{name:<16} failed: {fused.get('error') or unfused.get('error')}")
            return 1
        rel = abs(fused["value"] - unfused["value"]) / abs(unfused["value"])
        worst = max(worst, rel)
        print(
            f"{name:<16}{fused['value']:>14.6f}{unfused['value']:>14.6f}{rel:>10.1e}"
            f"{fused['median'] / unfused['median']:>9.3f}"
            f"{fused['peak_above_inputs'] / unfused['peak_above_inputs']:>10.3f}"
        )
        print(
            f"{'':<16}peak above inputs: fused {fmt_bytes(fused['peak_above_inputs'])}, "
            f"unfused {fmt_bytes(unfused['peak_above_inputs'])}"
        )
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
