"""The nn.Module fronts equal their functionals, validate options at construction, and carry
the functionals' parameter documentation."""

from __future__ import annotations

import inspect

import pytest
import test_cross_entropy as ce
import test_kl as kl
import torch
from oracle import available_backends, generator, rel_err
from torch import Tensor, nn

import unlearn_kernels as uk
from unlearn_kernels.losses import _sections, stamp_docs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

BACKENDS = available_backends()
MODULES = [
    (uk.FusedLinearCrossEntropyLoss, [uk.fused_linear_cross_entropy]),
    (uk.FusedLinearKLLoss, [uk.fused_linear_kl]),
    (uk.FusedLinearKLTopkLoss, [uk.fused_linear_kl_topk, uk.fused_linear_kl]),
]


def same(module_out, functional_out) -> None:
    if isinstance(functional_out, Tensor):
        assert torch.equal(module_out, functional_out)
        return
    for got, want in zip(module_out, functional_out, strict=True):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_module_equals_functional(backend):
    gen, _ = generator()
    inputs = ce.make_inputs(37, 19, 1013, bias=True, gen=gen)
    class_weight = torch.rand(1013, generator=gen) + 0.1
    options = dict(
        label_smoothing=0.1,
        lse_square_scale=1e-3,
        reduction="sum",
        return_z_loss=True,
        return_token_accuracy=True,
        backend=backend,
    )
    module = uk.FusedLinearCrossEntropyLoss(class_weight=class_weight, **options)
    args = (inputs["hidden"], inputs["weight"], inputs["labels"])
    got = module(*args, inputs["token_weight"], inputs["bias"])
    want = uk.fused_linear_cross_entropy(
        *args,
        token_weight=inputs["token_weight"],
        bias=inputs["bias"],
        class_weight=class_weight,
        **options,
    )
    same(got, want)
    grads = torch.autograd.grad(got.loss, (inputs["hidden"], inputs["weight"], inputs["bias"]))
    wants = torch.autograd.grad(want.loss, (inputs["hidden"], inputs["weight"], inputs["bias"]))
    for g, w in zip(grads, wants, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_modules_equal_functionals(backend):
    gen, _ = generator()
    inputs = kl.make_inputs(37, 19, 1013, gen=gen)
    selection = dict(labels=inputs["labels"], token_weight=inputs["token_weight"])
    options = dict(beta=0.4, temperature=0.8, softcap=6.0, reduction="batchmean")
    module = uk.FusedLinearKLLoss(backend=backend, **options)
    hidden, weight = inputs["hidden"], inputs["weight"]
    got = module(hidden, weight, inputs["ref_hidden"], inputs["ref_weight"], **selection)
    ref = (inputs["ref_hidden"], inputs["ref_weight"])
    want = uk.fused_linear_kl(hidden, weight, *ref, backend=backend, **selection, **options)
    same(got, want)
    topk = kl.make_topk(kl.ref_logits_of(inputs), 16, 0.8, gen)
    module = uk.FusedLinearKLTopkLoss(temperature=0.8, softcap=6.0, backend=backend)
    got = module(hidden, weight, *topk, **selection)
    want = uk.fused_linear_kl_topk(
        hidden, weight, *topk, temperature=0.8, softcap=6.0, backend=backend, **selection
    )
    same(got, want)
    assert rel_err(*torch.autograd.grad(got, hidden), *torch.autograd.grad(want, hidden)) == 0


def test_class_weight_is_a_buffer():
    module = uk.FusedLinearCrossEntropyLoss(class_weight=torch.rand(10))
    assert "class_weight" in module.state_dict()
    assert module.double().class_weight.dtype == torch.float64
    assert uk.FusedLinearCrossEntropyLoss().class_weight is None


@pytest.mark.parametrize(
    ("cls", "options", "word"),
    [
        (uk.FusedLinearCrossEntropyLoss, {"label_smoothing": 1.0}, "label_smoothing"),
        (uk.FusedLinearCrossEntropyLoss, {"reduction": "batchmean"}, "reduction"),
        (uk.FusedLinearCrossEntropyLoss, {"class_weight": -torch.ones(4)}, "class_weight"),
        (uk.FusedLinearCrossEntropyLoss, {"lse_square_scale": -1.0}, "lse_square_scale"),
        (uk.FusedLinearCrossEntropyLoss, {"return_lse": 1}, "return_lse"),
        (uk.FusedLinearCrossEntropyLoss, {"chunk_size": 0}, "chunk_size"),
        (uk.FusedLinearKLLoss, {"beta": 2.0}, "beta"),
        (uk.FusedLinearKLLoss, {"direction": "sideways"}, "direction"),
        (uk.FusedLinearKLLoss, {"temperature": 0.0}, "temperature"),
        (uk.FusedLinearKLTopkLoss, {"softcap": -1.0}, "softcap"),
        (uk.FusedLinearKLTopkLoss, {"reduction": "avg"}, "reduction"),
    ],
)
def test_options_are_validated_at_construction(cls, options, word):
    with pytest.raises(ValueError, match=word):
        cls(**options)


@pytest.mark.parametrize(("cls", "functionals"), MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_docs_are_the_functionals(cls, functionals):
    """Every constructor and forward parameter is documented with the functional's own text."""
    docs: dict[str, str] = {}
    for functional in reversed(functionals):
        docs.update(_sections(functional)[0])
    for method, doc in ((cls.__init__, cls.__doc__), (cls.forward, cls.forward.__doc__)):
        stamped = _sections(type("Doc", (), {"__doc__": doc}))[0]
        for name in inspect.signature(method).parameters:
            if name != "self":
                assert stamped[name] == docs[name], (cls.__name__, name)
    assert "Returns:" in cls.forward.__doc__


def test_stamping_an_undocumented_parameter_fails():
    def functional(x: Tensor) -> Tensor:
        """Identity.

        Args:
            x: a tensor.
        """
        return x

    class Loss(nn.Module):
        """A loss."""

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            """The loss."""
            return x

    with pytest.raises(ValueError, match="y"):
        stamp_docs(functional)(Loss)
