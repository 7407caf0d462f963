"""GPU-side quality of every Triton kernel of the package, without a GPU.

Each kernel is compiled ahead of time by Triton for a ``GPUTarget`` (sm_80 and sm_90a by
default) with the launch configuration the package uses on a GPU, then its PTX is assembled
with ``ptxas -v`` to read registers per thread, spills, stack frame and static shared
memory. Triton's reductions use *dynamic* shared memory, which ptxas does not see; that
figure comes from the compiled kernel's metadata (``shared``). Occupancy is estimated from
registers and shared memory alone (65,536 registers and 64 resident warps per SM on
sm_80/sm_90, register allocation granularity 256 per warp). Barriers per loop iteration are
read from the PTX (:func:`loop_barriers`): LLVM annotates every basic block with its innermost
loop, so the ``bar.sync`` of an innermost loop (the vocabulary or element sweep of every
kernel here) are those of its blocks.

Discovery: every module ``unlearn_kernels.backends.triton_*`` may define ``PTXAS_CASES``, a
list of dicts with keys ``name``, ``kernel`` (the ``@triton.jit`` kernel), ``signature``
(Triton type strings for the runtime arguments), ``constexprs``, ``num_warps`` and optionally
``aligned`` (arguments the runtime sees as 16-divisible) and ``num_stages``. A kernel defined
in such a module without a case is reported by :func:`uncovered_kernels` (and fails the test).

    python benchmarks/triton_ptxas.py            # table + benchmarks/results/triton_ptxas.md
    python benchmarks/triton_ptxas.py --arch 80  # one architecture
    python benchmarks/triton_ptxas.py --json     # results as JSON on stdout

Triton must be in compiled mode to compile: a process that imported it with
``TRITON_INTERPRET=1`` (the test suite) gets its results from a child process (:func:`collect`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_ARCHS = (80, 90)
RESULTS = ROOT / "benchmarks" / "results" / "triton_ptxas.md"
_REGS_PER_SM = 65536
_MAX_WARPS_PER_SM = 64
_SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # usable shared memory per SM (A100, H100)


@dataclass
class PtxasResult:
    """Resources of one kernel case on one architecture."""

    name: str
    arch: str
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    static_smem: int
    dynamic_smem: int
    loop_barriers: list[int]
    compile_s: float

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def occupancy_warps(self) -> int:
        """Resident warps per SM allowed by registers, shared memory and the warp limit."""
        regs_per_warp = -(-self.registers * 32 // 256) * 256
        blocks = _REGS_PER_SM // (regs_per_warp * self.num_warps)
        smem = self.static_smem + self.dynamic_smem
        cc = int(re.sub(r"\D", "", self.arch))
        if smem:
            blocks = min(blocks, _SMEM_PER_SM.get(cc, 100 * 1024) // smem)
        return min(blocks * self.num_warps, _MAX_WARPS_PER_SM // self.num_warps * self.num_warps)


def loop_barriers(ptx: str) -> list[int]:
    """``bar.sync``/``barrier.sync`` count of each innermost loop of ``ptx``, in order.

    A basic block starts at a label (``$L__BB0_3:``) or an LLVM fall-through marker
    (``// %bb.4:``); the comments right after it say whether it heads a loop
    (``=>This Inner Loop Header``, ``=>This Loop Header``) or sits in one (``in Loop:
    Header=BB0_3``, the innermost). The barriers of an innermost loop are those of the blocks
    whose innermost loop it is, i.e. the barriers one iteration executes on its longest path
    or fewer.
    """
    blocks: list[dict[str, Any]] = []
    for line in ptx.splitlines():
        start = re.match(r"^(?:\$L__(BB\d+_\d+):|// %(bb\.\d+):)", line)
        if start:
            blocks.append(dict(name=start.group(1) or start.group(2), notes="", bars=0, body=0))
        if not blocks:
            continue
        block = blocks[-1]
        code, _, comment = line.partition("//")
        if code.strip() and not start:
            block["body"] += 1
            block["bars"] += bool(re.search(r"\b(bar|barrier)\.sync\b", code))
        elif not block["body"]:
            block["notes"] += " " + comment
    inner: dict[str, int] = {}
    member: dict[str, str] = {}
    for block in blocks:
        notes = block["notes"]
        if re.search(r"This\s+Inner Loop Header", notes):
            inner[block["name"]] = 0
            member[block["name"]] = block["name"]
        elif "Loop Header" in notes:
            member[block["name"]] = block["name"]
        else:
            found = re.search(r"in Loop: Header=(\S+) Depth", notes)
            if found:
                member[block["name"]] = found.group(1)
    for block in blocks:
        header = member.get(block["name"])
        if header in inner:
            inner[header] += block["bars"]
    return list(inner.values())


def find_ptxas() -> str | None:
    """``ptxas`` on the PATH, else the one bundled with Triton."""
    found = shutil.which("ptxas")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(bundled) if bundled.exists() else None


def _triton_modules() -> list[Any]:
    import unlearn_kernels.backends as backends

    names = sorted(
        m.name
        for m in pkgutil.iter_modules(backends.__path__)
        if m.name.startswith("triton_") and m.name != "triton_backend"
    )
    return [importlib.import_module(f"{backends.__name__}.{name}") for name in names]


def discover_cases() -> list[dict[str, Any]]:
    """Every ``PTXAS_CASES`` entry of the ``unlearn_kernels.backends.triton_*`` modules."""
    cases: list[dict[str, Any]] = []
    for module in _triton_modules():
        cases.extend(getattr(module, "PTXAS_CASES", []))
    return cases


def uncovered_kernels() -> list[str]:
    """Kernels (``@triton.jit`` objects, not device helpers) that no case compiles."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from unlearn_kernels.backends.triton_cross_entropy import DualJITFunction

    covered = {id(case["kernel"]) for case in discover_cases()}
    missing = []
    for module in _triton_modules():
        for attr, value in vars(module).items():
            kernel = isinstance(value, JITFunction | InterpretedFunction)
            helper = isinstance(value, DualJITFunction)
            defined_here = (
                getattr(getattr(value, "fn", None), "__module__", None) == module.__name__
            )
            if kernel and not helper and defined_here and id(value) not in covered:
                missing.append(f"{module.__name__}.{attr}")
    return missing


def sm_arch(cc: int) -> str:
    """Triton's spelling of the architecture (it adds the ``a`` from sm_90 on)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return sm_arch_from_capability(cc)


def _parse_ptxas(log: str) -> dict[str, int]:
    def grab(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    if not re.search(r"Used (\d+) registers", log):
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return dict(
        registers=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        stack=grab(r"(\d+) bytes stack frame"),
        static_smem=grab(r"(\d+) bytes smem"),
    )


def compile_case(case: dict[str, Any], cc: int, ptxas: str | None = None) -> PtxasResult:
    """Compile one case for compute capability ``cc`` and read its resources with ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget

    from unlearn_kernels.backends.triton_cross_entropy import kernel_variant

    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise RuntimeError("ptxas not found")
    fn = kernel_variant(case["kernel"], interpreted=False)
    signature = dict(case["signature"])
    signature.update({name: "constexpr" for name in case["constexprs"]})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in case.get("aligned", ())}
    src = triton.compiler.ASTSource(
        fn=fn, signature=signature, constexprs=case["constexprs"], attrs=attrs
    )
    options = {"num_warps": case["num_warps"], "num_stages": case.get("num_stages", 3)}
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    arch = sm_arch(cc)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        # same flags Triton uses for its own cubin (-lineinfo, --regAllocOptLevel=2)
        cmd = [ptxas, "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={arch}"]
        cmd += [str(ptx), "-o", str(Path(tmp) / "kernel.cubin")]
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{run.stdout}{run.stderr}")
    elapsed = time.perf_counter() - start
    return PtxasResult(
        name=case["name"],
        arch=arch,
        num_warps=case["num_warps"],
        dynamic_smem=int(compiled.metadata.shared or 0),
        loop_barriers=loop_barriers(compiled.asm["ptx"]),
        compile_s=elapsed,
        **_parse_ptxas(run.stdout + run.stderr),
    )


