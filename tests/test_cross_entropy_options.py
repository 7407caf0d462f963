"""fused_linear_cross_entropy's options (label smoothing, class weights, z-loss, token scaling,
shift, the structured return, autocast) against the float64 oracle, on every backend."""

from __future__ import annotations

import pytest
import test_cross_entropy as plain
import torch
import torch.nn.functional as F
from oracle import available_backends, ce_oracle, ce_terms, generator, rel_err
from torch import Tensor

import unlearn_kernels as uk
from unlearn_kernels.ops.cross_entropy import CrossEntropyOutput

BACKENDS = available_backends()
CPU_BACKENDS = [b for b in BACKENDS if b.values[0] in ("torch", "cpu")]
ODD = (37, 19, 1013)

#: option sets: each alone, and all together (with softcap)
OPTION_SETS = {
    "smoothing": {"label_smoothing": 0.1},
    "class_weight": {"class_weight": True},
    "smoothing+class_weight": {"label_smoothing": 0.2, "class_weight": True},
    "z_loss": {"lse_square_scale": 0.05},
    "token_scaling": {"token_scaling": True},
    "all": {
        "label_smoothing": 0.1,
        "class_weight": True,
        "lse_square_scale": 1e-2,
        "token_scaling": True,
        "softcap": 6.0,
    },
}


