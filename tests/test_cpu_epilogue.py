"""The C++ cross-entropy epilogue (backend "cpu") against a float64 oracle.

Oracle: the same quantities in float64 on the upcast inputs, gradients by autograd on the
materialised logits; the softcap factor ``∂z/∂x = sech²(x/c)`` is evaluated directly because
float64's ``1 − tanh²`` cancels to 0 for saturated logits. Errors are ``‖out − ref‖/‖ref‖``:
fp32 under 1e-5, fp64 under 1e-12; bf16/fp16 gradients no worse than the torch reference's own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

_C = pytest.importorskip("unlearn_kernels._C", reason="unlearn_kernels._C is not built")
if not hasattr(_C, "ce_forward"):
    pytest.skip("unlearn_kernels._C was built without the CE epilogue", allow_module_level=True)

from unlearn_kernels._options import CERowMath  # noqa: E402
from unlearn_kernels.backends import cpu_backend, torch_backend  # noqa: E402

FP32_TOL = 1e-5
CAPS = [None, 30.0]


def ce_forward(backend, x, target, grad_scale, softcap):
    """``backend``'s epilogue for the plain cross-entropy (only softcap set): ``(loss, lse)``."""
    return tuple(backend.ce_forward(x, target, grad_scale, CERowMath(softcap=softcap))[:2])


def ce_backward(backend, x, target, lse, grad_scale, softcap):
    return backend.ce_backward(x, target, lse, grad_scale, CERowMath(softcap=softcap))


@pytest.fixture(autouse=True)
def two_threads() -> Iterator[None]:
    """Run every test with two threads so rows are split across OpenMP workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def oracle(
    x: Tensor, target: Tensor, grad_scale: Tensor | None, softcap: float | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """float64 ``(loss, lse, grad)`` with ``grad = s_i ∂ℓ_i/∂x_i`` (``None`` without ``s``)."""
    x64 = x.double()
    z = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
    z.requires_grad_(True)
    lse = torch.logsumexp(z, dim=1)
    loss = lse - z.gather(1, target[:, None]).squeeze(1)
    if grad_scale is None:
        return loss.detach(), lse.detach(), None
    (grad,) = torch.autograd.grad((loss * grad_scale.double()).sum(), z)
    if softcap is not None:
        grad = grad / torch.cosh(x64 / softcap).square()
    return loss.detach(), lse.detach(), grad


def oracle_grad_from_lse(
    x: Tensor, target: Tensor, lse: Tensor, grad_scale: Tensor, softcap: float | None
) -> Tensor:
    """float64 ``s_i (exp(z_i − lse_i) − e_{y_i}) ∂z/∂x`` for a given (saved fp32) ``lse``."""
    x64 = x.double()
    z = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
    grad = torch.exp(z - lse.double()[:, None])
    grad[torch.arange(x.shape[0]), target] -= 1.0
    grad *= grad_scale.double()[:, None]
    if softcap is not None:
        grad = grad / torch.cosh(x64 / softcap).square()
    return grad


def rel_err(out: Tensor, ref: Tensor) -> float:
    """``‖out − ref‖/‖ref‖`` in float64 (``‖out − ref‖`` when ``ref`` is 0); NaN stays NaN."""
    diff = (out.double() - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


def make_logits(n: int, vocab: int, kind: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fresh random logits: "normal" (σ = 4), "huge" (uniform ±1e4), "offset" (1e4 ± N(0, 4))."""
    if kind == "normal":
        x = torch.randn(n, vocab) * 4.0
    elif kind == "huge":
        x = (torch.rand(n, vocab) * 2.0 - 1.0) * 1e4
    elif kind == "offset":
        sign = torch.where(torch.rand(n, 1) < 0.5, -1.0, 1.0)
        x = sign * 1e4 + torch.randn(n, vocab) * 4.0
    else:
        raise AssertionError(kind)
    return x.to(dtype).contiguous()


