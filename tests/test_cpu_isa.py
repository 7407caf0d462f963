"""The instruction-set copies of the CPU epilogues (setup.py compiles each kernel file for
DEFAULT, AVX2 and AVX512; ``_C`` runs the widest one the CPU has, ``UNLEARN_KERNELS_CPU_ISA`` or
``_C.set_isa`` forces one).

Every copy this CPU can run is checked against float64 references: the torch backend (the
readable specification) run on the float64 upcast of the same inputs, whose own tests hold it to
the autograd oracle. fp32 within 1e-5 relative error; bf16 gradients (stored in bf16) within
1.5× the error of rounding the reference itself to bf16. The binary is checked too: AVX-512
(EVEX) instructions only inside the AVX512 copy, VEX instructions only inside AVX2/AVX512, and
the baseline copy vectorised with packed SSE.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

_C = pytest.importorskip("unlearn_kernels._C", reason="unlearn_kernels._C is not built")

from unlearn_kernels._options import CERowMath, KLRowMath  # noqa: E402
from unlearn_kernels.backends import cpu_backend, torch_backend  # noqa: E402

ISAS = ("default", "avx2", "avx512")
FP32_TOL = 1e-5
# Column counts around every vector width (8/16 fp32 lanes, 16/32-element steps).
WIDTHS = [1, 13, 40, 333]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def runnable(isa: str) -> bool:
    """Whether ``isa`` was compiled and this CPU runs it (by /proc/cpuinfo, independently of the
    module's own ``__builtin_cpu_supports`` test)."""
    needs = {
        "default": set(),
        "avx2": {"avx2", "fma", "f16c"},
        "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    }[isa]
    return isa in _C.compiled_isas() and needs <= cpu_flags()


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each compiled ISA this CPU runs, made active for the test (and restored after)."""
    name = request.param
    if not runnable(name):
        pytest.skip(f"{name} is not compiled or not supported by this CPU")
    before = _C.active_isa()
    _C.set_isa(name)
    yield name
    _C.set_isa(before)


def rel_err(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


def assert_grad_close(out: Tensor, ref: Tensor) -> None:
    """fp32: 1e-5 relative; 16-bit: within 1.5× the reference's own rounding error."""
    if out.dtype == torch.float32:
        assert rel_err(out, ref) < FP32_TOL
    else:
        assert rel_err(out, ref) <= 1.5 * rel_err(ref.to(out.dtype), ref) + 1e-7


def logits(n: int, V: int, dtype: torch.dtype, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, V, generator=g) * 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 15.0])
def test_cross_entropy(isa: str, dtype: torch.dtype, softcap: float | None) -> None:
    """Forward with gradient (smoothing, z-loss, argmax on) and the recompute backward."""
    math = CERowMath(
        softcap=softcap, label_smoothing=0.1, lse_square_scale=1e-3, argmax=True, z_loss=True
    )
    for V in WIDTHS:
        x = logits(9, V, dtype, V)
        target = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(V))
        scale = torch.linspace(-1.0, 2.0, 9)
        ref_x = x.double()
        ref = torch_backend.ce_forward(ref_x, target, scale.double(), math)
        out_x = x.clone()
        out = cpu_backend.ce_forward(out_x, target, scale, math)
        assert rel_err(out.loss, ref.loss) < FP32_TOL, (isa, V)
        assert rel_err(out.lse, ref.lse) < FP32_TOL, (isa, V)
        assert rel_err(out.z_loss, ref.z_loss) < FP32_TOL, (isa, V)
        assert torch.equal(out.argmax, ref.argmax), (isa, V)
        assert_grad_close(out_x, ref_x)
        back_x = x.clone()
        cpu_backend.ce_backward(back_x, target, out.lse, scale, math)
        assert_grad_close(back_x, ref_x)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("softcap", [None, 15.0])
