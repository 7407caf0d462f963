"""Property-based bad-input suite over the public ops (hypothesis).

Each example starts from a valid call and applies a few random mutations (wrong shapes,
dtypes, devices, label values, option types and values). Whatever comes out, the op must
either raise a ``ValueError`` naming one of its own arguments, or return the float64 oracle's
loss and gradient: no other exception type, no silent mismatch. The budget is bounded
(``max_examples`` per op, small shapes) so that it runs in CI in tens of seconds.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from oracle import available_backends, rel_err

import unlearn_kernels as uk

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKEND_NAMES = [p.values[0] for p in available_backends() if not p.marks]
BUDGET = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NOT_TENSORS = [None, 3, "tensor", [1.0, 2.0]]
BAD_OPTION_VALUES = [0, -1, 0.0, -2.5, float("inf"), float("nan"), True, "1", None, [1]]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8, torch.float32]


def names_an_argument(err: ValueError, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", str(err)) for n in names)


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 2e-5}.get(dtype, 5e-2)


# ---- case construction -------------------------------------------------------------------


def base_case(data, ops_with_ref: bool) -> dict:
    """A valid call's arguments for shapes drawn small and odd."""
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    lead = data.draw(st.sampled_from([(7,), (2, 3), (1,), (0,), (5,)]), label="lead")
    d = data.draw(st.integers(1, 6), label="d")
    vocab = data.draw(st.integers(2, 40), label="V")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), label="dt")
    n = math.prod(lead)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.3] = -100
    case = {
        "gen": gen,
        "vocab": vocab,
        "hidden": torch.randn(*lead, d, generator=gen).to(dtype),
        "weight": (torch.randn(vocab, d, generator=gen) / d**0.5).to(dtype),
        "labels": labels.reshape(lead),
        "token_weight": (torch.rand(n, generator=gen) - 0.3).reshape(lead),
        "options": {
            "ignore_index": -100,
            "reduction": data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
            "chunk_size": data.draw(st.sampled_from([None, 1, 3, 64]), label="chunk"),
            "backend": data.draw(st.sampled_from([None, *BACKEND_NAMES]), label="backend"),
        },
    }
    if ops_with_ref:
        case["ref_logits"] = torch.randn(*lead, vocab, generator=gen) * 2
    return case


def mutate_tensor(data, value: object, label: str) -> object:
    """One structural change to a tensor argument."""
    if not isinstance(value, torch.Tensor) or value.device.type == "meta":
        return torch.zeros(3)
    kind = data.draw(
        st.sampled_from(["not_tensor", "dtype", "shape", "meta", "extra_dim", "empty"]),
        label=label,
    )
    if kind == "not_tensor":
        return data.draw(st.sampled_from(NOT_TENSORS))
    if kind == "dtype":
        return value.to(data.draw(st.sampled_from(DTYPES)))
    if kind == "meta":
        return value.to("meta")
    if kind == "extra_dim":
        return value.unsqueeze(-1)
    if kind == "empty":
        return value.new_zeros(0)
    if value.dim() == 0:
        return value.reshape(1)
    shape = list(value.shape)
    axis = data.draw(st.integers(0, len(shape) - 1))
    shape[axis] = max(shape[axis] + data.draw(st.sampled_from([-1, 1, 2])), 0)
    return torch.zeros(shape, dtype=value.dtype)


def mutate_labels(data, case: dict) -> None:
    labels, vocab = case["labels"], case["vocab"]
    if not isinstance(labels, torch.Tensor) or labels.device.type == "meta":
        return
    kind = data.draw(st.sampled_from(["range", "dtype", "ignore_index", "tensor"]))
    if kind == "range" and labels.numel():
        bad = labels.clone().reshape(-1)
        bad[0] = data.draw(st.sampled_from([vocab, vocab + 7, -1, -101]))
        case["labels"] = bad.reshape(labels.shape)
    elif kind == "dtype":
        case["labels"] = labels.clamp_min(0).to(data.draw(st.sampled_from(LABEL_DTYPES)))
        if data.draw(st.booleans()):
            case["options"]["ignore_index"] = data.draw(st.sampled_from([0, 1, 5]))
    elif kind == "ignore_index":
        case["options"]["ignore_index"] = data.draw(
            st.sampled_from([0, vocab - 1, 300, -(2**40), 1.5, True, "x", None])
        )
    else:
        case["labels"] = mutate_tensor(data, labels, "labels_tensor")


