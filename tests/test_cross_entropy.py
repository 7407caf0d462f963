"""fused_linear_cross_entropy against the float64 oracle, on every backend (docs/design.md §5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import available_backends, ce_oracle, generator, rel_err

import unlearn_kernels as uk

BACKENDS = available_backends()
SHAPES = {"odd": (37, 19, 1013), "round": (64, 32, 512)}


def make_inputs(
    n: int,
    d: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    logit_scale: float = 1.0,
    ignore_fraction: float = 0.3,
    signed: bool = True,
    bias: bool = False,
    trainable_weight: bool = True,
    gen: torch.Generator,
) -> dict:
    """Random inputs whose logits have standard deviation about ``logit_scale``."""
    hidden = torch.randn(n, d, generator=gen) * logit_scale
    weight = torch.randn(vocab, d, generator=gen) / d**0.5
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_fraction] = -100
    token_weight = torch.rand(n, generator=gen) + 0.5
    if signed:
        token_weight *= torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    return {
        "hidden": hidden.to(dtype).requires_grad_(),
        "weight": weight.to(dtype).requires_grad_(trainable_weight),
        "labels": labels,
        "token_weight": token_weight,
        "bias": (torch.randn(vocab, generator=gen) * logit_scale).to(dtype).requires_grad_()
        if bias
        else None,
    }


def run_fused(inputs: dict, upstream: torch.Tensor | None = None, **options):
    """The fused loss and its gradients for (hidden, weight, bias)."""
    loss = uk.fused_linear_cross_entropy(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        token_weight=inputs["token_weight"],
        bias=inputs["bias"],
        **options,
    )
    wrt = [t for t in (inputs["hidden"], inputs["weight"], inputs["bias"]) if t is not None]
    wrt = [t for t in wrt if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt, grad_outputs=upstream)
    by_input = dict(zip(map(id, wrt), grads, strict=True))
    named = [by_input.get(id(t)) for t in (inputs["hidden"], inputs["weight"], inputs["bias"])]
    return loss, named


def oracle_for(inputs: dict, reduction: str, softcap: float | None, upstream=None):
    loss, grads = ce_oracle(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        inputs["token_weight"],
        inputs["bias"],
        -100,
        reduction,
        softcap,
        upstream,
    )
    if not inputs["weight"].requires_grad:
        grads = (grads[0], None, grads[2])
    return loss, grads


def loss_err(loss, ref_loss, inputs, reduction, softcap=None) -> float:
    """Loss error relative to the magnitudes it is computed from, ``Σ_i |w_i| (|lse_i| +
    |z_{i,y_i}|)``: a signed sum can cancel to near zero, and so can ``ℓ_i = lse_i − z_{i,y_i}``
    itself when the label's logit dominates; fp32 logits carry error relative to those sizes."""
    z = inputs["hidden"].detach().double().reshape(-1, inputs["weight"].shape[1])
    z = z @ inputs["weight"].detach().double().t()
    if inputs["bias"] is not None:
        z = z + inputs["bias"].detach().double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    labels = inputs["labels"].reshape(-1)
    valid = labels != -100
    z_label = z.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    size = (z.logsumexp(1).abs() + z_label.abs()) * inputs["token_weight"].reshape(-1).abs()
    size = torch.where(valid, size, 0.0)
    if reduction == "mean":
        size = size.sum() / max(int(valid.sum()), 1)
    elif reduction == "sum":
        size = size.sum()
    norm = float(size.norm())
    diff = float((loss.detach().double().reshape(-1) - ref_loss.detach().reshape(-1)).norm())
    return diff / norm if norm > 0 else diff


