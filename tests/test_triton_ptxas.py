"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a without register spills.

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
# registers per thread at which 8-warp blocks still keep ≥ 32 warps (50 %) resident per SM
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
    assert result.registers <= REGISTER_BUDGET, result