def run_all(archs: tuple[int, ...] = DEFAULT_ARCHS, ptxas: str | None = None) -> list[PtxasResult]:
    """Compile every discovered case for every architecture, in this process.

    Needs triton in compiled mode: under the interpreter, Triton's library functions
    (``tl.zeros``, ``tl.sum``, ...) are interpreted and cannot be compiled; use :func:`collect`.
    """
    return [compile_case(case, cc, ptxas) for case in discover_cases() for cc in archs]


def collect(archs: tuple[int, ...] = DEFAULT_ARCHS, ptxas: str | None = None) -> list[PtxasResult]:
    """:func:`run_all`, in a child process without ``TRITON_INTERPRET`` when this process
    imported triton in interpreter mode (as the test suite does)."""
    from unlearn_kernels.backends.triton_cross_entropy import triton_interpreter_active

    if not triton_interpreter_active():
        return run_all(archs, ptxas)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--json", "--arch", *map(str, archs)]
    if ptxas:
        cmd += ["--ptxas", ptxas]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if run.returncode not in (0, 1):
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{run.stdout[-4000:]}{run.stderr[-4000:]}")
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    return [PtxasResult(**row) for row in rows]


def _constexpr_text(case: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in case["constexprs"].items() if k.startswith("BLOCK"))


