"""torch.compile: the fused losses as custom operators (unlearn_kernels.ops.library). Compiled
with ``fullgraph=True`` they give the eager losses and gradients with no graph break, and so
does a patched tiny Llama, plain and PEFT."""

from __future__ import annotations

import inspect

import pytest
import torch
from hf_helpers import lora, tiny_causal_lm
from oracle import generator, rel_err

import unlearn_kernels as uk
from unlearn_kernels.ops import library

TOL = 1e-5  # fp32: the compiled graph fuses the surrounding elementwise ops differently


def compiled_matches_eager(fn, inputs: list[torch.Tensor], seed: int, tol: float = TOL) -> None:
    """``fn`` compiled with fullgraph: no graph break, eager's output and input gradients."""
    explained = torch._dynamo.explain(fn)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    want = fn(*inputs)
    want_grads = torch.autograd.grad(want, inputs)
    got = torch.compile(fn, fullgraph=True)(*inputs)
    got_grads = torch.autograd.grad(got, inputs)
    assert rel_err(got, want) < tol, seed
    for g, w in zip(got_grads, want_grads, strict=True):
        assert rel_err(g, w) < tol, seed


def weighted(loss: torch.Tensor) -> torch.Tensor:
    """A scalar with a non-trivial upstream gradient for every per-row loss."""
    if loss.dim() == 0:
        return loss * 3.0
    return (loss * torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape)).sum()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CE_OPTIONS = {
    "plain": {},
    "smoothing_class_weights": {"label_smoothing": 0.1, "class_weight": "random"},
    "z_loss_token_scaling_shift": {"lse_square_scale": 1e-3, "token_scaling": True, "shift": True},
}