def test_kl(isa: str, beta: float, softcap: float | None) -> None:
    """Forward KL, reverse KL and the JSD with their gradients."""
    math = KLRowMath(temperature=1.5, softcap=softcap, softcap_ref=softcap is not None, beta=beta)
    for V in WIDTHS:
        x, x_ref = logits(7, V, torch.float32, V), logits(7, V, torch.float32, V + 1)
        scale = torch.linspace(0.5, 1.5, 7).double()
        ref_x = x.double()
        ref = torch_backend.kl_forward(ref_x, x_ref.double(), scale, math)
        out_x = x.clone()
        out = cpu_backend.kl_forward(out_x, x_ref, scale, math)
        # An absolute floor: the divergence of a single column (V = 1) is 0.
        assert (out[0].double() - ref[0]).abs().max() < FP32_TOL * (1 + ref[0].abs().max())
        for got, want in zip(out[1:3], ref[1:3], strict=True):
            assert rel_err(got, want) < FP32_TOL, (isa, V)
        assert (out_x.double() - ref_x).abs().max() < FP32_TOL * (1 + ref_x.abs().max())


def test_kl_topk(isa: str) -> None:
    """Top-k KL from the reference's top-k log-probs and tail mass, with its gradient."""
    math = KLRowMath(temperature=1.0)
    for V in WIDTHS[1:]:
        k = min(5, V - 1)
        x, x_ref = logits(6, V, torch.float32, V), logits(6, V, torch.float64, V + 2)
        logp = torch.log_softmax(x_ref, dim=1)
        top, index = logp.topk(k, dim=1)
        tail = torch.log1p(-top.exp().sum(1).clamp(max=1 - 1e-12))
        scale = torch.ones(6, dtype=torch.float64)
        ref_x = x.double()
        ref = torch_backend.kl_topk_forward(ref_x, index, top, tail, scale, math)
        out_x = x.clone()
        out = cpu_backend.kl_topk_forward(out_x, index, top, tail, scale, math)
        for got, want in zip(out, ref, strict=True):
            assert rel_err(got, want) < FP32_TOL, (isa, V)
        assert rel_err(out_x, ref_x) < FP32_TOL, (isa, V)


def test_ngdiff(isa: str) -> None:
    """‖F‖², ‖R‖², ⟨F,R⟩ and the combined write over segments of odd sizes."""
    g = torch.Generator().manual_seed(0)
    sizes = [1, 37, 1000, 20000]
    forget = [torch.randn(n, generator=g) for n in sizes]
    retain = [torch.randn(n, generator=g) for n in sizes]
    f64, r64 = torch.cat(forget).double(), torch.cat(retain).double()
    want = torch.stack([f64 @ f64, r64 @ r64, f64 @ r64])
    assert rel_err(cpu_backend.ngdiff_sums(forget, retain), want) < FP32_TOL
    out = [torch.empty_like(f) for f in forget]
    coef = torch.tensor([0.75, -1.25])
    cpu_backend.ngdiff_write(forget, retain, out, coef)
    assert rel_err(torch.cat(out), 0.75 * r64 - 1.25 * f64) < FP32_TOL


def test_widest_runnable_isa_is_chosen() -> None:
    """At import the widest compiled ISA the CPU has runs (unless the environment forces one)."""
    forced = os.environ.get("UNLEARN_KERNELS_CPU_ISA")
    expected = forced.lower() if forced else next(i for i in reversed(ISAS) if runnable(i))
    code = "from unlearn_kernels import _C; print(_C.active_isa())"
    env = {k: v for k, v in os.environ.items() if k != "UNLEARN_KERNELS_CPU_ISA"}
    if forced:
        env["UNLEARN_KERNELS_CPU_ISA"] = forced
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected
    assert "default" in _C.compiled_isas()
    if os.uname().machine == "x86_64":
        assert _C.compiled_isas() == list(ISAS)


def test_environment_forces_an_isa_and_rejects_unknown_names() -> None:
    code = "from unlearn_kernels import _C; print(_C.active_isa())"
    env = dict(os.environ, UNLEARN_KERNELS_CPU_ISA="DEFAULT")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "default"
    env["UNLEARN_KERNELS_CPU_ISA"] = "sse9"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "UNLEARN_KERNELS_CPU_ISA" in run.stderr and "sse9" in run.stderr
    with pytest.raises(ValueError, match="isa must be one of"):
        _C.set_isa("sse9")