def mutate_option(data, case: dict, names: list[str]) -> None:
    name = data.draw(st.sampled_from(names), label="option")
    bad = {"reduction": ["avg", "", None, 1], "backend": ["gpu", "", 0, "TORCH"]}.get(
        name, BAD_OPTION_VALUES
    )
    case["options"][name] = data.draw(st.sampled_from([*bad, 2]))


def apply_mutations(data, case: dict, tensor_names: list[str], option_names: list[str]) -> None:
    for _ in range(data.draw(st.integers(0, 2), label="n_mutations")):
        target = data.draw(st.sampled_from(["tensor", "labels", "option"]), label="target")
        if target == "tensor":
            name = data.draw(st.sampled_from(tensor_names), label="tensor")
            case[name] = mutate_tensor(data, case.get(name), name)
        elif target == "labels":
            mutate_labels(data, case)
        else:
            mutate_option(data, case, option_names)


# ---- oracles -----------------------------------------------------------------------------


def reduce(per_token, keep, token_weight, reduction):
    if token_weight is not None:
        per_token = per_token * token_weight.reshape(-1).double()
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total / max(int(keep.sum()), 1) if reduction == "mean" else total


def check_against_oracle(loss, hidden, per_token_fn, case, scale_fn) -> None:
    """``loss`` (and ``∂loss/∂hidden``) against float64 autograd of ``per_token_fn``."""
    opts = case["options"]
    n = hidden.shape[:-1].numel()
    if case["labels"] is None:  # KL without labels: every row (token_weight still weighs)
        keep = torch.ones(n, dtype=torch.bool)
    else:
        keep = case["labels"].reshape(-1).long() != opts["ignore_index"]
    h = hidden.detach().double().reshape(-1, hidden.shape[-1]).requires_grad_()
    z = h @ case["weight"].detach().double().t()
    want = reduce(per_token_fn(z), keep, case["token_weight"], opts["reduction"])
    weight = case["token_weight"]
    scale = reduce(
        scale_fn(z.detach()), keep, None if weight is None else weight.abs(), opts["reduction"]
    )
    tol = tolerance(hidden.dtype)
    diff = (loss.detach().double().reshape(-1) - want.detach().reshape(-1)).norm()
    assert torch.isfinite(loss).all(), loss
    assert float(diff) <= tol * max(float(scale.norm()), 1e-30), (loss, want)
    upstream = torch.ones_like(loss) if loss.dim() else None
    (got_grad,) = torch.autograd.grad(loss, hidden, upstream)
    (want_grad,) = torch.autograd.grad(
        want, h, None if upstream is None else upstream.double().reshape(want.shape)
    )
    err = rel_err(got_grad.reshape(want_grad.shape), want_grad)
    assert err < max(tol, 1e-6) * 10, err


def differentiable(hidden: object) -> object:
    """``hidden`` as a leaf that requires grad, when it is a float tensor with data."""
    if (
        isinstance(hidden, torch.Tensor)
        and hidden.is_floating_point()
        and hidden.device.type != "meta"
    ):
        return hidden.detach().requires_grad_()
    return hidden


def lse_scale(z: torch.Tensor) -> torch.Tensor:
    return z.abs().amax(-1) + math.log(z.shape[-1]) + 1.0


def run_checked(fn, names: tuple[str, ...]):
    """``fn()``, or ``None`` when it raised a ``ValueError`` naming one of ``names``."""
    try:
        result = fn()
    except ValueError as err:
        assert names_an_argument(err, names), f"ValueError names no argument: {err}"
        event("refused")
        return None
    event("accepted")
    return result


# ---- the properties ----------------------------------------------------------------------

CE_NAMES = (
    "hidden",
    "weight",
    "labels",
    "token_weight",
    "bias",
    "ignore_index",
    "reduction",
    "softcap",
    "chunk_size",
    "backend",
)