def assert_close_to_oracle(inputs, reduction, softcap, tol, seed, **options):
    upstream = None
    if reduction == "none":
        upstream = torch.randn(inputs["labels"].shape) * 3
    loss, grads = run_fused(inputs, upstream, reduction=reduction, softcap=softcap, **options)
    ref_loss, ref_grads = oracle_for(inputs, reduction, softcap, upstream)
    errors = {"loss": loss_err(loss, ref_loss, inputs, reduction, softcap)}
    for name, got, ref in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        errors[name] = rel_err(got, ref)
    assert max(errors.values()) < tol, f"seed={seed} errors={errors}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_fp32_matches_oracle(backend, shape, reduction, softcap):
    gen, seed = generator()
    inputs = make_inputs(*SHAPES[shape], bias=softcap is None, gen=gen)
    assert_close_to_oracle(inputs, reduction, softcap, 1e-5, seed, backend=backend, chunk_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_huge_logits(backend, reduction):
    """Logits up to about ±1e4 must neither overflow nor lose the gradient.

    Integer hidden states and weights make every fp32 logit exact, so the test measures the
    epilogue rather than the rounding of a fp32 matmul near a tie.
    """
    gen, seed = generator()
    inputs = make_inputs(37, 19, 1013, gen=gen)
    hidden = torch.randint(-200, 201, (37, 19), generator=gen).float()
    weight = torch.randint(-9, 10, (1013, 19), generator=gen).float()
    inputs["hidden"], inputs["weight"] = hidden.requires_grad_(), weight.requires_grad_()
    assert (hidden @ weight.t()).abs().max() > 5e3
    assert_close_to_oracle(inputs, reduction, None, 1e-5, seed, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_3d_input(backend):
    gen, seed = generator()
    inputs = make_inputs(2 * 23, 19, 1013, trainable_weight=False, gen=gen)
    for key in ("hidden", "labels", "token_weight"):
        inputs[key] = inputs[key].detach().reshape(2, 23, *inputs[key].shape[1:])
    inputs["hidden"].requires_grad_()
    loss, grads = run_fused(inputs, backend=backend, reduction="mean")
    assert grads[1] is None
    ref_loss, ref_grads = oracle_for(inputs, "mean", None)
    assert loss_err(loss, ref_loss, inputs, "mean") < 1e-5, seed
    assert grads[0].shape == (2, 23, 19)
    assert rel_err(grads[0], ref_grads[0]) < 1e-5, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fully_ignored_batch(backend, reduction):
    """No valid row: zero loss, zero finite gradients, still connected to the graph."""
    gen, _ = generator()
    inputs = make_inputs(37, 19, 1013, bias=True, gen=gen)
    inputs["labels"].fill_(-100)
    loss, grads = run_fused(
        inputs,
        torch.ones(37) if reduction == "none" else None,
        backend=backend,
        reduction=reduction,
    )
    assert loss.requires_grad
    assert torch.count_nonzero(loss) == 0
    for grad in grads:
        assert grad is not None and torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_token_weights_skip_rows_but_count_for_mean(backend):
    gen, seed = generator()
    inputs = make_inputs(37, 19, 1013, gen=gen)
    inputs["token_weight"][::2] = 0.0
    assert_close_to_oracle(inputs, "mean", None, 1e-5, seed, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_saved_gradient(backend):
    """``sum``/``mean`` keep the forward's gradient; backward scales it by grad_output."""
    gen, _ = generator()
    inputs = make_inputs(37, 19, 1013, gen=gen)
    loss = uk.fused_linear_cross_entropy(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        token_weight=inputs["token_weight"],
        backend=backend,
    )
    (grad_once,) = torch.autograd.grad(loss, inputs["hidden"], retain_graph=True)
    (grad_scaled,) = torch.autograd.grad(loss * -2.5, inputs["hidden"])
    assert rel_err(grad_scaled, -2.5 * grad_once) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_chunk_size_does_not_change_result(backend, chunk_size):
    gen, seed = generator()
    inputs = make_inputs(37, 19, 1013, gen=gen)
    assert_close_to_oracle(inputs, "sum", None, 1e-5, seed, backend=backend, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(backend, dtype):
    """bf16/fp16 error against the float64 oracle is at most PyTorch's own in that dtype."""
    gen, seed = generator()
    inputs = make_inputs(64, 32, 1013, dtype=dtype, gen=gen, signed=False)
    loss, grads = run_fused(inputs, backend=backend, reduction="mean")
    ref_loss, ref_grads = oracle_for(inputs, "mean", None)
    logits = inputs["hidden"] @ inputs["weight"].t()
    torch_loss = F.cross_entropy(logits.float(), inputs["labels"], reduction="none")
    torch_loss = (torch_loss * inputs["token_weight"]).sum() / (inputs["labels"] != -100).sum()
    torch_grads = torch.autograd.grad(torch_loss, [inputs["hidden"], inputs["weight"]])
    for ours, theirs, ref in zip(
        (loss, *grads[:2]), (torch_loss, *torch_grads), (ref_loss, *ref_grads[:2]), strict=True
    ):
        # 1e-3 of slack: both sit at the dtype's rounding floor there.
        assert rel_err(ours, ref) <= rel_err(theirs, ref) * 1.05 + 1e-3, seed


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("torch", "cpu")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(backend, reduction):
    gen, _ = generator()
    inputs = make_inputs(9, 5, 31, dtype=torch.float64, bias=True, gen=gen)
    labels, token_weight = inputs["labels"], inputs["token_weight"].double()

    def loss(hidden, weight, bias):
        return uk.fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            token_weight=token_weight,
            bias=bias,
            softcap=3.0,
            reduction=reduction,
            chunk_size=4,
            backend=backend,
        )

    assert torch.autograd.gradcheck(loss, (inputs["hidden"], inputs["weight"], inputs["bias"]))


def test_backends_agree():
    """Every available backend gives the torch reference's loss and gradients."""
    gen, seed = generator()
    inputs = make_inputs(37, 19, 1013, bias=True, gen=gen)
    upstream = torch.randn(37)
    reference = run_fused(inputs, upstream, backend="torch", reduction="none", softcap=6.0)
    for param in BACKENDS[1:]:
        if param.marks and param.marks[0].name == "skip":
            continue
        other = run_fused(inputs, upstream, backend=param.values[0], reduction="none", softcap=6.0)
        assert rel_err(other[0], reference[0]) < 1e-6, (param.values[0], seed)
        for got, ref in zip(other[1], reference[1], strict=True):
            assert rel_err(got, ref) < 1e-6, (param.values[0], seed)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 24),
    vocab=st.integers(2, 300),
    ignore_fraction=st.floats(0.0, 1.0),
    signed=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    chunk_size=st.one_of(st.none(), st.integers(1, 17)),
    backend=st.sampled_from([p.values[0] for p in BACKENDS if p.values[0] != "triton"]),
)
def test_property_random_shapes(
    n, d, vocab, ignore_fraction, signed, reduction, chunk_size, backend
):
    gen, seed = generator()
    inputs = make_inputs(
        n, d, vocab, ignore_fraction=ignore_fraction, signed=signed, bias=True, gen=gen
    )
    if backend == "cpu" and not uk.backends.cpu_extension_available():
        return
    upstream = torch.randn(n) if reduction == "none" else None
    loss, grads = run_fused(
        inputs, upstream, reduction=reduction, backend=backend, chunk_size=chunk_size
    )
    ref_loss, ref_grads = oracle_for(inputs, reduction, None, upstream)
    # Absolute floor for the gradients: sums of many terms that cancel have a tiny ‖ref‖.
    scale = 1e-5
    assert loss_err(loss, ref_loss, inputs, reduction) < scale, seed
    for got, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(got, ref) < scale or float((got - ref).abs().max()) < 1e-6, seed


class TestBadInput:
    def setup_method(self):
        gen, _ = generator()
        self.inputs = make_inputs(8, 4, 10, gen=gen)

    def call(self, **override):
        args = {**self.inputs, **override}
        return uk.fused_linear_cross_entropy(
            args["hidden"],
            args["weight"],
            args["labels"],
            token_weight=args["token_weight"],
            bias=args.get("bias"),
            **{k: v for k, v in override.items() if k not in self.inputs},
        )

    @pytest.mark.parametrize(
        ("override", "word"),
        [
            ({"weight": torch.randn(10, 5)}, "weight"),
            ({"hidden": torch.randn(8)}, "hidden"),
            ({"labels": torch.randint(0, 10, (7,))}, "labels"),
            ({"labels": torch.full((8,), 10)}, "labels"),
            ({"labels": torch.full((8,), -3)}, "labels"),
            ({"labels": torch.zeros(8)}, "labels"),
            ({"weight": torch.randn(10, 4, dtype=torch.float64)}, "weight"),
            ({"weight": torch.randn(0, 4)}, "weight"),
            ({"token_weight": torch.ones(8, 1)}, "token_weight"),
            ({"token_weight": torch.ones(8, dtype=torch.int64)}, "token_weight"),
            ({"bias": torch.randn(9)}, "bias"),
            ({"reduction": "avg"}, "reduction"),
            ({"chunk_size": 0}, "chunk_size"),
            ({"softcap": -1.0}, "softcap"),
            ({"backend": "cuda"}, "backend"),
            ({"weight": torch.randn(10, 4, device="meta")}, "weight"),
            ({"labels": torch.randint(0, 10, (8,), dtype=torch.uint8)}, "ignore_index"),
            (
                {"labels": torch.randint(0, 10, (8,), dtype=torch.int8), "ignore_index": 200},
                "ignore_index",
            ),
            ({"ignore_index": 1.5}, "ignore_index"),
            ({"softcap": "3"}, "softcap"),
            ({"softcap": True}, "softcap"),
            ({"chunk_size": True}, "chunk_size"),
            ({"reduction": None}, "reduction"),
            ({"backend": ""}, "backend"),
        ],
    )
    def test_value_error_names_argument(self, override, word):
        with pytest.raises(ValueError, match=word):
            self.call(**override)

    @pytest.mark.parametrize("name", ["hidden", "weight", "token_weight"])
    def test_non_finite_input_named_when_checking(self, monkeypatch, name):
        bad = self.inputs[name].detach().clone()
        bad.view(-1)[3] = float("nan")
        self.call(**{name: bad})  # off by default: no error, no read of the inputs
        monkeypatch.setenv("UNLEARN_KERNELS_CHECK_FINITE", "1")
        with pytest.raises(ValueError, match=f"{name} holds 1 non-finite"):
            self.call(**{name: bad})
        assert torch.isfinite(self.call())

    def test_shared_failures_name_hidden(self):
        meta = {k: v.to("meta") for k, v in self.inputs.items() if v is not None}
        with pytest.raises(ValueError, match="hidden is on the meta device"):
            uk.fused_linear_cross_entropy(meta["hidden"], meta["weight"], meta["labels"])
        with pytest.raises(ValueError, match="hidden must have d >= 1"):
            uk.fused_linear_cross_entropy(
                torch.randn(8, 0), torch.randn(10, 0), self.inputs["labels"]
            )
        double = self.inputs["hidden"].detach().double()
        with pytest.raises(ValueError, match="hidden is float64, which backend='triton'"):
            uk.fused_linear_cross_entropy(
                double, double.new_ones(10, 4), self.inputs["labels"], backend="triton"
            )

    def test_ignore_index_is_allowed(self):
        labels = self.inputs["labels"].clone()
        labels[0] = -100
        assert torch.isfinite(self.call(labels=labels))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_label_dtypes_compare_in_int64(backend, dtype):
    """uint8 label 156 is a real token, not a wrapped −100: with an ignore_index the dtype
    holds, narrow labels give the int64 result, on every backend and in the KL ops' row
    selection too."""
    gen, seed = generator()
    vocab = 200 if dtype != torch.int8 else 120
    inputs = make_inputs(9, 5, vocab, gen=gen)
    wide = torch.tensor([156, 3, 7, 100, 0, 99, 119, 1, 2]) % vocab
    ignore = 99
    wide[5] = ignore
    inputs["labels"] = wide
    want = run_fused(inputs, reduction="sum", ignore_index=ignore, backend=backend)
    inputs["labels"] = wide.to(dtype)
    got = run_fused(inputs, reduction="sum", ignore_index=ignore, backend=backend)
    assert rel_err(got[0], want[0]) < 1e-6, seed
    for g, w in zip(got[1], want[1], strict=True):
        assert rel_err(g, w) < 1e-6, seed
    assert float(got[1][0][0].abs().sum()) > 0  # row 0 (label 156 in uint8) carries a loss
    ref_hidden = torch.randn(9, 5, generator=gen)
    h, w = inputs["hidden"], inputs["weight"]
    kl = [
        uk.fused_linear_kl(h, w, ref_hidden, labels=labels, ignore_index=ignore, backend=backend)
        for labels in (wide, wide.to(dtype))
    ]
    assert rel_err(kl[1], kl[0]) < 1e-6, seed
    if dtype == torch.uint8:  # the default −100 is no uint8 value: refused, not wrapped to 156
        with pytest.raises(ValueError, match=r"ignore_index=-100 is no torch\.uint8 value"):
            uk.fused_linear_cross_entropy(h, w, wide.to(dtype), backend=backend)


def test_backend_override_by_environment(monkeypatch):
    monkeypatch.setenv("UNLEARN_KERNELS_BACKEND", "torch")
    assert uk.backend_name(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("UNLEARN_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend"):
        uk.backend_name(None, torch.device("cpu"))