# ---- the binary ------------------------------------------------------------------------------

# An instruction line of `objdump -d -w`: address, raw bytes, mnemonic and operands.
_INSN = re.compile(r"^\s*[0-9a-f]+:\t((?:[0-9a-f]{2} )+)\s*\t(\S+)\s*(.*)$")
_FUNC = re.compile(r"^[0-9a-f]+ <(.*)>:$")
_PREFIXES = {"26", "2e", "36", "3e", "64", "65", "66", "67", "f2", "f3"}
_AVX512_OPERAND = re.compile(r"%zmm|%[xy]mm(?:1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{1to\d+\}")


def copy_of(function: str) -> str | None:
    """The ISA copy a function belongs to, from its (demangled, or mangled when objdump cannot
    demangle a clone such as ``._omp_fn.0.cold``) name: namespace ``AVX512::`` / ``6AVX512``."""
    for isa, mangled in (("avx512", "6AVX512"), ("avx2", "4AVX2"), ("default", "7DEFAULT")):
        if f"{isa.upper()}::" in function or mangled in function:
            return isa
    return None


def disassembly(path: Path) -> dict[str, list[tuple[str, str, str]]]:
    """``{function: [(encoding, mnemonic, operands)]}`` of every function in ``path``'s
    executable sections; encoding "evex" (leading 62), "vex" (c4/c5) or "legacy"."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    text = subprocess.run(
        [objdump, "-d", "-w", "-C", str(path)], capture_output=True, text=True, check=True
    ).stdout
    functions: dict[str, list[tuple[str, str, str]]] = {}
    current: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        if m := _FUNC.match(line):
            current = functions.setdefault(m.group(1), [])
        elif m := _INSN.match(line):
            raw = [b for b in m.group(1).split() if b not in _PREFIXES]
            first = raw[0] if raw else ""
            kind = {"62": "evex", "c4": "vex", "c5": "vex"}.get(first, "legacy")
            current.append((kind, m.group(2), m.group(3)))
    return functions


def test_avx512_instructions_only_in_the_avx512_copy() -> None:
    """No function outside the AVX512 copy holds an AVX-512 instruction (EVEX encoding, zmm,
    xmm/ymm16-31 or mask registers), none outside AVX2/AVX512 a VEX one: on a CPU without them
    the module imports and runs its baseline copy without an illegal instruction. Also not
    vacuous: the AVX512 copy does use zmm, the AVX2 copy ymm, the baseline packed SSE."""
    functions = disassembly(Path(_C.__file__))
    assert functions, "objdump found no functions"
    offenders, seen = [], {"avx512": 0, "avx2": 0, "sse": 0}
    for name, insns in functions.items():
        isa = copy_of(name)
        in_avx512, in_avx2 = isa == "avx512", isa == "avx2"
        for kind, mnemonic, operands in insns:
            avx512 = kind == "evex" or bool(_AVX512_OPERAND.search(operands))
            if avx512 and not in_avx512:
                offenders.append(f"{name}: {mnemonic} {operands} (AVX-512)")
            elif kind == "vex" and not (in_avx512 or in_avx2):
                offenders.append(f"{name}: {mnemonic} {operands} (VEX)")
            seen["avx512"] += in_avx512 and "%zmm" in operands
            seen["avx2"] += in_avx2 and "%ymm" in operands
            seen["sse"] += isa == "default" and mnemonic in ("mulps", "addps", "maxps")
    assert not offenders, "\n".join(offenders[:20])
    compiled = _C.compiled_isas()
    assert seen["avx512"] > 0 or "avx512" not in compiled
    assert seen["avx2"] > 0 or "avx2" not in compiled
    if os.uname().machine == "x86_64":
        assert seen["sse"] > 0, "the baseline copy holds no packed SSE arithmetic"