@pytest.mark.parametrize("options", sorted(CE_OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_compiles_to_eager(reduction, options):
    g, seed = generator()
    hidden = torch.randn(37, 19, generator=g, requires_grad=True)
    weight = torch.randn(1013, 19, generator=g, requires_grad=True)
    bias = torch.randn(1013, generator=g, requires_grad=True)
    labels = torch.randint(0, 1013, (37,), generator=g)
    labels[:7] = -100
    token_weight = torch.rand(37, generator=g) + 0.5  # one sign: the loss cannot cancel
    extra = dict(CE_OPTIONS[options])
    if extra.get("class_weight") == "random":
        extra["class_weight"] = torch.rand(1013, generator=g) + 0.1

    def loss(h, w, b):
        out = uk.fused_linear_cross_entropy(
            torch.tanh(h) * 4, w, labels, token_weight=token_weight, bias=b,
            reduction=reduction, softcap=5.0, **extra,
        )  # fmt: skip
        return weighted(out)

    compiled_matches_eager(loss, [hidden, weight, bias], seed)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_structured_outputs_under_compile(reduction):
    g, seed = generator()
    hidden = torch.randn(4, 9, 19, generator=g, requires_grad=True)
    weight = torch.randn(97, 19, generator=g)
    labels = torch.randint(0, 97, (4, 9), generator=g)
    labels[:, :3] = -100
    asked = {"return_z_loss": True, "return_lse": True, "return_token_accuracy": True,
             "return_predicted_tokens": True}  # fmt: skip

    def outputs(h):
        return uk.fused_linear_cross_entropy(
            h, weight, labels, reduction=reduction, lse_square_scale=1e-2, **asked
        )

    want = outputs(hidden)
    got = torch.compile(outputs, fullgraph=True)(hidden)
    for field in want._fields:
        assert getattr(got, field).shape == getattr(want, field).shape, field
        assert getattr(got, field).dtype == getattr(want, field).dtype, field
        assert rel_err(getattr(got, field), getattr(want, field)) < TOL, (field, seed)
    (want_grad,) = torch.autograd.grad(weighted(want.loss), hidden)
    (got_grad,) = torch.autograd.grad(weighted(got.loss), hidden)
    assert rel_err(got_grad, want_grad) < TOL, seed


KL_OPTIONS = {
    "forward": {},
    "reverse_bias_softcap": {"direction": "reverse", "bias": True, "softcap": 4.0},
    "jsd": {"beta": 0.3},
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(("mode", "options"), [("exact", o) for o in sorted(KL_OPTIONS)] + [
    ("topk", "forward"), ("topk", "reverse_bias_softcap")])  # fmt: skip
def test_kl_compiles_to_eager(mode, options, reduction):
    g, seed = generator()
    hidden = torch.randn(2, 9, 19, generator=g, requires_grad=True)
    weight = torch.randn(211, 19, generator=g, requires_grad=True)
    bias = torch.randn(211, generator=g, requires_grad=True)
    ref_hidden = torch.randn(2, 9, 19, generator=g)
    labels = torch.randint(0, 211, (2, 9), generator=g)
    labels[0, :3] = -100
    ref_logprob = torch.log_softmax(ref_hidden @ weight.detach().t(), -1)
    top, index = ref_logprob.topk(8, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    extra = dict(KL_OPTIONS[options])
    if mode == "topk":
        extra.pop("direction", None)
    with_bias = extra.pop("bias", False)

    def loss(h, w, b):
        b = b if with_bias else None
        if mode == "exact":
            out = uk.fused_linear_kl(h * 2, w, ref_hidden, labels=labels, bias=b,
                                     reduction=reduction, **extra)  # fmt: skip
        else:
            out = uk.fused_linear_kl_topk(h * 2, w, index, top, tail, labels=labels, bias=b,
                                          reduction=reduction, **extra)  # fmt: skip
        return weighted(out) + (0 * b.sum() if b is not None else 0)

    inputs = [hidden, weight, bias] if with_bias else [hidden, weight]
    if not with_bias:
        compiled_matches_eager(lambda h, w: loss(h, w, None), inputs, seed)
    else:
        compiled_matches_eager(loss, inputs, seed)


@pytest.mark.parametrize("name", ["cross_entropy", "kl", "kl_topk"])
def test_operators_pass_opcheck(name):
    """Schema, fake implementation and autograd registration agree (torch.library.opcheck)."""
    g, _ = generator()
    hidden = torch.randn(13, 7, generator=g, requires_grad=True)
    weight = torch.randn(31, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 31, (13,), generator=g)
    top, index = torch.log_softmax(torch.randn(13, 31, generator=g), -1).topk(4, dim=-1)
    positional = {
        "cross_entropy": (hidden, weight, labels),
        "kl": (hidden, weight, torch.randn(13, 7, generator=g)),
        "kl_topk": (hidden, weight, index, top, torch.log1p(-top.exp().sum(-1))),
    }[name]
    function = {"cross_entropy": uk.fused_linear_cross_entropy, "kl": uk.fused_linear_kl,
                "kl_topk": uk.fused_linear_kl_topk}[name]  # fmt: skip
    for reduction in ("mean", "none"):
        bound = inspect.signature(function).bind(*positional, reduction=reduction)
        bound.apply_defaults()
        operator, args = library.bind(name, **bound.arguments)
        torch.library.opcheck(operator, args)


def test_bad_input_still_raises_inside_the_compiled_graph():
    hidden = torch.randn(5, 7, requires_grad=True)
    weight = torch.randn(11, 7)
    labels = torch.tensor([0, 1, 2, 3, 11])  # 11 is out of range

    def loss(h):
        return uk.fused_linear_cross_entropy(h, weight, labels)

    with pytest.raises(ValueError, match="labels"):
        torch.compile(loss, fullgraph=True)(hidden)


@pytest.mark.hf
@pytest.mark.parametrize("variant", ["plain", "peft"])
def test_patched_tiny_llama_compiles_without_graph_breaks(variant):
    g, seed = generator()
    model = tiny_causal_lm("llama", seed)
    if variant == "peft":
        model = lora(model, targets="all-linear")
    ids = torch.randint(4, 97, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    token_weight = torch.rand(labels.shape, generator=g) + 0.5
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(ids, mask, labels, token_weight):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, token_weight=token_weight)
        assert out.logits is None
        return out.loss

    with uk.patch(model):
        explained = torch._dynamo.explain(loss)(ids, mask, labels, token_weight)
        assert explained.graph_break_count == 0, explained.break_reasons
        want = loss(ids, mask, labels, token_weight)
        want_grads = torch.autograd.grad(want, params)
        got = torch.compile(loss, fullgraph=True)(ids, mask, labels, token_weight)
        got_grads = torch.autograd.grad(got, params)
    assert rel_err(got, want) < TOL, seed
    errors = [rel_err(a, b) for a, b in zip(got_grads, want_grads, strict=True)]
    assert max(errors) < 1e-4, (seed, max(errors))  # fp32 through a compiled decoder
