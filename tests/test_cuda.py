"""Correctness on a CUDA GPU at real shapes (V = 128256), against the torch backend and the
float64 oracle: bf16/fp32, softcap, mixed-sign token weights, none/mean, both logits dtypes, a
trainable weight (fp32 ``dW`` by the GEMM), KL exact/top-k/streamed, NGDiff. Collected
everywhere, skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them."""

from __future__ import annotations

import pytest
import torch

import unlearn_kernels as uk
from tests.oracle import ce_oracle, rel_err

pytestmark = pytest.mark.cuda

N, D, V = 1024, 4096, 128256
#: tolerated relative error against the float64 oracle, per input dtype
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def _inputs(dtype: torch.dtype, trainable: bool = False, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device="cuda", generator=g) * 2 / D**0.5).to(dtype)
    weight.requires_grad_(trainable)
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[torch.arange(N, device="cuda") % 5 < 2] = -100
    token_weight = torch.where(torch.arange(N, device="cuda") % 3 == 0, -1.0, 1.0)
    return hidden, weight, labels, token_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("logits_dtype", ["auto", "input"])
def test_cross_entropy_against_oracle_and_torch_backend(dtype, reduction, softcap, logits_dtype):
    hidden, weight, labels, token_weight = _inputs(dtype)
    upstream = torch.rand(N, device="cuda") if reduction == "none" else None
    ref_loss, (ref_dh, _, _) = ce_oracle(
        hidden, weight, labels, token_weight, None, -100, reduction, softcap, upstream
    )
    results = {}
    for backend in ("triton", "torch"):
        loss = uk.fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            token_weight=token_weight,
            reduction=reduction,
            softcap=softcap,
            logits_dtype=logits_dtype,
            backend=backend,
        )
        (dh,) = torch.autograd.grad(loss, hidden, grad_outputs=upstream)
        results[backend] = (loss.detach(), dh)
    # fp32 logits keep the bf16 loss far closer to the oracle than bf16 logits
    loss_tol = TOL[dtype] if logits_dtype == "input" or dtype == torch.float32 else 1e-4
    for loss, dh in results.values():
        assert rel_err(loss, ref_loss) < loss_tol
        assert rel_err(dh, ref_dh) < TOL[dtype]
    assert rel_err(results["triton"][1], results["torch"][1]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainable_weight_gradient_accumulates_in_fp32(dtype):
    hidden, weight, labels, token_weight = _inputs(dtype, trainable=True)
    ref_loss, (ref_dh, ref_dw, _) = ce_oracle(
        hidden, weight, labels, token_weight, None, -100, "sum", None, None
    )
    loss = uk.fused_linear_cross_entropy(
        hidden, weight, labels, token_weight=token_weight, reduction="sum", chunk_size=256
    )
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert dw.dtype == dtype
    assert rel_err(loss.detach(), ref_loss) < TOL[dtype]
    assert rel_err(dh, ref_dh) < TOL[dtype]
    assert rel_err(dw, ref_dw) < TOL[dtype]


TOPK = 1024


def _kl_oracle(hidden, weight, ref_logits, labels, index=None):
    """Forward KL (mean over labelled rows) in float64; with ``index`` the top-k loss
    ``Σ_K p log(p/q) + p_t log(p_t/q_t)`` over those tokens and the tail."""
    keep = labels != -100
    logq = torch.log_softmax(hidden.double() @ weight.double().t(), -1)[keep]
    logp = torch.log_softmax(ref_logits.double(), -1)[keep]
    if index is None:
        return (logp.exp() * (logp - logq)).sum() / keep.sum()
    index = index[keep]
    top_p, top_q = logp.gather(1, index), logq.gather(1, index)
    tail_p = logp.scatter(1, index, float("-inf")).logsumexp(-1)
    tail_q = logq.scatter(1, index, float("-inf")).logsumexp(-1)
    terms = (top_p.exp() * (top_p - top_q)).sum(-1) + tail_p.exp() * (tail_p - tail_q)
    return terms.sum() / keep.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "streamed", "streamed_host", "topk"])
def test_kl_modes_against_oracle(dtype, mode):
    hidden, weight, labels, _ = _inputs(dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    ref_hidden = (hidden.detach() + 0.3 * torch.randn(N, D, device="cuda", generator=g)).to(dtype)
    ref_logits = (ref_hidden.double() @ weight.double().t()).float()
    h64 = hidden.detach().double().requires_grad_()
    index = None
    if mode == "exact":
        loss = uk.fused_linear_kl(hidden, weight, ref_hidden, labels=labels)
    elif mode.startswith("streamed"):
        cache = ref_logits.bfloat16() if dtype == torch.bfloat16 else ref_logits
        cache = cache.cpu() if mode == "streamed_host" else cache
        ref_logits = cache.float().cuda()  # the oracle sees the cache as stored
        loss = uk.fused_linear_kl(hidden, weight, ref_logits=cache, labels=labels, chunk_size=256)
    else:
        logp = torch.log_softmax(ref_logits.double(), -1)
        top, index = logp.topk(TOPK, dim=-1)
        tail = logp.scatter(1, index, float("-inf")).logsumexp(-1)
        loss = uk.fused_linear_kl_topk(
            hidden, weight, index, top.float(), tail.float(), labels=labels
        )
    oracle = _kl_oracle(h64, weight, ref_logits, labels, index)
    (oracle_dh,) = torch.autograd.grad(oracle, h64)
    (dh,) = torch.autograd.grad(loss, hidden)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
    assert rel_err(loss.detach(), oracle) < tol
    assert rel_err(dh, oracle_dh) < tol


def test_ngdiff_combine_against_float64():
    g = torch.Generator(device="cuda").manual_seed(2)
    forget = [torch.randn(s, device="cuda", generator=g) for s in (4096 * 4096, 1000, 77)]
    retain = [torch.randn(t.shape, device="cuda", generator=g) for t in forget]
    expected = []
    nf = torch.sqrt(sum((t.double() ** 2).sum() for t in forget))
    nr = torch.sqrt(sum((t.double() ** 2).sum() for t in retain))
    for f, r in zip(forget, retain, strict=True):
        expected.append(r.double() / nr - f.double() / nf)
    out = [torch.empty_like(t) for t in retain]
    uk.ngdiff_combine(forget, retain, out)
    for o, e in zip(out, expected, strict=True):
        assert rel_err(o, e) < 1e-5
