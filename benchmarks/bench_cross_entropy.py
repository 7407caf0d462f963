"""Fused response-only cross-entropy against its floor, unfused PyTorch and the peers.

    python -m benchmarks.bench_cross_entropy --vocab 128256 --frozen --trainable

Per configuration (N tokens of width d, vocabulary V, fp32, 40% of rows prompt), each method
runs in its own process (peak memory is its own):

- ``fused``: ``unlearn_kernels.fused_linear_cross_entropy`` forward + backward. The same
  process also times the *floor*, the matrix products the fused op cannot avoid on the valid
  rows (``H_v Wᵀ``, ``G W`` and, with a trainable weight, ``Gᵀ H_v``), alternating with the
  fused op so both see the same machine load;
- ``unfused``: ``F.cross_entropy`` on materialised logits over all rows (eager);
- ``compiled``: ``torch.compile`` of the unfused loss;
- ``cce``: cut-cross-entropy's ``linear_cross_entropy(impl="torch_compile")``.
Liger-Kernel's fused linear cross-entropy is Triton-only; under the CPU interpreter it is far
too slow at these shapes, so it is not timed here.

Options mode (``--options``, results in ``results/cross_entropy_options.md`` and ``.json``):
the cost of the loss options, two processes per configuration. One runs this tree: rounds of
the floor, the fused op with every option off, and with label smoothing (ε = 0.1), the z-loss
(s = 1e-4) and token accuracy all on, interleaved so all three see the same load. The other
runs the fused op of the git revision ``--baseline`` (default ``main``: the previous commit,
extracted and its extension built in a temporary directory) with its own floor. Reported:
each × floor, options on × options off, and this tree × the baseline (both × floor).

    python -m benchmarks.bench_cross_entropy --options --baseline main --vocab 128256 \
        --frozen --trainable --repeats 5

Compare mode (``--compare``, results in ``results/chunk_driver.md`` and ``.json``): this tree
against ``--baseline`` with every option off, one process each (floor and fused op
interleaved): × floor of each, this tree × the baseline, and the peak memory above the inputs
and the returned ``grad_hidden`` (``N·d`` elements) beside one logits chunk of this tree's plan
(:func:`unlearn_kernels.ops.chunking.plan_chunks`) + 64 MiB.

    python -m benchmarks.bench_cross_entropy --compare --baseline HEAD~1 --n 16384 --d 4096 \
        --vocab 32000 --frozen --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import ROOT, fmt_bytes, measure, peak_bytes, reset_peak, run_isolated

RESULTS = Path(__file__).resolve().parent / "results" / "cross_entropy.md"
OPTIONS_RESULTS = RESULTS.with_name("cross_entropy_options.md")
COMPARE_RESULTS = RESULTS.with_name("chunk_driver.md")
#: compare mode: what the peak above the inputs and grad_hidden may exceed one logits chunk by
COMPARE_SLACK_BYTES = 64 * 2**20
METHODS = ("fused", "unfused", "compiled", "cce")
PROMPT_FRACTION = 0.4
#: the options-mode configurations: keyword arguments of fused_linear_cross_entropy
OPTION_CONFIGS = {
    "off": {},
    "on": {"label_smoothing": 0.1, "lse_square_scale": 1e-4, "return_token_accuracy": True},
}
#: environment variable naming the directory whose unlearn_kernels a worker imports
PACKAGE_ENV = "UNLEARN_KERNELS_BENCH_PACKAGE"


def make_inputs(n: int, d: int, vocab: int, trainable: bool):
    """Hidden states, output weight and labels whose first 40% of each sequence is prompt."""
    import torch

    torch.manual_seed(0)
    hidden = torch.empty(n, d).normal_().requires_grad_()
    weight = torch.empty(vocab, d).normal_(std=d**-0.5).requires_grad_(trainable)
    seq = 512
    labels = torch.randint(0, vocab, (n,))
    prompt = (torch.arange(n) % seq) < int(PROMPT_FRACTION * seq)
    labels[prompt] = -100
    return hidden, weight, labels


def clear_grads(*tensors) -> None:
    for t in tensors:
        t.grad = None


def worker(method: str, n: int, d: int, vocab: int, trainable: bool, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    hidden, weight, labels = make_inputs(n, d, vocab, trainable)

    def unfused() -> float:
        loss = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
        loss.backward()
        clear_grads(hidden, weight)
        return loss.item()

    if method == "fused":
        import unlearn_kernels as uk

        def fused() -> float:
            loss = uk.fused_linear_cross_entropy(hidden, weight, labels)
            loss.backward()
            clear_grads(hidden, weight)
            return loss.item()

        valid = (labels != -100).nonzero().squeeze(1)
        h_valid = hidden.detach()[valid]
        w = weight.detach()

        def floor() -> None:
            logits = h_valid @ w.t()
            torch.mm(logits, w)
            if trainable:
                torch.mm(logits.t(), h_valid)

        base = reset_peak()
        value = fused()
        peak = peak_bytes() - base
        fused_times, floor_times = [], []
        for _ in range(repeats):
            for step, times in ((floor, floor_times), (fused, fused_times)):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        return {
            "times": fused_times,
            "median": statistics.median(fused_times),
            "floor_times": floor_times,
            "floor_median": statistics.median(floor_times),
            "peak_above_inputs": peak,
            "value": value,
            "backend": uk.backend_name(None, hidden.device),
        }
    if method == "unfused":
        return measure(unfused, repeats)
    if method == "compiled":
        compiled = torch.compile(lambda h, w, y: F.cross_entropy(h @ w.t(), y, ignore_index=-100))

        def step() -> float:
            loss = compiled(hidden, weight, labels)
            loss.backward()
            clear_grads(hidden, weight)
            return loss.item()

        step()  # compile outside the measurement
        return measure(step, repeats)
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step() -> float:
            loss = linear_cross_entropy(
                hidden, weight, labels, impl="torch_compile", shift=False, ignore_index=-100
            )
            loss.backward()
            clear_grads(hidden, weight)
            return loss.item()

        step()
        return measure(step, repeats)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def options_worker(n: int, d: int, vocab: int, trainable: bool, repeats: int, configs) -> dict:
    """Rounds of the floor and the fused op in each of ``configs`` (names of OPTION_CONFIGS),
    interleaved; the package comes from ``$UNLEARN_KERNELS_BENCH_PACKAGE`` when set."""
    package = os.environ.get(PACKAGE_ENV)
    if package:
        sys.path.insert(0, package)
    import torch

    import unlearn_kernels as uk

    hidden, weight, labels = make_inputs(n, d, vocab, trainable)
    valid = (labels != -100).nonzero().squeeze(1)
    h_valid, w = hidden.detach()[valid], weight.detach()

    def floor() -> None:
        logits = h_valid @ w.t()
        torch.mm(logits, w)
        if trainable:
            torch.mm(logits.t(), h_valid)

    def fused(options: dict):
        def step() -> float:
            out = uk.fused_linear_cross_entropy(hidden, weight, labels, **options)
            loss = out if isinstance(out, torch.Tensor) else out.loss
            loss.backward()
            clear_grads(hidden, weight)
            return loss.item()

        return step

    steps = {"floor": floor, **{name: fused(OPTION_CONFIGS[name]) for name in configs}}
    report = {"package": uk.__file__, "backend": uk.backend_name(None, hidden.device)}
    for name in configs:  # warm-up, value and peak memory of each, in turn
        base = reset_peak()
        report[name] = {"value": steps[name](), "peak_above_inputs": peak_bytes() - base}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    report["times"] = times
    return report


def baseline_tree(revision: str, directory: Path) -> Path:
    """The source of git ``revision`` in ``directory``, its C++ extension built in place."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    env = {**os.environ, "PYTHONPATH": str(directory)}
    subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=directory,
        env=env,
        capture_output=True,
        check=True,
    )
    return directory