@BUDGET
@given(data=st.data())
def test_cross_entropy_bad_input(data):
    case = base_case(data, ops_with_ref=False)
    case["bias"] = None
    case["options"]["softcap"] = data.draw(st.sampled_from([None, 2.0, 30.0]))
    apply_mutations(
        data,
        case,
        ["hidden", "weight", "token_weight", "bias"],
        ["reduction", "softcap", "chunk_size", "backend"],
    )
    hidden = differentiable(case["hidden"])

    def call():
        return uk.fused_linear_cross_entropy(
            hidden,
            case["weight"],
            case["labels"],
            token_weight=case["token_weight"],
            bias=case["bias"],
            **case["options"],
        )

    loss = run_checked(call, CE_NAMES)
    if loss is None:
        return
    softcap = case["options"]["softcap"]

    def per_token(z):
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        target = case["labels"].reshape(-1).long().clamp(0, z.shape[-1] - 1)  # ignored: any
        return torch.logsumexp(z, -1) - z.gather(1, target[:, None]).squeeze(1)

    check_against_oracle(loss, hidden, per_token, case, lse_scale)


KL_NAMES = (
    "hidden",
    "weight",
    "ref_hidden",
    "ref_weight",
    "ref_logits",
    "labels",
    "token_weight",
    "temperature",
    "ignore_index",
    "reduction",
    "chunk_size",
    "backend",
)


@BUDGET
@given(data=st.data())
def test_kl_bad_input(data):
    case = base_case(data, ops_with_ref=True)
    case["options"]["temperature"] = data.draw(st.sampled_from([1.0, 0.7, 2]))
    if data.draw(st.booleans(), label="exact"):  # ref_hidden with the student's weight
        case["ref_hidden"] = torch.randn(case["hidden"].shape, generator=case["gen"])
        case["ref_logits"] = None
    else:
        case["ref_hidden"] = None
    apply_mutations(
        data,
        case,
        ["hidden", "weight", "ref_hidden", "ref_logits", "token_weight"],
        ["reduction", "temperature", "chunk_size", "backend"],
    )
    hidden = differentiable(case["hidden"])

    def call():
        return uk.fused_linear_kl(
            hidden,
            case["weight"],
            case["ref_hidden"],
            ref_logits=case["ref_logits"],
            labels=case["labels"],
            token_weight=case["token_weight"],
            **case["options"],
        )

    loss = run_checked(call, KL_NAMES)
    if loss is None:
        return
    tau = case["options"]["temperature"]
    if case["ref_hidden"] is not None:
        ref = case["ref_hidden"].double().reshape(-1, hidden.shape[-1])
        ref = ref.to(hidden.dtype).double() @ case["weight"].detach().double().t()
    else:
        ref = case["ref_logits"].double().reshape(-1, case["vocab"])
    log_p = torch.log_softmax(ref / tau, -1)

    def per_token(z):
        return (log_p.exp() * (log_p - torch.log_softmax(z / tau, -1))).sum(-1)

    check_against_oracle(loss, hidden, per_token, case, lambda z: lse_scale(z) + lse_scale(ref))


TOPK_NAMES = (
    "hidden",
    "weight",
    "ref_topk_index",
    "ref_topk_logprob",
    "ref_tail_logprob",
    "labels",
    "token_weight",
    "temperature",
    "ignore_index",
    "reduction",
    "chunk_size",
    "backend",
)


@BUDGET
@given(data=st.data())
def test_kl_topk_bad_input(data):
    case = base_case(data, ops_with_ref=True)
    case["options"]["temperature"] = data.draw(st.sampled_from([1.0, 0.7, 2]))
    k = data.draw(st.integers(1, case["vocab"]), label="k")
    log_p = torch.log_softmax(case["ref_logits"].double(), -1)
    index = log_p.topk(k, -1).indices
    case["ref_topk_index"] = index
    case["ref_topk_logprob"] = log_p.gather(-1, index).float()
    case["ref_tail_logprob"] = log_p.scatter(-1, index, float("-inf")).logsumexp(-1).float()
    if data.draw(st.booleans(), label="pad"):  # zero-padded skipped rows, as to_padded gives
        skip = (case["labels"] == -100) | (case["token_weight"] == 0)
        case["ref_topk_index"] = index.masked_fill(skip[..., None], 0)
    if data.draw(st.booleans(), label="duplicate") and k > 1:
        dup = case["ref_topk_index"].clone().reshape(-1, k)
        if dup.shape[0]:
            dup[0, 1] = dup[0, 0]
        case["ref_topk_index"] = dup.reshape(index.shape)
    apply_mutations(
        data,
        case,
        ["hidden", "weight", "ref_topk_index", "ref_topk_logprob", "ref_tail_logprob"],
        ["reduction", "temperature", "chunk_size", "backend"],
    )
    hidden = differentiable(case["hidden"])

    def call():
        return uk.fused_linear_kl_topk(
            hidden,
            case["weight"],
            case["ref_topk_index"],
            case["ref_topk_logprob"],
            case["ref_tail_logprob"],
            labels=case["labels"],
            token_weight=case["token_weight"],
            **case["options"],
        )

    loss = run_checked(call, TOPK_NAMES)
    if loss is None:
        return
    tau = case["options"]["temperature"]
    idx = case["ref_topk_index"].reshape(-1, k).long().clamp(0, case["vocab"] - 1)
    lp = case["ref_topk_logprob"].reshape(-1, k).double()
    lt = case["ref_tail_logprob"].reshape(-1).double()

    def xlogy(log_a, log_b):
        return torch.where(log_a.exp() > 0, log_a.exp() * (log_a - log_b), 0.0)

    def per_token(z):
        log_q = torch.log_softmax(z / tau, -1)
        loss = xlogy(lp, log_q.gather(-1, idx)).sum(-1)
        if k < z.shape[-1]:
            loss = loss + xlogy(lt, log_q.scatter(-1, idx, float("-inf")).logsumexp(-1))
        return loss

    check_against_oracle(loss, hidden, per_token, case, lambda z: 2 * lse_scale(z))