def with_class_weight(options: dict, vocab: int, gen: torch.Generator) -> dict:
    """``class_weight=True`` replaced by fresh weights in [0.2, 2), a few exact zeros."""
    options = dict(options)
    if options.get("class_weight") is True:
        weights = torch.rand(vocab, generator=gen) * 1.8 + 0.2
        weights[:: max(vocab // 7, 1)] = 0.0
        options["class_weight"] = weights
    return options


def loss_size(inputs: dict, reduction: str, options: dict) -> Tensor:
    """The magnitudes a loss is computed from (``Σ_i |w_i| (c_y (|lse| + |z_y|) + ε mean_v
    c_v (|lse| + |z_v|) + c_y s lse²)``, reduced like the loss): fp32 logits carry error
    relative to those, and a signed sum can cancel far below them."""
    terms = ce_terms(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        None,
        inputs["bias"],
        -100,
        "none",
        options.get("softcap"),
    )
    z, lse = terms["z"], terms["lse"]
    labels = inputs["labels"].reshape(-1)
    valid = labels != -100
    safe = labels.clamp_min(0)
    cw = options.get("class_weight")
    c = torch.ones(z.shape[1], dtype=torch.float64) if cw is None else cw.double()
    z_y = z.gather(1, safe[:, None]).squeeze(1)
    size = c[safe] * (lse.abs() + z_y.abs() + options.get("lse_square_scale", 0.0) * lse**2)
    eps = options.get("label_smoothing", 0.0)
    size = size + eps * ((lse.abs()[:, None] + z.abs()) * c).mean(1)
    size = torch.where(valid, size * inputs["token_weight"].reshape(-1).abs(), 0.0)
    if reduction == "none":
        return size
    total = size.sum()
    if reduction == "mean":
        total = total / max(float(c[safe][valid].sum()) if cw is not None else int(valid.sum()), 1)
    return total


def scaled_err(got: Tensor, want: Tensor, size: Tensor) -> float:
    diff = float((got.detach().double().reshape(-1) - want.detach().double().reshape(-1)).norm())
    norm = float(size.norm())
    return diff / norm if norm > 0 else diff


def check_against_oracle(inputs, reduction, options, tol, seed, **call):
    upstream = torch.randn(inputs["labels"].shape) * 3 if reduction == "none" else None
    loss, grads = plain.run_fused(inputs, upstream, reduction=reduction, **options, **call)
    oracle_options = {k: v for k, v in options.items() if k != "softcap"}
    ref_loss, ref_grads = ce_oracle(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        inputs["token_weight"],
        inputs["bias"],
        -100,
        reduction,
        options.get("softcap"),
        upstream,
        **oracle_options,
    )
    if not inputs["weight"].requires_grad:
        ref_grads = (ref_grads[0], None, ref_grads[2])
    errors = {"loss": scaled_err(loss, ref_loss, loss_size(inputs, reduction, options))}
    for name, got, ref in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        errors[name] = rel_err(got, ref)
    assert max(errors.values()) < tol, f"seed={seed} errors={errors}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_options_match_oracle(backend, option_set, reduction):
    """Each option (and all together) with signed token weights, ignored rows, a bias and an
    odd shape; chunks of 16 rows."""
    gen, seed = generator()
    inputs = plain.make_inputs(*ODD, bias=True, gen=gen)
    options = with_class_weight(OPTION_SETS[option_set], ODD[2], gen)
    check_against_oracle(inputs, reduction, options, 1e-5, seed, backend=backend, chunk_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_with_huge_logits(backend, reduction):
    """Logits up to about ±1e4 (exact in fp32: integer inputs) with every option on."""
    gen, seed = generator()
    inputs = plain.make_inputs(*ODD, gen=gen)
    inputs["hidden"] = torch.randint(-200, 201, (37, 19), generator=gen).float().requires_grad_()
    inputs["weight"] = torch.randint(-9, 10, (1013, 19), generator=gen).float().requires_grad_()
    options = with_class_weight(
        {"label_smoothing": 0.1, "class_weight": True, "lse_square_scale": 1e-6}, 1013, gen
    )
    check_against_oracle(inputs, reduction, options, 1e-5, seed, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_torch_cross_entropy_in_float64(backend, reduction, smoothing, weighted):
    """The shared definitions are F.cross_entropy's: same loss and gradients in float64."""
    gen, _ = generator()
    n, d, vocab = ODD
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.3] = -100
    class_weight = torch.rand(vocab, generator=gen, dtype=torch.float64) if weighted else None
    upstream = torch.randn(n, generator=gen, dtype=torch.float64) if reduction == "none" else None
    ours = uk.fused_linear_cross_entropy(
        hidden,
        weight,
        labels,
        label_smoothing=smoothing,
        class_weight=class_weight,
        reduction=reduction,
        chunk_size=8,
        backend=backend,
    )
    theirs = F.cross_entropy(
        hidden @ weight.t(),
        labels,
        weight=class_weight,
        label_smoothing=smoothing,
        reduction=reduction,
    )
    assert rel_err(ours, theirs) < 1e-12
    for got, want in zip(
        torch.autograd.grad(ours, (hidden, weight), upstream),
        torch.autograd.grad(theirs, (hidden, weight), upstream),
        strict=True,
    ):
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_options_no_worse_than_pytorch(backend, dtype):
    """bf16/fp16 with label smoothing and class weights: no worse against the float64 oracle
    than F.cross_entropy on the same low-precision logits."""
    gen, seed = generator()
    inputs = plain.make_inputs(64, 32, 1013, dtype=dtype, gen=gen, signed=False)
    inputs["token_weight"] = None
    class_weight = torch.rand(1013, generator=gen) + 0.1
    options = {"label_smoothing": 0.1, "class_weight": class_weight}
    loss, grads = plain.run_fused(inputs, None, reduction="mean", backend=backend, **options)
    tensors = (inputs["hidden"], inputs["weight"], inputs["labels"])
    ref_loss, ref_grads = ce_oracle(*tensors, None, None, -100, "mean", None, None, **options)
    logits = (inputs["hidden"] @ inputs["weight"].t()).float()
    torch_loss = F.cross_entropy(logits, inputs["labels"], weight=class_weight, label_smoothing=0.1)
    torch_grads = torch.autograd.grad(torch_loss, [inputs["hidden"], inputs["weight"]])
    for ours, theirs, ref in zip(
        (loss, *grads[:2]), (torch_loss, *torch_grads), (ref_loss, *ref_grads[:2]), strict=True
    ):
        assert rel_err(ours, ref) <= rel_err(theirs, ref) * 1.05 + 1e-3, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_structured_return_fields(backend, reduction):
    """Every field of the structured return against the oracle; skipped rows (ignored labels
    and zero token weights) hold 0 / −1."""
    gen, seed = generator()
    inputs = plain.make_inputs(*ODD, bias=True, gen=gen)
    inputs["token_weight"][::5] = 0.0
    options = {"label_smoothing": 0.1, "lse_square_scale": 0.02, "softcap": 8.0}
    out = uk.fused_linear_cross_entropy(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        token_weight=inputs["token_weight"],
        bias=inputs["bias"],
        reduction=reduction,
        return_z_loss=True,
        return_lse=True,
        return_token_accuracy=True,
        return_predicted_tokens=True,
        backend=backend,
        **options,
    )
    assert isinstance(out, CrossEntropyOutput)
    terms = ce_terms(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        inputs["token_weight"],
        inputs["bias"],
        -100,
        reduction,
        options["softcap"],
        label_smoothing=0.1,
        lse_square_scale=0.02,
    )
    size = loss_size(inputs, reduction, options)
    assert scaled_err(out.loss, terms["loss"], size) < 1e-5, seed
    assert scaled_err(out.z_loss, terms["z_loss"], size) < 1e-5, seed
    assert out.z_loss.shape == out.loss.shape and not out.z_loss.requires_grad
    labels, weight = inputs["labels"], inputs["token_weight"]
    selected = (labels != -100) & (weight != 0)
    assert out.lse.shape == labels.shape and not out.lse.requires_grad
    assert rel_err(out.lse[selected], terms["lse"][selected]) < 1e-6, seed
    assert (out.lse[~selected] == 0).all()
    predicted = out.predicted_tokens
    assert predicted.dtype == torch.int64 and predicted.shape == labels.shape
    assert (predicted[~selected] == -1).all()
    z = terms["z"][selected]
    # the argmax of fp32 logits: the oracle's maximum up to fp32 rounding of near-ties
    at_predicted = z.gather(1, predicted[selected][:, None]).squeeze(1)
    assert (at_predicted >= z.amax(1) - 1e-5 * z.abs().amax(1)).all(), seed
    correct = (predicted == labels) & selected
    if reduction == "none":
        assert torch.equal(out.token_accuracy, correct.float())
    else:
        assert out.token_accuracy.shape == ()
        assert float(out.token_accuracy) == pytest.approx(float(correct.sum() / selected.sum()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_tensor_unless_a_field_is_asked(backend):
    gen, _ = generator()
    inputs = plain.make_inputs(*ODD, gen=gen)
    args = (inputs["hidden"], inputs["weight"], inputs["labels"])
    loss = uk.fused_linear_cross_entropy(*args, label_smoothing=0.1, backend=backend)
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    out = uk.fused_linear_cross_entropy(*args, return_lse=True, backend=backend)
    assert out.z_loss is None and out.token_accuracy is None and out.predicted_tokens is None
    assert torch.equal(out.loss, uk.fused_linear_cross_entropy(*args, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift_follows_the_labels_equal_input_ids_convention(backend, reduction):
    """``shift=True`` equals shifting by hand: row t predicts labels[t + 1] with weight
    token_weight[t + 1]; the last position predicts nothing."""
    gen, seed = generator()
    inputs = plain.make_inputs(2 * 23, 19, 1013, bias=True, gen=gen)
    keys = ("hidden", "labels", "token_weight")
    batch = {k: inputs[k].detach().reshape(2, 23, *inputs[k].shape[1:]) for k in keys}
    hidden = batch["hidden"].clone().requires_grad_()
    options = {"reduction": reduction, "bias": inputs["bias"], "backend": backend}
    options["label_smoothing"] = 0.1
    shifted = uk.fused_linear_cross_entropy(
        hidden,
        inputs["weight"],
        batch["labels"],
        token_weight=batch["token_weight"],
        shift=True,
        **options,
    )
    by_hand_hidden = batch["hidden"][:, :-1].clone().requires_grad_()
    by_hand = uk.fused_linear_cross_entropy(
        by_hand_hidden,
        inputs["weight"],
        batch["labels"][:, 1:],
        token_weight=batch["token_weight"][:, 1:],
        **options,
    )
    if reduction == "none":
        assert shifted.shape == (2, 23) and (shifted[:, -1] == 0).all()
        assert rel_err(shifted[:, :-1], by_hand) < 1e-6, seed
        upstream = torch.randn(2, 23)
        grad = torch.autograd.grad(shifted, hidden, upstream)[0]
        want = torch.autograd.grad(by_hand, by_hand_hidden, upstream[:, :-1])[0]
    else:
        assert rel_err(shifted, by_hand) < 1e-6, seed
        grad = torch.autograd.grad(shifted, hidden)[0]
        want = torch.autograd.grad(by_hand, by_hand_hidden)[0]
    assert (grad[:, -1] == 0).all() and rel_err(grad[:, :-1], want) < 1e-6, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fully_ignored_batch_with_options(backend, reduction):
    """No valid row: zero loss and z-loss, zero finite gradients, empty fields."""
    gen, _ = generator()
    inputs = plain.make_inputs(*ODD, bias=True, gen=gen)
    inputs["labels"].fill_(-100)
    options = with_class_weight(OPTION_SETS["all"], ODD[2], gen)
    out = uk.fused_linear_cross_entropy(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        token_weight=inputs["token_weight"],
        bias=inputs["bias"],
        reduction=reduction,
        return_z_loss=True,
        return_lse=True,
        return_token_accuracy=True,
        return_predicted_tokens=True,
        backend=backend,
        **options,
    )
    assert out.loss.requires_grad and torch.count_nonzero(out.loss) == 0
    assert torch.count_nonzero(out.z_loss) == 0 and torch.count_nonzero(out.lse) == 0
    assert torch.count_nonzero(out.token_accuracy) == 0 and (out.predicted_tokens == -1).all()
    upstream = torch.ones(37) if reduction == "none" else None
    wrt = (inputs["hidden"], inputs["weight"], inputs["bias"])
    for grad in torch.autograd.grad(out.loss, wrt, upstream):
        assert torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64_with_options(backend, reduction):
    """Every option but token scaling (whose factor p_y is detached by definition, so finite
    differences do not see the analytic gradient)."""
    gen, _ = generator()
    inputs = plain.make_inputs(9, 5, 31, dtype=torch.float64, bias=True, gen=gen)
    labels, token_weight = inputs["labels"], inputs["token_weight"].double()
    class_weight = torch.rand(31, generator=gen, dtype=torch.float64) + 0.1

    def loss(hidden, weight, bias):
        return uk.fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            token_weight=token_weight,
            bias=bias,
            softcap=3.0,
            label_smoothing=0.2,
            class_weight=class_weight,
            lse_square_scale=0.1,
            reduction=reduction,
            chunk_size=4,
            backend=backend,
        )

    assert torch.autograd.gradcheck(loss, (inputs["hidden"], inputs["weight"], inputs["bias"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_products_in_its_dtype(backend):
    """Under CPU autocast (bf16): fp32 inputs give exactly the fused loss of their bf16 casts,
    gradients reach the fp32 leaves in fp32, and the result is no worse against the float64
    oracle than PyTorch's own autocast computation; bf16 hidden states with an fp32 weight work
    there and raise a ValueError naming autocast outside it."""
    gen, seed = generator()
    inputs = plain.make_inputs(64, 32, 1013, gen=gen, signed=False)
    hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = uk.fused_linear_cross_entropy(hidden, weight, labels, backend=backend)
        torch_loss = F.cross_entropy(hidden @ weight.t(), labels)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert all(g.dtype == torch.float32 for g in grads)
    cast = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight)]
    direct = uk.fused_linear_cross_entropy(*cast, labels, backend=backend)
    assert torch.equal(loss, direct)
    direct_grads = torch.autograd.grad(direct, cast)
    for got, want in zip(grads, direct_grads, strict=True):
        assert torch.equal(got, want.float())
    ref_loss, ref_grads = plain.oracle_for({**inputs, "token_weight": None}, "mean", None)
    torch_grads = torch.autograd.grad(torch_loss, (hidden, weight))
    for ours, theirs, ref in zip(
        (loss, *grads), (torch_loss, *torch_grads), (ref_loss, *ref_grads[:2]), strict=True
    ):
        assert rel_err(ours, ref) <= rel_err(theirs, ref) * 1.05 + 1e-3, seed
    low = hidden.detach().bfloat16().requires_grad_()
    with pytest.raises(ValueError, match="autocast"):
        uk.fused_linear_cross_entropy(low, weight, labels, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = uk.fused_linear_cross_entropy(low, weight, labels, backend=backend)
    assert torch.equal(mixed, direct)
    assert torch.autograd.grad(mixed, weight)[0].dtype == torch.float32


class TestBadOptions:
    def setup_method(self):
        gen, _ = generator()
        self.inputs = plain.make_inputs(8, 4, 10, gen=gen)

    def call(self, **options):
        return uk.fused_linear_cross_entropy(
            self.inputs["hidden"], self.inputs["weight"], self.inputs["labels"], **options
        )

    @pytest.mark.parametrize(
        ("options", "word"),
        [
            ({"class_weight": torch.ones(9)}, "class_weight"),
            ({"class_weight": torch.ones(10, 1)}, "class_weight"),
            ({"class_weight": torch.ones(10, dtype=torch.int64)}, "class_weight"),
            ({"class_weight": -torch.ones(10)}, "class_weight"),
            ({"class_weight": torch.full((10,), float("nan"))}, "class_weight"),
            ({"class_weight": torch.ones(10, device="meta")}, "class_weight"),
            ({"label_smoothing": -0.1}, "label_smoothing"),
            ({"label_smoothing": 1.0}, "label_smoothing"),
            ({"label_smoothing": "0.1"}, "label_smoothing"),
            ({"lse_square_scale": -1e-4}, "lse_square_scale"),
            ({"lse_square_scale": float("inf")}, "lse_square_scale"),
            ({"token_scaling": 1}, "token_scaling"),
            ({"shift": "yes"}, "shift"),
            ({"return_lse": None}, "return_lse"),
            ({"return_z_loss": 0}, "return_z_loss"),
        ],
    )
    def test_value_error_names_argument(self, options, word):
        with pytest.raises(ValueError, match=word):
            self.call(**options)
