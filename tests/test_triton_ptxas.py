"""Every Triton kernel, in every autotuned configuration, compiles ahead of time for sm_80 and
sm_90a without register spills, below the register ceiling, with at most one ``bar.sync`` per
vocabulary-loop iteration in the CE and KL epilogues; and benchmarks/results/triton_ptxas.md
says so (the committed report and the kernels agree).

No GPU needed: ``triton.compile`` with a ``GPUTarget`` produces PTX, ``ptxas -v`` reports
its resources (see benchmarks/triton_ptxas.py, which also writes the table). Triton can only
compile in a process that imported it without ``TRITON_INTERPRET=1``; under the interpreter
(tests/conftest.py sets it) the compiles run in one child process.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_ptxas.py"
_spec = importlib.util.spec_from_file_location("_triton_ptxas", _PATH)
triton_ptxas = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = triton_ptxas  # dataclasses look their module up there
_spec.loader.exec_module(triton_ptxas)

PTXAS = triton_ptxas.find_ptxas()
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(PTXAS is None, reason="ptxas not found"),
]

CASES = triton_ptxas.discover_cases()
# the register ceiling: at 64 registers per thread 8-warp blocks keep 32 warps (50 %) resident
# per SM; a kernel must stay below it (one that reaches it is likely held there by ptxas)
REGISTER_BUDGET = 64
ARCHS = {"sm_80": 80, "sm_90a": 90}


def test_every_kernel_has_a_compile_case():
    assert CASES, "no PTXAS_CASES found in unlearn_kernels.backends.triton_*"
    assert triton_ptxas.uncovered_kernels() == []


def test_architecture_spelling():
    assert triton_ptxas.sm_arch(80) == "sm_80"
    assert triton_ptxas.sm_arch(90) == "sm_90a"


@pytest.fixture(scope="module")
def results():
    """Every case × architecture, compiled once (in a child process under the interpreter)."""
    found = triton_ptxas.collect(tuple(ARCHS.values()), PTXAS)
    return {(r.name, r.arch): r for r in found}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_compiles_without_spills(results, case, arch):
    result = results[(case["name"], arch)]
    assert result.spill_stores == 0 and result.spill_loads == 0, result
    assert result.stack == 0, result
    assert result.registers < REGISTER_BUDGET, result
    if case["name"].startswith(("ce_", "kl_")):  # the epilogues: each has a vocabulary loop
        assert result.loop_barriers, result
        assert max(result.loop_barriers) <= 1, result


def test_report_is_current(results):
    """The committed report's table is what the kernels compile to now, with the same tools."""
    text = triton_ptxas.RESULTS.read_text()
    if triton_ptxas._tool_versions(PTXAS) not in text:
        pytest.skip("the report was made with another triton/ptxas: regenerate it with these")
    ordered = [results[(case["name"], arch)] for case in CASES for arch in ARCHS]
    assert triton_ptxas.format_table(ordered) in text, (
        "benchmarks/results/triton_ptxas.md is stale: run python benchmarks/triton_ptxas.py"
    )


PTX_LOOPS = """
$L__BB0_2:                              // =>This Loop Header: Depth=1
                                        //     Child Loop BB0_3 Depth 2
\tbar.sync \t0;
$L__BB0_3:                              //   Parent Loop BB0_2 Depth=1
                                        // =>  This Inner Loop Header: Depth=2
\tld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
// %bb.4:                               //   in Loop: Header=BB0_3 Depth=2
\tbar.sync \t0;
\t@%p1 bra \t$L__BB0_3;
$L__BB0_5:                              //   in Loop: Header=BB0_2 Depth=1
\tbar.sync \t0;
\t@%p2 bra \t$L__BB0_2;
$L__BB0_6:                              // =>This Inner Loop Header: Depth=1
\tadd.s32 %r5, %r5, 1;
\t@%p3 bra \t$L__BB0_6;
"""


def test_loop_barriers_reads_llvm_loop_annotations():
    # two innermost loops: BB0_3 (one barrier, in its latch block) and BB0_6 (none); the
    # outer loop's two barriers are not counted
    assert triton_ptxas.loop_barriers(PTX_LOOPS) == [1, 0]
