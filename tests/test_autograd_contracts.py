"""Autograd contracts of the fused ops, on every backend: repeated backward through a retained
graph behaves as plain PyTorch does (no ``.grad`` aliasing a saved gradient), the no-copy fast
path is kept for a single backward, and double backward raises instead of silently dropping the
op's second-order term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import available_backends, generator, rel_err

import unlearn_kernels as uk

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

BACKENDS = available_backends()
N, D, V, K = 13, 6, 37, 5
OPS = ("cross_entropy", "kl", "kl_topk")
REDUCTIONS = ("mean", "sum", "none")


def make(gen: torch.Generator, trainable: bool) -> dict:
    ref_logits = torch.randn(N, V, generator=gen) * 2
    log_p = ref_logits.log_softmax(-1)
    index = log_p.topk(K, dim=-1).indices
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[:3] = -100
    return {
        "hidden": torch.randn(N, D, generator=gen).requires_grad_(),
        "weight": (torch.randn(V, D, generator=gen) / D**0.5).requires_grad_(trainable),
        "labels": labels,
        "token_weight": torch.rand(N, generator=gen) + 0.5,
        "ref_hidden": torch.randn(N, D, generator=gen),
        "index": index,
        "logprob": log_p.gather(1, index),
        "tail": log_p.scatter(1, index, float("-inf")).logsumexp(-1),
    }


def fused(op: str, t: dict, hidden: torch.Tensor, **options) -> torch.Tensor:
    common = {"token_weight": t["token_weight"], **options}
    if op == "cross_entropy":
        return uk.fused_linear_cross_entropy(hidden, t["weight"], t["labels"], **common)
    if op == "kl":
        return uk.fused_linear_kl(
            hidden, t["weight"], t["ref_hidden"], labels=t["labels"], **common
        )
    return uk.fused_linear_kl_topk(
        hidden, t["weight"], t["index"], t["logprob"], t["tail"], labels=t["labels"], **common
    )


def plain(op: str, t: dict, hidden: torch.Tensor, reduction: str) -> torch.Tensor:
    """The same loss by plain PyTorch on materialised logits."""
    z = hidden @ t["weight"].t()
    keep = t["labels"] != -100
    if op == "cross_entropy":
        per = F.cross_entropy(z, t["labels"], ignore_index=-100, reduction="none")
    elif op == "kl":
        log_p = (t["ref_hidden"] @ t["weight"].detach().t()).log_softmax(-1)
        per = (log_p.exp() * (log_p - z.log_softmax(-1))).sum(-1)
    else:
        log_q = z.log_softmax(-1)
        lp = t["logprob"]
        per = (lp.exp() * (lp - log_q.gather(1, t["index"]))).sum(-1)
        log_q_tail = log_q.scatter(1, t["index"], float("-inf")).logsumexp(-1)
        per = per + t["tail"].exp() * (t["tail"] - log_q_tail)
    per = torch.where(keep, per * t["token_weight"], 0.0)
    if reduction == "none":
        return per
    return per.sum() / (keep.sum() if reduction == "mean" else 1)


def leaves(t: dict) -> list[torch.Tensor]:
    return [x for x in (t["hidden"], t["weight"]) if x.requires_grad]


def scenario(kind: str, loss_fn, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run one repeated-backward scenario; return the final ``.grad`` of ``params``."""
    for p in params:
        p.grad = None
    loss = loss_fn()
    if loss.dim():
        loss = loss.sum()
    if kind == "zero_then_again":
        loss.backward(retain_graph=True)
        for p in params:
            p.grad.zero_()
        loss.backward()
    elif kind == "three_times":
        for _ in range(3):
            loss.backward(retain_graph=True)
    else:  # clip the first .grad in place, then backward again
        loss.backward(retain_graph=True)
        torch.nn.utils.clip_grad_norm_(params, 1e-3)
        loss.backward()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", ["zero_then_again", "three_times", "clip_then_again"])
def test_repeated_backward_matches_plain_pytorch(backend, op, kind):
    gen, seed = generator()
    t = make(gen, trainable=True)
    params = leaves(t)
    for reduction in REDUCTIONS:
        ours = scenario(
            kind,
            lambda r=reduction: fused(op, t, t["hidden"], reduction=r, backend=backend),
            params,
        )
        theirs = scenario(kind, lambda r=reduction: plain(op, t, t["hidden"], r), params)
        for got, want in zip(ours, theirs, strict=True):
            assert rel_err(got, want) < 1e-5, (reduction, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_single_backward_hands_over_the_saved_gradient(backend, op):
    """The fast path: one backward that frees the graph makes ``.grad`` the tensor the forward
    sweep saved (no copy)."""
    gen, _ = generator()
    t = make(gen, trainable=True)
    saved = set()

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.add(x.data_ptr())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fused(op, t, t["hidden"], backend=backend)
    loss.backward()
    assert t["hidden"].grad.data_ptr() in saved
    assert t["weight"].grad.data_ptr() in saved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("trainable", [False, True])
def test_double_backward_raises(backend, op, trainable):
    """``create_graph=True`` still gives the right first-order gradient; differentiating it
    again raises, also when the loss has other, differentiable parts."""
    gen, seed = generator()
    t = make(gen, trainable)
    x = torch.randn(N, D, generator=gen, requires_grad=True)
    for reduction in REDUCTIONS:
        loss = fused(op, t, x * 2, reduction=reduction, backend=backend).sum()
        (grad,) = torch.autograd.grad(loss + (x**3).sum(), x, create_graph=True)
        (want,) = torch.autograd.grad(plain(op, t, x * 2, reduction).sum() + (x**3).sum(), x)
        assert rel_err(grad, want) < 1e-5, (reduction, seed)
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.grad(grad.sum(), x)