def make_scale(n: int) -> Tensor:
    """Per-row gradient scales with mixed signs and some exact zeros."""
    s = torch.randn(n)
    s[:: max(n // 4, 1)] = 0.0
    return s


def poisoned_empty_heap(n: int) -> None:
    """Free NaN-filled blocks of the outputs' sizes so fresh allocations likely reuse them."""
    junk = [torch.full((n,), float("nan"), dtype=dt) for dt in (torch.float32, torch.float64)] * 4
    del junk


SHAPES = [(37, 1013), (64, 4096), (3, 128256), (5, 7), (6, 33), (4, 48)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "huge", "offset"])
@pytest.mark.parametrize("softcap", CAPS)
def test_forward_with_grad_fp32(shape: tuple[int, int], kind: str, softcap: float | None) -> None:
    n, vocab = shape
    x = make_logits(n, vocab, kind)
    target = torch.randint(0, vocab, (n,))
    scale = make_scale(n)
    ref_loss, ref_lse, ref_grad = oracle(x, target, scale, softcap)

    poisoned_empty_heap(n)
    out = x.clone()
    loss, lse = ce_forward(cpu_backend, out, target, scale, softcap)

    assert loss.dtype == torch.float32 and lse.dtype == torch.float64
    assert loss.shape == lse.shape == (n,)
    for t in (loss, lse, out):
        assert torch.isfinite(t).all()
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert rel_err(lse, ref_lse) < FP32_TOL
    assert rel_err(out, ref_grad) < FP32_TOL
    # Every row is its own check (a row left unwritten or mixed up fails here).
    row_err = (out.double() - ref_grad).norm(dim=1) / ref_grad.norm(dim=1).clamp_min(1e-30)
    assert (row_err[scale != 0] < 1e-4).all()
    assert (out[scale == 0] == 0).all()
    assert ((loss.double() - ref_loss).abs() <= 1e-5 * ref_loss.abs().clamp_min(1.0)).all()


@pytest.mark.parametrize("softcap", CAPS)
def test_forward_without_grad_leaves_x(softcap: float | None) -> None:
    n, vocab = 37, 1013
    x = make_logits(n, vocab, "normal")
    target = torch.randint(0, vocab, (n,))
    ref_loss, ref_lse, _ = oracle(x, target, None, softcap)
    out = x.clone()
    version = out._version
    poisoned_empty_heap(n)
    loss, lse = ce_forward(cpu_backend, out, target, None, softcap)
    assert torch.equal(out, x) and out._version == version
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert rel_err(lse, ref_lse) < FP32_TOL


@pytest.mark.parametrize("shape", [(37, 1013), (3, 128256), (5, 7)])
@pytest.mark.parametrize("softcap", CAPS)
def test_backward_fp32(shape: tuple[int, int], softcap: float | None) -> None:
    n, vocab = shape
    x = make_logits(n, vocab, "normal")
    target = torch.randint(0, vocab, (n,))
    scale = make_scale(n)
    _, lse = ce_forward(cpu_backend, x.clone(), target, None, softcap)
    _, ref_lse, ref_grad = oracle(x, target, scale, softcap)
    assert lse.dtype == torch.float64 and rel_err(lse, ref_lse) < FP32_TOL
    out = x.clone()
    version = out._version
    assert ce_backward(cpu_backend, out, target, lse, scale, softcap) is None
    assert out._version > version
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_grad) < FP32_TOL


@pytest.mark.parametrize("kind", ["huge", "offset"])
@pytest.mark.parametrize("softcap", CAPS)
def test_backward_large_logits(kind: str, softcap: float | None) -> None:
    """|z| ~ 1e4: an fp32 lse would be off by up to ulp(1e4)/2 ≈ 5e-4; the saved fp64 lse
    (split hi + lo around an exact fp32 shift) keeps the rebuilt softmax at fp32 accuracy."""
    n, vocab = 11, 3001
    x = make_logits(n, vocab, kind)
    target = torch.randint(0, vocab, (n,))
    scale = make_scale(n)
    _, lse = ce_forward(cpu_backend, x.clone(), target, None, softcap)
    _, _, ref_grad = oracle(x, target, scale, softcap)
    out = x.clone()
    ce_backward(cpu_backend, out, target, lse, scale, softcap)
    assert rel_err(out, ref_grad) < FP32_TOL
    # An fp32 lse is also accepted, and then used as given.
    out32 = x.clone()
    lse32 = lse.float()
    ce_backward(cpu_backend, out32, target, lse32, scale, softcap)
    assert rel_err(out32, oracle_grad_from_lse(x, target, lse32, scale, softcap)) < FP32_TOL


@pytest.mark.parametrize("kind", ["normal", "huge"])
@pytest.mark.parametrize("softcap", CAPS)
def test_float64(kind: str, softcap: float | None) -> None:
    """fp64 logits (gradcheck) are computed in double throughout."""
    n, vocab = 13, 257
    x = make_logits(n, vocab, kind, torch.float64) + torch.randn(n, vocab, dtype=torch.float64)
    target = torch.randint(0, vocab, (n,))
    scale = make_scale(n).double()
    ref_loss, ref_lse, ref_grad = oracle(x, target, scale, softcap)
    out = x.clone()
    loss, lse = ce_forward(cpu_backend, out, target, scale, softcap)
    assert loss.dtype == lse.dtype == torch.float64
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    assert rel_err(out, ref_grad) < 1e-12
    back = x.clone()
    ce_backward(cpu_backend, back, target, lse, scale, softcap)
    assert rel_err(back, ref_grad) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "huge"])
