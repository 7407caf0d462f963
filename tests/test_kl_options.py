"""fused_linear_kl / fused_linear_kl_topk options (bias, softcap, reverse KL, the generalised
JSD, batchmean, autocast) against float64 oracles, on every backend."""

from __future__ import annotations

import math

import pytest
import test_kl as base
import torch
import torch.nn.functional as F
from oracle import available_backends, generator, rel_err
from torch import Tensor

import unlearn_kernels as uk

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

BACKENDS = available_backends()
CPU_BACKENDS = [b for b in BACKENDS if b.values[0] in ("torch", "cpu")]
ODD = (37, 19, 1013)
NEG_INF = float("-inf")
#: (direction, beta) of each divergence
DIVERGENCES = {
    "reverse": ("reverse", None),
    "jsd0.3": ("forward", 0.3),
    "jsd0.5": ("forward", 0.5),
    "jsd0.9": ("forward", 0.9),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def capped(z: Tensor, softcap: float | None) -> Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def divergence(log_p: Tensor, log_q: Tensor, direction: str, beta: float | None) -> Tensor:
    """Per-row divergence of float64 log-probs, as Liger-Kernel's fused linear JSD defines the
    generalised JSD: ``β KL(p ‖ m) + (1 − β) KL(q ‖ m)``, ``m = βp + (1 − β)q``."""
    if beta is None:
        if direction == "forward":
            return base.xlogy_ratio(log_p, log_q).sum(-1)
        return base.xlogy_ratio(log_q, log_p).sum(-1)
    log_m = torch.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)
    return beta * base.xlogy_ratio(log_p, log_m).sum(-1) + (1 - beta) * base.xlogy_ratio(
        log_q, log_m
    ).sum(-1)


def oracle(inputs: dict, per_token_fn, reduction: str, upstream: Tensor | None, batch: int = 1):
    """Float64 autograd of the reduced ``per_token_fn(student logits)`` over (hidden, weight,
    bias): ``(loss, grads, size)`` as ``test_kl.oracle``, plus ``batchmean``."""
    leaves = {k: inputs[k].detach().double().requires_grad_() for k in ("hidden", "weight")}
    bias = inputs.get("bias")
    if bias is not None:
        leaves["bias"] = bias.detach().double().requires_grad_()
    z = leaves["hidden"] @ leaves["weight"].t()
    if bias is not None:
        z = z + leaves["bias"]
    per_token = per_token_fn(z)
    labels, token_weight = inputs.get("labels"), inputs.get("token_weight")
    red = "sum" if reduction == "batchmean" else reduction
    loss = base.reduce(per_token, labels, token_weight, red)
    size = base.reduce(
        per_token.abs(), labels, None if token_weight is None else token_weight.abs(), red
    )
    if reduction == "batchmean":
        loss, size = loss / batch, size / batch
    grads = torch.autograd.grad(
        loss, list(leaves.values()), None if upstream is None else upstream.double()
    )
    if not inputs["weight"].requires_grad:
        grads = (grads[0], None, *grads[2:])
    return loss.detach(), tuple(grads), size.detach()


def run(fn, inputs: dict, upstream: Tensor | None, *args, **kwargs):
    """Loss and gradients (hidden, weight[, bias]) of a fused op."""
    bias = inputs.get("bias")
    loss = fn(
        inputs["hidden"],
        inputs["weight"],
        *args,
        labels=inputs.get("labels"),
        token_weight=inputs.get("token_weight"),
        bias=bias,
        **kwargs,
    )
    wrt = [t for t in (inputs["hidden"], inputs["weight"], bias) if t is not None]
    wrt = [t for t in wrt if t.requires_grad]
    grads = dict(zip(map(id, wrt), torch.autograd.grad(loss, wrt, upstream), strict=True))
    named = [grads.get(id(inputs["hidden"])), grads.get(id(inputs["weight"]))]
    if bias is not None:
        named.append(grads.get(id(bias)))
    return loss, tuple(named)


def with_bias(inputs: dict, gen: torch.Generator, ref: bool = True) -> dict:
    """A trainable student bias and a reference bias of logit scale."""
    vocab = inputs["weight"].shape[0]
    inputs["bias"] = torch.randn(vocab, generator=gen).requires_grad_()
    if ref:
        inputs["ref_bias"] = inputs["bias"].detach() + 0.3 * torch.randn(vocab, generator=gen)
    return inputs