def format_table(results: list[PtxasResult]) -> str:
    """Markdown table, one row per case with one column group per architecture."""
    archs = list(dict.fromkeys(r.arch for r in results))
    by_key = {(r.name, r.arch): r for r in results}
    names = list(dict.fromkeys(r.name for r in results))
    head = ["kernel", "warps"]
    for arch in archs:
        head += [f"{arch} regs", f"{arch} spill st/ld", f"{arch} smem", f"{arch} warps/SM"]
        head += [f"{arch} bar.sync/iter"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        first = by_key[(name, archs[0])]
        row = [f"`{name}`", str(first.num_warps)]
        for arch in archs:
            r = by_key[(name, arch)]
            smem = f"{r.static_smem}+{r.dynamic_smem}"
            row += [str(r.registers), f"{r.spill_stores}/{r.spill_loads}", smem]
            row += [str(r.occupancy_warps), "/".join(map(str, r.loop_barriers)) or "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _tool_versions(ptxas: str) -> str:
    import triton

    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=False)
    release = re.search(r"release [\d.]+, V[\d.]+", out.stdout)
    return f"triton {triton.__version__}; {ptxas} ({release.group(0) if release else '?'})"


def write_report(results: list[PtxasResult], command: str, ptxas: str, path: Path) -> None:
    """Write the markdown report with the command that produced it."""
    configs = sorted(
        {f"{c['kernel'].__name__}: {_constexpr_text(c)}" for c in discover_cases()}
        - {f"{c['kernel'].__name__}: " for c in discover_cases()}
    )
    text = [
        "# Triton kernels: ahead-of-time resources (ptxas -v)",
        "",
        f"Made by `{command}` with {_tool_versions(ptxas)}.",
        "",
        "Each kernel is compiled by `triton.compile(ASTSource(...), "
        'target=GPUTarget("cuda", cc, 32))` in every configuration its launcher may run on a '
        "GPU (its `PTXAS_CASES` entries: for the CE and KL epilogues each `triton.autotune` "
        "configuration, tagged `UuxVvxWw` = u loads of v logits in flight per thread and input, "
        "w warps, one row per step, persistent grid), and its PTX assembled by `ptxas -v` with "
        "Triton's own flags. `smem` = static (ptxas) + dynamic (Triton metadata, reduction "
        "scratch) bytes per block. `warps/SM` = resident warps per SM allowed by registers and "
        "shared memory (limit 64). `bar.sync/iter` = barriers in each innermost loop (the "
        "vocabulary sweeps of an epilogue, the element sweeps of NGDiff), read from LLVM's loop "
        "annotations in the PTX.",
        "",
        "Configurations: " + "; ".join(configs) + ".",
        "",
        format_table(results),
        "",
        f"Spills: {sum(r.spills for r in results)} bytes in total over {len(results)} compiles; "
        f"at most {max(r.registers for r in results)} registers; at most "
        f"{max(max(r.loop_barriers, default=0) for r in results)} `bar.sync` per loop iteration.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--ptxas", default=None, help="ptxas binary (default: PATH, then Triton's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json", action="store_true", help="print results as JSON, write nothing")
    args = parser.parse_args(argv)
    ptxas = args.ptxas or find_ptxas()
    if ptxas is None:
        parser.error("ptxas not found")
    missing = uncovered_kernels()
    if missing:
        print(f"kernels without PTXAS_CASES: {missing}", file=sys.stderr)
    start = time.perf_counter()
    results = collect(tuple(args.arch), ptxas)
    failed = bool(missing) or any(r.spills for r in results)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
        return int(failed)
    print(format_table(results))
    print(f"\n{len(results)} compiles in {time.perf_counter() - start:.1f} s")
    argv_text = shlex.join(sys.argv[1:] if argv is None else argv)
    command = f"python benchmarks/triton_ptxas.py {argv_text}".strip()
    write_report(results, command, ptxas, args.out)
    print(f"wrote {os.path.relpath(args.out)}")
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
