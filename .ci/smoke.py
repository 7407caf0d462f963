"""Smoke test of an installed unlearn-kernels wheel (run by .ci/package outside the source tree).

Imports the installed package and runs one fused op, the cross-entropy with its gradient, on
every backend this environment has (torch always; cpu when the wheel holds the extension, on
each instruction set it compiled that this CPU runs; triton under TRITON_INTERPRET=1 when triton
is installed), each against the materialised float64 cross-entropy.

Usage: python smoke.py {cpu|pure}   (cpu: the extension must be there; pure: it must not)
"""

import importlib.util
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

import unlearn_kernels as uk
from unlearn_kernels.backends import cpu_extension_available

kind = sys.argv[1]
assert kind in ("cpu", "pure"), kind
assert "site-packages" in uk.__file__, f"not the installed package: {uk.__file__}"
assert cpu_extension_available() == (kind == "cpu"), "the extension is missing or unexpected"

g = torch.Generator().manual_seed(0)
hidden = torch.randn(48, 32, generator=g)
weight = torch.randn(300, 32, generator=g)
labels = torch.randint(0, 300, (48,), generator=g)
leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
ref = F.cross_entropy(leaves[0] @ leaves[1].t(), labels)
ref_grads = torch.autograd.grad(ref, leaves)


def check(backend: str, label: str) -> None:
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = uk.fused_linear_cross_entropy(h, w, labels, backend=backend)
    grads = torch.autograd.grad(loss, (h, w))
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item()), (label, loss.item())
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got.double() - want).norm() < 1e-4 * want.norm(), label
    print(f"ok {label}: loss {loss.item():.6f}")


check("torch", "torch")
if kind == "cpu":
    from unlearn_kernels import _C

    print("compiled", _C.compiled_isas(), "active", _C.active_isa())
    active = _C.active_isa()
    for isa in _C.compiled_isas():
        try:
            _C.set_isa(isa)
        except ValueError as err:
            print(f"skip cpu/{isa}: {err}")
            continue
        check("cpu", f"cpu/{isa}")
    _C.set_isa(active)
if importlib.util.find_spec("triton") is not None:
    check("triton", "triton (interpreted)")
