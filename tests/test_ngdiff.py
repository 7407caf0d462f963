"""NGDiff combine against the float64 formula, on every backend (docs/design.md §2, §5)."""

from __future__ import annotations

import pytest
import torch
from oracle import available_backends, generator, rel_err
from torch import Tensor

from unlearn_kernels.ops.ngdiff import _plan, ngdiff_combine

BACKENDS = available_backends()
ODD_SHAPES = [(37, 19), (1013,), (3, 5, 7), (1,), (2, 16385), (70001,)]
DTYPES = {
    "fp32": [torch.float32],
    "mixed": [torch.float32, torch.bfloat16, torch.float16],
}


def oracle(
    forget: list[Tensor], retain: list[Tensor], eps: float = 1e-12, sign: float = -1.0
) -> tuple[float, float, float, list[Tensor]]:
    """Norms, cosine and ``a·R_j + b·F_j`` in float64 on the upcast inputs."""
    f = torch.cat([t.double().flatten() for t in forget])
    r = torch.cat([t.double().flatten() for t in retain])
    nf, nr = float(f.norm()), float(r.norm())
    a, b = 1.0 / max(nr, eps), sign / max(nf, eps)
    out = [a * rj.double() + b * fj.double() for fj, rj in zip(forget, retain, strict=True)]
    return nf, nr, float(f @ r) / (max(nf, eps) * max(nr, eps)), out


def random_grads(
    shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], g: torch.Generator, scale: float
) -> list[Tensor]:
    return [
        (torch.randn(s, generator=g) * scale).to(dtypes[i % len(dtypes)])
        for i, s in enumerate(shapes)
    ]


def flat_views(shapes: list[tuple[int, ...]], g: torch.Generator, scale: float) -> list[Tensor]:
    sizes = [torch.Size(s).numel() for s in shapes]
    buffer = torch.randn(sum(sizes), generator=g) * scale
    return [v.view(s) for v, s in zip(buffer.split(sizes), shapes, strict=True)]


def check_against_oracle(forget, retain, out, res, eps=1e-12, sign=-1.0, seed=None) -> None:
    """Norms within 1e-5 (relative), cosine within 1e-5; fp32 outputs within 1e-5 (relative,
    over all of them); 16-bit outputs no worse than PyTorch's own 16-bit ``a·R + b·F``
    (or than rounding the exact answer, whichever is larger)."""
    nf, nr, cos, ref = oracle(forget, retain, eps, sign)
    msg = f"seed={seed}"
    assert abs(float(res.forget_norm) - nf) <= 1e-5 * nf, msg
    assert abs(float(res.retain_norm) - nr) <= 1e-5 * nr, msg
    assert abs(float(res.cosine) - cos) <= 1e-5, msg
    a, b = 1.0 / max(nr, eps), sign / max(nf, eps)
    for dtype in {o.dtype for o in out}:
        idx = [j for j, o in enumerate(out) if o.dtype == dtype]
        got = torch.cat([out[j].double().flatten() for j in idx])
        exact = torch.cat([ref[j].flatten() for j in idx])
        if dtype == torch.float32:
            assert rel_err(got, exact) < 1e-5, msg
            continue
        own = torch.cat([(a * retain[j] + b * forget[j]).double().flatten() for j in idx])
        bound = max(float((own - exact).norm()), 1.05 * float((exact.to(dtype) - exact).norm()))
        assert torch.isfinite(got).all() and float((got - exact).norm()) <= bound, (dtype, msg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "out"])