def baseline_source(args: argparse.Namespace, scratch: Path) -> Path:
    """``--baseline-dir`` when given, else ``--baseline`` built in ``scratch``."""
    if args.baseline_dir:
        return Path(args.baseline_dir)
    print(f"building the baseline {args.baseline} in {scratch}", flush=True)
    return baseline_tree(args.baseline, scratch)


def options_table(ours: dict, base: dict, n: int, d: int, vocab: int, trainable: bool) -> str:
    """Ratios of fastest runs: each × its process's floor, on × off, this tree × baseline."""
    title = f"N={n}, d={d}, V={vocab}, fp32, {'trainable' if trainable else 'frozen'} weight"
    lines = [
        f"### {title}",
        "",
        "| run | min s | median s | × floor | × options off | × baseline | peak above inputs "
        "| loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if "error" in ours or "error" in base:
        return "\n".join([*lines, f"| failed | {ours.get('error') or base.get('error')} |"]) + "\n"
    ratio = {}
    for label, report, name in (
        ("baseline, options off", base, "off"),
        ("options off", ours, "off"),
        ("smoothing + z-loss + accuracy", ours, "on"),
    ):
        t, floor = min(report["times"][name]), min(report["times"]["floor"])
        ratio[label] = t / floor
        off = min(ours["times"]["off"])
        x_off = f"{t / off:.3f}" if report is ours else ""
        x_base = f"{ratio[label] / ratio['baseline, options off']:.3f}" if report is ours else ""
        lines.append(
            f"| {label} | {t:.3f} | {statistics.median(report['times'][name]):.3f} "
            f"| {ratio[label]:.3f} | {x_off} | {x_base} "
            f"| {fmt_bytes(report[name]['peak_above_inputs'])} | {report[name]['value']:.6f} |"
        )
    for label, report in (("floor (this tree)", ours), ("floor (baseline)", base)):
        floor = report["times"]["floor"]
        median = statistics.median(floor)
        lines.append(f"| {label} | {min(floor):.3f} | {median:.3f} | 1.000 | | | | |")
    return "\n".join(lines) + "\n"


def options_main(args: argparse.Namespace, modes: list[bool], command: str) -> None:
    """``--options``: this tree's options off/on against the baseline revision's options off."""
    results, sections = [], []
    with tempfile.TemporaryDirectory(prefix="uk-baseline-") as scratch:
        baseline = baseline_source(args, Path(scratch))
        for vocab in args.vocab:
            for trainable in modes:
                flags = ["--n", str(args.n), "--d", str(args.d), "--vocab", str(vocab)]
                flags += ["--trainable" if trainable else "--frozen", "--repeats"]
                flags += [str(args.repeats), "--worker", "options", "--configs"]
                ours = run_isolated("benchmarks.bench_cross_entropy", [*flags, "off", "on"])
                base = run_isolated(
                    "benchmarks.bench_cross_entropy",
                    [*flags, "off"],
                    env={PACKAGE_ENV: str(baseline)},
                )
                print(json.dumps({"ours": ours, "baseline": base}), flush=True)
                section = options_table(ours, base, args.n, args.d, vocab, trainable)
                print(section, flush=True)
                sections.append(section)
                results.append(
                    {"vocab": vocab, "trainable": trainable, "ours": ours, "baseline": base}
                )
    header = (
        f"Command: `{command}`\n\nBaseline: git revision `{args.baseline}`"
        f"{f' (tree {args.baseline_dir})' if args.baseline_dir else ''}. Two processes per "
        "configuration: this tree (floor, options off, options on: label smoothing 0.1, z-loss "
        "1e-4, token accuracy, interleaved) and the baseline (floor, options off). Ratios "
        "compare fastest runs; × baseline compares the × floor ratios of the two processes.\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## Cross-entropy options: cost\n\n" + header + "\n".join(sections))
    payload = {"command": command, "baseline": args.baseline, "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")


def compare_table(ours: dict, base: dict, n: int, d: int, vocab: int, trainable: bool) -> str:
    """Compare mode: × floor of each tree, this tree × baseline, and the peak above the inputs
    and the returned ``grad_hidden`` against one logits chunk of this tree's plan + 64 MiB."""
    import torch

    from unlearn_kernels.ops.chunking import plan_chunks

    title = f"N={n}, d={d}, V={vocab}, fp32, {'trainable' if trainable else 'frozen'} weight"
    lines = [
        f"### {title}",
        "",
        "| tree | min s | median s | × floor | × baseline | peak above inputs "
        "| of which above grad_hidden | ≤ chunk + 64 MiB | loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if "error" in ours or "error" in base:
        return "\n".join([*lines, f"| failed | {ours.get('error') or base.get('error')} |"]) + "\n"
    _, _, labels = make_inputs(n, 1, vocab, False)
    plan = plan_chunks(int((labels != -100).sum()), vocab, d, torch.float32, "cpu")
    limit = plan.buffer_bytes()["logits"] + COMPARE_SLACK_BYTES
    grad_hidden = n * d * 4
    ratio = {}
    for label, report in (("baseline", base), ("this tree", ours)):
        timing = "| | | |"  # --repeats 0: the peak of the first call only
        if report["times"]["off"]:
            t, floor = min(report["times"]["off"]), min(report["times"]["floor"])
            ratio[label] = t / floor
            x_base = f"{ratio[label] / ratio['baseline']:.3f}" if report is ours else ""
            median = statistics.median(report["times"]["off"])
            timing = f"| {t:.2f} | {median:.2f} | {ratio[label]:.3f} | {x_base}"
        peak = report["off"]["peak_above_inputs"]
        extra = peak - grad_hidden
        lines.append(
            f"| {label} {timing} | {fmt_bytes(peak)} | {fmt_bytes(extra)} "
            f"| {'yes' if extra <= limit else 'no'} | {report['off']['value']:.6f} |"
        )
    lines += [
        "",
        f"This tree's plan: {plan.n_rows} selected rows in {plan.n_chunks} chunks of "
        f"{plan.rows} rows; one logits chunk {fmt_bytes(plan.buffer_bytes()['logits'])}, limit "
        f"{fmt_bytes(limit)}; grad_hidden {fmt_bytes(grad_hidden)}.",
    ]
    return "\n".join(lines) + "\n"


def compare_main(args: argparse.Namespace, modes: list[bool], command: str) -> None:
    """``--compare``: this tree's fused op against the baseline revision's, options off."""
    results, sections = [], []
    with tempfile.TemporaryDirectory(prefix="uk-baseline-") as scratch:
        baseline = baseline_source(args, Path(scratch))
        baseline = str(baseline)
        for vocab in args.vocab:
            for trainable in modes:
                flags = ["--n", str(args.n), "--d", str(args.d), "--vocab", str(vocab)]
                flags += ["--trainable" if trainable else "--frozen", "--repeats"]
                flags += [str(args.repeats), "--worker", "options", "--configs", "off"]
                module = "benchmarks.bench_cross_entropy"
                with ThreadPoolExecutor(max_workers=2 if args.concurrent else 1) as pool:
                    base = pool.submit(run_isolated, module, flags, env={PACKAGE_ENV: baseline})
                    ours = pool.submit(run_isolated, module, flags)
                    base, ours = base.result(), ours.result()
                print(json.dumps({"ours": ours, "baseline": base}), flush=True)
                section = compare_table(ours, base, args.n, args.d, vocab, trainable)
                print(section, flush=True)
                sections.append(section)
                results.append(
                    {"vocab": vocab, "trainable": trainable, "ours": ours, "baseline": base}
                )
    together = " running at the same time (the same machine load)" if args.concurrent else ""
    header = (
        f"Command: `{command}`\n\nBaseline: git revision `{args.baseline}`. One process per "
        f"tree{together} (the fused op, every option off, and its floor interleaved; the peak "
        "is that of the first call). × baseline compares the × floor ratios of the two "
        "processes.\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(sections)
    previous = args.out.read_text() if args.out.exists() and args.append else ""
    body = previous + ("\n" if previous else "## Chunk driver: this tree against the baseline\n\n")
    args.out.write_text(body + header + text)
    payload = {"command": command, "baseline": args.baseline, "results": results}
    json_path = args.out.with_suffix(".json")
    runs = json.loads(json_path.read_text()) if json_path.exists() and args.append else []
    json_path.write_text(json.dumps([*runs, payload], indent=1) + "\n")


def table(rows: dict, n: int, d: int, vocab: int, trainable: bool) -> str:
    """One markdown table. Ratios compare fastest runs (min over repeats): on a shared machine
    the minimum is the run least disturbed by other work; medians are listed beside them."""
    fused = rows["fused"]
    floor = min(fused["floor_times"]) if "floor_times" in fused else None
    unfused = rows.get("unfused", {})
    base = min(unfused["times"]) if "times" in unfused else None
    title = f"N={n}, d={d}, V={vocab}, fp32, {'trainable' if trainable else 'frozen'} weight"
    lines = [
        f"### {title}",
        "",
        "| method | min s | median s | × floor | × unfused time | peak above inputs "
        "| × unfused peak | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if floor:
        median = fused["floor_median"]
        lines.append(
            f"| floor (products on valid rows) | {floor:.2f} | {median:.2f} | 1.000 | | | | |"
        )
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | | | |")
            continue
        t, peak = min(row["times"]), row["peak_above_inputs"]
        x_floor = f"{t / floor:.3f}" if floor else ""
        x_time = f"{t / base:.3f}" if base else ""
        x_peak = f"{peak / unfused['peak_above_inputs']:.3f}" if base else ""
        label = f"fused ({fused.get('backend')})" if name == "fused" else name
        lines.append(
            f"| {label} | {t:.2f} | {row['median']:.2f} | {x_floor} | {x_time} | {fmt_bytes(peak)} "
            f"| {x_peak} | {row['value']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256])
    parser.add_argument("--frozen", action="store_true", help="frozen output weight")
    parser.add_argument("--trainable", action="store_true", help="trainable output weight")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--options", action="store_true", help="options mode: cost of the loss options"
    )
    parser.add_argument(
        "--compare", action="store_true", help="compare mode: this tree against --baseline"
    )
    parser.add_argument(
        "--append", action="store_true", help="compare mode: add to the results file"
    )
    parser.add_argument(
        "--concurrent", action="store_true", help="compare mode: run both trees at once"
    )
    parser.add_argument(
        "--baseline", default="main", help="options/compare mode: git revision to compare"
    )
    parser.add_argument(
        "--baseline-dir", help="options/compare mode: an already built source tree of --baseline"
    )
    parser.add_argument("--worker", choices=(*METHODS, "options"), help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="+", choices=OPTION_CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    modes = [t for t, on in ((False, args.frozen), (True, args.trainable)) if on] or [False]
    if args.worker == "options":
        report = options_worker(args.n, args.d, args.vocab[0], modes[0], args.repeats, args.configs)
        print(json.dumps(report))
        return
    if args.worker:
        report = worker(args.worker, args.n, args.d, args.vocab[0], modes[0], args.repeats)
        print(json.dumps(report))
        return
    command = "python -m benchmarks.bench_cross_entropy " + shlex.join(argv or sys.argv[1:])
    if args.options:
        args.out = args.out or OPTIONS_RESULTS
        options_main(args, modes, command)
        return
    if args.compare:
        args.out = args.out or COMPARE_RESULTS
        compare_main(args, modes, command)
        return
    args.out = args.out or RESULTS
    sections = []
    for vocab in args.vocab:
        for trainable in modes:
            rows = {}
            for method in args.methods:
                flags = ["--n", str(args.n), "--d", str(args.d), "--vocab", str(vocab)]
                flags += ["--trainable" if trainable else "--frozen", "--repeats"]
                flags += [str(args.repeats), "--worker", method]
                rows[method] = run_isolated("benchmarks.bench_cross_entropy", flags)
                print(method, json.dumps(rows[method]), flush=True)
            section = table(rows, args.n, args.d, vocab, trainable)
            print(section, flush=True)
            sections.append(section)
    header = (
        f"Command: `{command}`\n\nEach method runs in its own process; the fused op and its floor "
        "alternate in one. Ratios compare the fastest timed run of each (the least disturbed on "
        "a shared machine).\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"## Fused linear cross-entropy\n\n{header}" + "\n".join(sections))


if __name__ == "__main__":
    main()