NGDIFF_NAMES = ("forget_grads", "retain_grads", "out", "eps", "forget_sign", "backend")


@BUDGET
@given(data=st.data())
def test_ngdiff_bad_input(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shapes = data.draw(
        st.lists(st.sampled_from([(3, 4), (5,), (1,), (2, 2, 2), (0,)]), min_size=1, max_size=3)
    )
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    forget = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    retain = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    args = {
        "forget_grads": forget,
        "retain_grads": retain,
        "out": [torch.empty_like(r) for r in retain],
    }
    options = {
        "eps": 1e-12,
        "forget_sign": data.draw(st.sampled_from([-1.0, 1.0])),
        "backend": data.draw(st.sampled_from([None, *BACKEND_NAMES])),
    }
    for _ in range(data.draw(st.integers(0, 2))):
        name = data.draw(st.sampled_from([*args, *options]))
        if name in options:
            options[name] = data.draw(st.sampled_from([*BAD_OPTION_VALUES, "gpu", 2.0, 1e-40]))
        elif data.draw(st.booleans()) and args[name]:
            j = data.draw(st.integers(0, len(args[name]) - 1))
            args[name] = [*args[name]]
            args[name][j] = mutate_tensor(data, args[name][j], name)
        else:
            shorter = args[name][:-1] if isinstance(args[name], list) else []
            args[name] = data.draw(st.sampled_from([[], shorter, "x", None]))
    inputs = {name: args[name] for name in ("forget_grads", "retain_grads")}
    before = {  # out=None writes over retain_grads
        name: [t.clone() if isinstance(t, torch.Tensor) else t for t in v]
        if isinstance(v, list)
        else v
        for name, v in inputs.items()
    }
    result = run_checked(
        lambda: uk.ngdiff_combine(
            args["forget_grads"], args["retain_grads"], args["out"], **options
        ),
        NGDIFF_NAMES,
    )
    if result is None:
        return
    outs = args["out"] if args["out"] is not None else args["retain_grads"]
    flat = {
        name: torch.cat(
            [t.double().reshape(-1) for t in ([v] if isinstance(v, torch.Tensor) else v)]
        )
        for name, v in before.items()
    }
    f, r = flat["forget_grads"], flat["retain_grads"]
    nf, nr = float(f.norm()), float(r.norm())
    eps, sign = options["eps"], options["forget_sign"]
    a = 1.0 / max(nr, eps) if nr > 0 else 0.0
    b = sign / max(nf, eps) if nf > 0 else 0.0
    want = a * r + b * f
    size = (a * r).abs() + (b * f).abs()  # the terms: their sum may cancel
    got = torch.cat([o.double().reshape(-1) for o in outs])
    assert math.isclose(float(result.forget_norm), nf, rel_tol=1e-5, abs_tol=1e-30)
    assert math.isclose(float(result.retain_norm), nr, rel_tol=1e-5, abs_tol=1e-30)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert float((got - want).norm()) <= tol * max(float(size.norm()), 1e-30)


def test_budget_is_bounded():
    assert BUDGET.max_examples <= 100 and BUDGET.deadline is None