def test_list_matches_float64(backend, dtypes, inplace):
    g, seed = generator()
    forget = random_grads(ODD_SHAPES, DTYPES[dtypes], g, scale=1e3)
    retain = random_grads(ODD_SHAPES, DTYPES[dtypes], g, scale=1e-3)
    retain_in = [r.clone() for r in retain]
    out = None if inplace else [torch.full_like(r, float("nan")) for r in retain]
    res = ngdiff_combine(forget, retain, out, backend=backend)
    check_against_oracle(forget, retain_in, retain if inplace else out, res, seed=seed)
    if not inplace:
        assert all(torch.equal(r, r0) for r, r0 in zip(retain, retain_in, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_flat_buffer_matches_float64(backend, sign):
    g, seed = generator()
    forget = flat_views(ODD_SHAPES, g, scale=3.0)
    retain = flat_views(ODD_SHAPES, g, scale=0.5)
    assert len(_plan(forget, retain, retain).forget) == 1  # one segment: the fast path
    retain_in = [r.clone() for r in retain]
    res = ngdiff_combine(forget, retain, forget_sign=sign, backend=backend)
    check_against_oracle(forget, retain_in, retain, res, sign=sign, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_tensors_and_strided_views(backend):
    g, seed = generator()
    forget = torch.randn(301, 77, generator=g)
    retain = torch.randn(301, 77, generator=g)
    out = torch.full((77, 301), float("nan")).t()  # non-contiguous out
    res = ngdiff_combine(forget.t(), retain.t(), out.t(), backend=backend)
    check_against_oracle([forget.t()], [retain.t()], [out.t()], res, seed=seed)
    res = ngdiff_combine(forget, retain, out, backend=backend)
    check_against_oracle([forget], [retain], [out], res, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensors_are_skipped(backend):
    g, seed = generator()
    forget = [torch.randn(0, 3), torch.randn(4, 5, generator=g), torch.randn(0)]
    retain = [torch.randn(0, 3), torch.randn(4, 5, generator=g), torch.randn(0)]
    out = [torch.full_like(r, float("nan")) for r in retain]
    res = ngdiff_combine(forget, retain, out, backend=backend)
    check_against_oracle(forget, retain, out, res, seed=seed)
    res = ngdiff_combine(forget[:1], retain[:1], backend=backend)  # nothing but empty tensors
    assert [float(x) for x in res] == [0.0, 0.0, 0.0]


def test_plan_coalesces_only_back_to_back_views():
    g, _ = generator()
    views = flat_views([(3, 4), (5,), (7, 2)], g, 1.0)
    other = flat_views([(3, 4), (5,), (7, 2)], g, 1.0)
    assert len(_plan(views, other, other).forget) == 1
    assert len(_plan(views[::-1], other[::-1], other[::-1]).forget) == 3
    separate = [v.clone() for v in views]
    assert len(_plan(separate, other, other).forget) == 3
    assert len(_plan(views, other, separate).forget) == 3  # out not flat: no coalescing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["forget", "retain"])
def test_zero_gradient(backend, which):
    g, _ = generator()
    forget = random_grads(ODD_SHAPES[:4], [torch.float32], g, 2.0)
    retain = random_grads(ODD_SHAPES[:4], [torch.float32], g, 2.0)
    zeroed = forget if which == "forget" else retain
    for t in zeroed:
        t.zero_()
    _, _, _, ref = oracle(forget, retain)
    out = [torch.full_like(r, float("nan")) for r in retain]
    res = ngdiff_combine(forget, retain, out, backend=backend)
    assert float(getattr(res, f"{which}_norm")) == 0.0
    assert float(res.cosine) == 0.0
    for o, r in zip(out, ref, strict=True):
        assert rel_err(o, r) < 1e-6  # the other task's unit direction


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["inf", "nan", "overflow", "both"])
def test_non_finite_gradient_is_dropped(backend, bad):
    g, _ = generator()
    forget = random_grads(ODD_SHAPES[:4], [torch.float32, torch.bfloat16], g, 1.0)
    retain = random_grads(ODD_SHAPES[:4], [torch.float32, torch.bfloat16], g, 1.0)
    value = {"inf": float("inf"), "nan": float("nan"), "overflow": 1e30, "both": float("inf")}
    forget[1].view(-1)[5] = value[bad]  # 1e30² overflows fp32: an exploded gradient
    if bad == "both":
        retain[0].view(-1)[0] = float("nan")
    _, _, _, ref = oracle([torch.zeros_like(f) for f in forget], retain)
    out = [torch.full_like(r, float("nan")) for r in retain]
    res = ngdiff_combine(forget, retain, out, backend=backend)
    assert not torch.isfinite(res.forget_norm)
    assert torch.isnan(res.cosine)
    assert all(torch.isfinite(o).all() for o in out)
    if bad == "both":
        assert torch.isnan(res.retain_norm)
        assert all((o == 0).all() for o in out)
    else:
        assert torch.isfinite(res.retain_norm)
        for o, r in zip(out, ref, strict=True):  # R/‖R‖ alone
            tol = 1e-6 if o.dtype == torch.float32 else 4e-3
            assert rel_err(o, r) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["list", "flat"])
def test_tiny_gradient_keeps_its_norm(backend, dtype, layout):
    """Elements of ~1e-24 (squares below fp32's range) and ~1e-40 (subnormal): the norm is not
    read as 0, so with a small eps the −F/‖F‖ term is kept; the retain side stays ordinary."""
    g, seed = generator()
    shapes = [(37, 19), (2, 16385), (5,)]
    if layout == "flat":
        forget = [v.to(dtype) for v in flat_views(shapes, g, 1e-24)]
    else:
        forget = random_grads(shapes, [dtype], g, 1e-24)
    forget[2] = (torch.randn(5, generator=g) * 1e-40).to(dtype)  # subnormal in fp32 and bf16
    retain = random_grads(shapes, [dtype], g, 1.0)
    out = [torch.full_like(r, float("nan")) for r in retain]
    res = ngdiff_combine(forget, retain, out, eps=1e-37, backend=backend)
    assert float(res.forget_norm) > 0, seed
    check_against_oracle(forget, retain, out, res, eps=1e-37, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_direction_ascends_forget_descends_retain(backend):
    """⟨d, R⟩ = ‖R‖(1 − cos) ≥ 0 and ⟨d, F⟩ = ‖F‖(cos − 1) ≤ 0, down to cos = ±1."""
    g, seed = generator()
    shapes = [(33, 7), (129,), (5, 5)]
    for alpha in (-1.0, -0.3, 0.0, 0.5, 0.999, 1.0):
        retain = random_grads(shapes, [torch.float32], g, 1.0)
        noise = random_grads(shapes, [torch.float32], g, 1.0)
        beta = (1.0 - alpha**2) ** 0.5
        forget = [(alpha * r + beta * n) * 7.0 for r, n in zip(retain, noise, strict=True)]
        out = [torch.empty_like(r) for r in retain]
        ngdiff_combine(forget, retain, out, backend=backend)
        d = torch.cat([o.double().flatten() for o in out])
        r = torch.cat([t.double().flatten() for t in retain])
        f = torch.cat([t.double().flatten() for t in forget])
        assert d @ r >= -1e-6 * r.norm(), (alpha, seed)
        assert d @ f <= 1e-6 * f.norm(), (alpha, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bit_reproducible(backend):
    """Same inputs, same bits; the kernels' fixed partition also makes the result independent
    of the thread count (the torch reference leans on BLAS dot, which does not promise that)."""
    g, _ = generator()
    forget = random_grads(ODD_SHAPES, DTYPES["mixed"], g, 1.0)
    retain = random_grads(ODD_SHAPES, DTYPES["mixed"], g, 1.0)
    threads = torch.get_num_threads()
    runs = []
    for n_threads in (threads, threads, 1):
        torch.set_num_threads(n_threads)
        try:
            out = [torch.empty_like(r) for r in retain]
            runs.append((ngdiff_combine(forget, retain, out, backend=backend), out))
        finally:
            torch.set_num_threads(threads)
    for res, out in runs[1:] if backend != "torch" else runs[1:2]:
        assert all(torch.equal(a, b) for a, b in zip(res, runs[0][0], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(out, runs[0][1], strict=True))


def test_invalid_arguments_name_the_argument():
    f = [torch.randn(3, 4), torch.randn(5)]
    r = [torch.randn(3, 4), torch.randn(5)]
    cases = [
        ((f, r[:1]), {}, "retain_grads must hold 2"),
        ((f, r, r[:1]), {}, "out must hold 2"),
        ((f, [r[0], torch.randn(6)]), {}, r"retain_grads\[1\] must have shape \(5,\)"),
        ((f, [r[0], r[1].bfloat16()]), {}, r"retain_grads\[1\] must be torch.float32"),
        (([t.double() for t in f], [t.double() for t in r]), {}, r"forget_grads\[0\] must be"),
        ((f, [r[0], torch.randn(5, device="meta")]), {}, r"retain_grads\[1\] is on meta"),
        ((f, [r[0], "x"]), {}, r"retain_grads\[1\] must be a torch.Tensor"),
        (([], []), {}, "forget_grads must hold at least one tensor"),
        ((f, r), {"eps": 0.0}, "eps must be"),
        ((f, r), {"eps": None}, "eps must be a float"),
        ((f, r), {"eps": "1e-12"}, "eps must be a float"),
        ((f, r), {"forget_sign": "x"}, "forget_sign must be a float"),
        ((f, r), {"forget_sign": 2.0}, "forget_sign must be"),
        ((f, r), {"backend": "cuda"}, "backend must be one of"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ngdiff_combine(*args, **kwargs)