@pytest.mark.parametrize("softcap", CAPS)
def test_half_precision_matches_torch_reference(
    dtype: torch.dtype, kind: str, softcap: float | None
) -> None:
    n, vocab = 37, 1013
    x = make_logits(n, vocab, kind, dtype)
    target = torch.randint(0, vocab, (n,))
    scale = make_scale(n)
    ref_loss, ref_lse, ref_grad = oracle(x, target, scale, softcap)

    ours = x.clone()
    loss, lse = ce_forward(cpu_backend, ours, target, scale, softcap)
    theirs = x.clone()
    torch_loss, _ = ce_forward(torch_backend, theirs, target, scale, softcap)

    assert ours.dtype == dtype and torch.isfinite(ours).all()
    # Loss and lse are fp32 math on exactly representable inputs.
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert rel_err(lse, ref_lse) < FP32_TOL
    # The gradient is rounded to the input dtype: no worse than PyTorch's own handling.
    assert rel_err(ours, ref_grad) <= 1.02 * rel_err(theirs, ref_grad) + 1e-7
    assert rel_err(loss, ref_loss) <= 1.02 * rel_err(torch_loss, ref_loss) + FP32_TOL

    back = x.clone()
    ce_backward(cpu_backend, back, target, lse, scale, softcap)
    torch_back = x.clone()
    ce_backward(torch_backend, torch_back, target, lse, scale, softcap)
    ref_back = oracle_grad_from_lse(x, target, lse, scale, softcap)
    assert rel_err(back, ref_back) <= 1.02 * rel_err(torch_back, ref_back) + 1e-7


@pytest.mark.parametrize("shape", [(37, 1013), (3, 40000), (65, 513)])
def test_rows_split_across_threads_are_all_written(shape: tuple[int, int]) -> None:
    """n not a multiple of the per-task row count: every row's outputs are fresh."""
    n, vocab = shape
    x = make_logits(n, vocab, "normal")
    target = torch.randint(0, vocab, (n,))
    scale = torch.rand(n) + 0.5
    ref_loss, ref_lse, ref_grad = oracle(x, target, scale, None)
    for _ in range(3):
        poisoned_empty_heap(n)
        out = x.clone()
        loss, lse = ce_forward(cpu_backend, out, target, scale, None)
        assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
        assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        assert torch.allclose(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
        assert rel_err(out, ref_grad) < FP32_TOL


def test_single_column_and_empty() -> None:
    x = torch.randn(4, 1) * 100
    target = torch.zeros(4, dtype=torch.long)
    for softcap in CAPS:
        out = x.clone()
        loss, lse = ce_forward(cpu_backend, out, target, torch.ones(4), softcap)
        assert (loss == 0).all() and (out == 0).all()
        z = x[:, 0] if softcap is None else softcap * torch.tanh(x[:, 0] / softcap)
        assert torch.allclose(lse, z.double(), rtol=1e-6)
    loss, lse = ce_forward(
        cpu_backend, torch.empty(0, 10), torch.empty(0, dtype=torch.long), torch.empty(0), None
    )
    assert loss.shape == lse.shape == (0,)


def test_nan_logit_poisons_only_its_row() -> None:
    n, vocab = 6, 300
    x = make_logits(n, vocab, "normal")
    x[2, 17] = float("nan")
    target = torch.randint(0, vocab, (n,))
    out = x.clone()
    loss, lse = ce_forward(cpu_backend, out, target, torch.ones(n), None)
    assert loss[2].isnan() and lse[2].isnan() and out[2].isnan().all()
    keep = torch.arange(n) != 2
    ref_loss, _, ref_grad = oracle(x[keep], target[keep], torch.ones(n - 1), None)
    assert rel_err(loss[keep], ref_loss) < FP32_TOL
    assert rel_err(out[keep], ref_grad) < FP32_TOL


def test_invalid_arguments_raise_value_error_before_writing() -> None:
    n, vocab = 5, 50
    x = make_logits(n, vocab, "normal")
    good_target = torch.randint(0, vocab, (n,))
    scale = torch.ones(n)
    lse = torch.zeros(n)
    bad_calls = [
        lambda t: ce_forward(cpu_backend, t, torch.full((n,), vocab), scale, None),
        lambda t: ce_forward(cpu_backend, t, torch.full((n,), -100), scale, None),
        lambda t: ce_backward(cpu_backend, t, torch.full((n,), vocab), lse, scale, None),
        lambda t: ce_forward(cpu_backend, t, good_target.int(), scale, None),
        lambda t: ce_forward(cpu_backend, t, good_target[:-1], scale, None),
        lambda t: ce_forward(cpu_backend, t, good_target, scale.int(), None),
        lambda t: ce_forward(cpu_backend, t, good_target, scale[:-1], None),
        lambda t: ce_forward(cpu_backend, t, good_target, scale, 0.0),
        lambda t: ce_forward(cpu_backend, t, good_target, scale, float("inf")),
        lambda t: ce_backward(cpu_backend, t, good_target, lse[:-1], scale, None),
        lambda t: ce_forward(cpu_backend, t.int(), good_target, scale, None),
        lambda t: ce_forward(cpu_backend, t[0], good_target[:1], scale[:1], None),
    ]
    for call in bad_calls:
        out = x.clone()
        with pytest.raises(ValueError):
            call(out)
        assert torch.equal(out, x)
    wide = torch.randn(vocab, n)
    with pytest.raises(ValueError, match="contiguous"):
        ce_forward(cpu_backend, wide.t(), good_target, scale, None)