def reference_logits(inputs: dict, softcap: float | None) -> Tensor:
    """Float64 reference logits of the exact mode: ``cap(H_ref W_refᵀ + b_ref)``."""
    z = base.ref_logits_of(inputs)
    if inputs.get("ref_bias") is not None:
        z = z + inputs["ref_bias"].double()
    return capped(z, softcap)


def per_token_fn(ref_z: Tensor, temperature: float, softcap: float | None, direction, beta):
    log_p = torch.log_softmax(ref_z.double() / temperature, dim=-1)
    return lambda z: divergence(
        log_p, torch.log_softmax(capped(z, softcap) / temperature, dim=-1), direction, beta
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "streamed", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_bias_and_softcap(backend, mode, reduction, softcap):
    """Student bias (differentiated) and softcap; the exact reference has its own bias and is
    capped too, streamed reference logits are final (not capped), top-k caches are final."""
    gen, seed = generator()
    inputs = with_bias(base.make_inputs(*ODD, gen=gen), gen)
    upstream = base.upstream_for(inputs, reduction)
    options = {"softcap": softcap, "temperature": 0.8, "reduction": reduction, "chunk_size": 16}
    options["backend"] = backend
    if mode == "exact":
        args = (inputs["ref_hidden"], inputs["ref_weight"])
        options["ref_bias"] = inputs["ref_bias"]
        got = run(uk.fused_linear_kl, inputs, upstream, *args, **options)
        fn = per_token_fn(reference_logits(inputs, softcap), 0.8, softcap, "forward", None)
    elif mode == "streamed":
        ref_logits = reference_logits(inputs, None).float()
        got = run(uk.fused_linear_kl, inputs, upstream, ref_logits=ref_logits, **options)
        fn = per_token_fn(ref_logits, 0.8, softcap, "forward", None)
    else:
        topk = base.make_topk(reference_logits(inputs, None), 24, 0.8, gen)
        got = run(uk.fused_linear_kl_topk, inputs, upstream, *topk, **options)
        topk_fn = base.topk_per_token(*topk, 0.8)
        fn = lambda z: topk_fn(capped(z, softcap))  # noqa: E731
    want = oracle(inputs, fn, reduction, upstream, batch=ODD[0])
    base.assert_matches(got, want, 1e-5, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence_name", list(DIVERGENCES))
@pytest.mark.parametrize("mode", ["exact", "streamed"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reverse_kl_and_jsd(backend, divergence_name, mode, reduction):
    """Reverse KL and the generalised JSD against float64 autograd, with temperature, signed
    token weights, ignored rows; streamed references carry some p = 0 entries for the JSD."""
    gen, seed = generator()
    direction, beta = DIVERGENCES[divergence_name]
    inputs = base.make_inputs(*ODD, gen=gen)
    upstream = base.upstream_for(inputs, reduction)
    options = {"direction": direction, "beta": beta, "temperature": 0.7}
    options.update(reduction=reduction, chunk_size=16, backend=backend)
    if mode == "exact":
        args = (inputs["ref_hidden"], inputs["ref_weight"])
        got = run(uk.fused_linear_kl, inputs, upstream, *args, **options)
        ref_z = base.ref_logits_of(inputs)
    else:
        ref_z = base.ref_logits_of(inputs).bfloat16()
        if beta is not None:  # the JSD is finite where p = 0 (the reverse KL is not)
            ref_z[torch.rand(ref_z.shape, generator=gen) < 0.2] = NEG_INF
        got = run(uk.fused_linear_kl, inputs, upstream, ref_logits=ref_z, **options)
    want = oracle(inputs, per_token_fn(ref_z, 0.7, None, direction, beta), reduction, upstream)
    base.assert_matches(got, want, 1e-5, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none", "batchmean"])
def test_fully_masked_batch_with_options(backend, reduction):
    """No valid row, every option on: zero loss, zero finite gradients, connected to the graph."""
    gen, _ = generator()
    inputs = with_bias(base.make_inputs(*ODD, gen=gen), gen)
    inputs["labels"].fill_(-100)
    upstream = torch.ones(ODD[0]) if reduction == "none" else None
    options = {"softcap": 5.0, "reduction": reduction, "backend": backend}
    ref = (inputs["ref_hidden"], inputs["ref_weight"])
    topk = base.make_topk(base.ref_logits_of(inputs), 8, 1.0, gen)
    for fn, args, extra in (
        (uk.fused_linear_kl, ref, {"beta": 0.5, "ref_bias": inputs["ref_bias"]}),
        (uk.fused_linear_kl, ref, {"direction": "reverse"}),
        (uk.fused_linear_kl_topk, topk, {}),
    ):
        loss, grads = run(fn, inputs, upstream, *args, **extra, **options)
        assert loss.requires_grad and torch.count_nonzero(loss) == 0
        for grad in grads:
            assert torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_undefined_reference_rows_are_nan_with_options(backend):
    """The undefined-reference rule (a NaN loss and gradient row) holds for every divergence
    and with softcap; rows with zero-probability entries stay finite where the divergence is
    (the JSD; the reverse KL is +inf there, so that row is made finite for it)."""
    gen, seed = generator()
    inputs = base.make_inputs(9, 7, 61, gen=gen, ignore_fraction=0.0)
    inputs["token_weight"] = None
    ref_logits, topk = base.undefined_references(gen, 9, 61, 6)
    finite_row_4 = ref_logits.clone()
    finite_row_4[4] = torch.randn(61, generator=gen)
    undefined = torch.tensor([False, True, True, True, False, False, False, False, False])
    upstream = torch.ones(9)
    common = {"reduction": "none", "backend": backend, "chunk_size": 4}
    for fn, args, options in (
        (uk.fused_linear_kl, (), {"ref_logits": ref_logits, "beta": 0.5, "softcap": 4.0}),
        (uk.fused_linear_kl, (), {"ref_logits": finite_row_4, "direction": "reverse"}),
        (uk.fused_linear_kl_topk, topk, {"softcap": 4.0}),
    ):
        loss, (grad_hidden, grad_weight) = run(fn, inputs, upstream, *args, **options, **common)
        assert torch.equal(torch.isnan(loss), undefined), (options, seed)
        assert torch.isfinite(loss[~undefined]).all(), (options, seed)
        assert torch.equal(torch.isnan(grad_hidden).all(1), undefined), (options, seed)
        assert torch.isfinite(grad_hidden[~undefined]).all(), (options, seed)
        assert torch.isnan(grad_weight).all(), (options, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_and_one_are_the_forward_and_reverse_kl(backend):
    gen, seed = generator()
    inputs = base.make_inputs(*ODD, gen=gen)
    args = (inputs["ref_hidden"], inputs["ref_weight"])
    for beta, direction in ((0.0, "forward"), (1.0, "reverse")):
        as_beta = run(uk.fused_linear_kl, inputs, None, *args, beta=beta, backend=backend)
        as_direction = run(
            uk.fused_linear_kl, inputs, None, *args, direction=direction, backend=backend
        )
        base.assert_matches(as_beta, (as_direction[0].detach(), as_direction[1]), 1e-7, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["exact", "topk"])
def test_batchmean_divides_by_the_batch_size(backend, op):
    """``batchmean`` = the sum over ``hidden.shape[0]`` ([B, T, d]: B), as F.kl_div."""
    gen, seed = generator()
    inputs = base.make_inputs(2 * 23, 19, 1013, gen=gen)
    for key in ("hidden", "ref_hidden", "labels", "token_weight"):
        inputs[key] = inputs[key].detach().reshape(2, 23, *inputs[key].shape[1:])
    inputs["hidden"].requires_grad_()
    if op == "exact":
        fn, args = uk.fused_linear_kl, (inputs["ref_hidden"], inputs["ref_weight"])
    else:
        fn = uk.fused_linear_kl_topk
        args = base.make_topk(base.ref_logits_of(inputs), 16, 1.0, gen)
    selection = {"labels": inputs["labels"], "token_weight": inputs["token_weight"]}
    selection["backend"] = backend
    total = fn(inputs["hidden"], inputs["weight"], *args, **selection, reduction="sum")
    batch = fn(inputs["hidden"], inputs["weight"], *args, **selection, reduction="batchmean")
    assert rel_err(batch, total / 2) < 1e-6, seed


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batchmean_equals_torch_kl_div_in_float64(backend):
    gen, _ = generator()
    n, d, vocab = ODD
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64) / d**0.5
    ref_hidden = hidden.detach() + torch.randn(n, d, generator=gen, dtype=torch.float64)
    ours = uk.fused_linear_kl(hidden, weight, ref_hidden, reduction="batchmean", backend=backend)
    theirs = F.kl_div(
        torch.log_softmax(hidden @ weight.t(), -1),
        torch.log_softmax(ref_hidden @ weight.t(), -1),
        log_target=True,
        reduction="batchmean",
    )
    assert rel_err(ours, theirs) < 1e-12
    got, want = (torch.autograd.grad(v, hidden)[0] for v in (ours, theirs))
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(backend, reduction):
    gen, _ = generator()
    inputs = with_bias(base.make_inputs(9, 5, 31, gen=gen, dtype=torch.float64), gen)
    inputs["bias"] = inputs["bias"].detach().double().requires_grad_()
    labels, token_weight = inputs["labels"], inputs["token_weight"].double()
    topk = base.make_topk(base.ref_logits_of(inputs), 6, 0.7, gen)
    common = dict(labels=labels, token_weight=token_weight, temperature=0.7, softcap=2.5)
    common.update(reduction=reduction, chunk_size=4, backend=backend)
    ref = (inputs["ref_hidden"], inputs["ref_weight"])
    ref_bias = inputs["ref_bias"].double()
    calls = [
        lambda h, w, b: uk.fused_linear_kl(h, w, *ref, bias=b, ref_bias=ref_bias, **common),
        lambda h, w, b: uk.fused_linear_kl(h, w, *ref, bias=b, direction="reverse", **common),
        lambda h, w, b: uk.fused_linear_kl(h, w, *ref, bias=b, beta=0.4, **common),
        lambda h, w, b: uk.fused_linear_kl_topk(h, w, *topk, bias=b, **common),
    ]
    for call in calls:
        assert torch.autograd.gradcheck(call, (inputs["hidden"], inputs["weight"], inputs["bias"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_products_in_its_dtype(backend):
    """Under CPU autocast (bf16) the loss is exactly that of the bf16 casts, and the fp32
    weight's gradient arrives in fp32."""
    gen, _ = generator()
    inputs = base.make_inputs(37, 32, 1013, gen=gen)
    hidden, weight = inputs["hidden"], inputs["weight"]
    ref_hidden = inputs["ref_hidden"]
    topk = base.make_topk(base.ref_logits_of(inputs), 8, 1.0, gen)
    for fn in (
        lambda h, w: uk.fused_linear_kl(h, w, ref_hidden, beta=0.5, backend=backend),
        lambda h, w: uk.fused_linear_kl_topk(h, w, *topk, backend=backend),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(hidden, weight)
        cast = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight)]
        assert torch.equal(loss, fn(*cast))
        assert torch.autograd.grad(loss, weight)[0].dtype == torch.float32


class TestBadOptions:
    def setup_method(self):
        gen, _ = generator()
        self.inputs = base.make_inputs(8, 4, 10, gen=gen)
        self.cache = base.make_topk(base.ref_logits_of(self.inputs), 3, 1.0, gen)

    def exact(self, **options):
        args = {"ref_hidden": self.inputs["ref_hidden"], **options}
        return uk.fused_linear_kl(self.inputs["hidden"], self.inputs["weight"], **args)

    @pytest.mark.parametrize(
        ("options", "word"),
        [
            ({"beta": -0.1}, "beta"),
            ({"beta": 1.5}, "beta"),
            ({"beta": "0.5"}, "beta"),
            ({"direction": "backward"}, "direction"),
            ({"direction": "reverse", "beta": 0.5}, "beta"),
            ({"bias": torch.randn(9)}, "bias"),
            ({"ref_bias": torch.randn(9)}, "ref_bias"),
            ({"ref_bias": torch.randn(10, dtype=torch.float64)}, "ref_bias"),
            (
                {"ref_hidden": None, "ref_logits": torch.randn(8, 10), "ref_bias": torch.randn(10)},
                "ref_bias",
            ),
            ({"softcap": 0.0}, "softcap"),
            ({"reduction": "batch_mean"}, "reduction"),
        ],
    )
    def test_value_error_names_argument(self, options, word):
        with pytest.raises(ValueError, match=word):
            self.exact(**options)

    def test_topk_rejects_bad_bias_and_softcap(self):
        hidden, weight = self.inputs["hidden"], self.inputs["weight"]
        with pytest.raises(ValueError, match="bias"):
            uk.fused_linear_kl_topk(hidden, weight, *self.cache, bias=torch.randn(11))
        with pytest.raises(ValueError, match="softcap"):
            uk.fused_linear_kl_topk(hidden, weight, *self.cache, softcap=-2.0)
