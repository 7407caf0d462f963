"""fused_linear_kl and fused_linear_kl_topk against float64 oracles, on every backend
(docs/design.md §5)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from oracle import available_backends, generator, rel_err
from torch import Tensor

import unlearn_kernels as uk
from unlearn_kernels._options import KLRowMath

# The Triton interpreter evaluates both sides of tl.where (e.g. log(0) on padding rows).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

BACKENDS = available_backends()
CPU_BACKENDS = [b for b in BACKENDS if b.values[0] in ("torch", "cpu")]
SHAPES = {"odd": (37, 19, 1013), "round": (64, 32, 512)}
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: on a shared machine, waking a second intra-op thread per product costs far
    more than the product (the C++ parallel path is tested at the epilogue level)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(
    n: int,
    d: int,
    vocab: int,
    *,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
    logit_scale: float = 1.0,
    ignore_fraction: float = 0.3,
    trainable_weight: bool = True,
) -> dict:
    """Student and reference (hidden, weight) with logits of standard deviation ~logit_scale;
    the reference is the student's perturbed, so that KL ≈ 0.5 per token: well above fp32's
    absolute floor of ~1e-7 (a near-zero KL is checked separately, as exactly zero)."""
    hidden = torch.randn(n, d, generator=gen) * logit_scale
    weight = torch.randn(vocab, d, generator=gen) / d**0.5
    ref_hidden = hidden + logit_scale * torch.randn(n, d, generator=gen)
    ref_weight = weight + 0.3 * torch.randn(vocab, d, generator=gen) / d**0.5
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_fraction] = -100
    token_weight = (torch.rand(n, generator=gen) + 0.5) * (
        torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    )
    return {
        "hidden": hidden.to(dtype).requires_grad_(),
        "weight": weight.to(dtype).requires_grad_(trainable_weight),
        "ref_hidden": ref_hidden.to(dtype),
        "ref_weight": ref_weight.to(dtype),
        "labels": labels,
        "token_weight": token_weight,
    }


def ref_logits_of(inputs: dict) -> Tensor:
    return inputs["ref_hidden"].double() @ inputs["ref_weight"].double().t()


def make_topk(ref_logits: Tensor, k: int, temperature: float, gen: torch.Generator):
    """Top-k cache of ``softmax(ref_logits/τ)``: shuffled indices, fp32 log-probs, tail log-mass."""
    log_p = torch.log_softmax(ref_logits.double() / temperature, dim=-1)
    index = log_p.topk(k, dim=-1).indices
    index = index.gather(-1, torch.rand(index.shape, generator=gen).argsort(-1))
    tail = log_p.scatter(-1, index, NEG_INF).logsumexp(-1)
    return index, log_p.gather(-1, index).float(), tail.float()


def reduce(per_token: Tensor, labels, token_weight, reduction: str, ignore_index=-100):
    """Signed, response-only reduction of float64 per-token losses."""
    keep = torch.ones_like(per_token, dtype=torch.bool)
    if labels is not None:
        keep = labels.reshape(per_token.shape) != ignore_index
    if token_weight is not None:
        per_token = per_token * token_weight.reshape(per_token.shape).double()
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "mean":
        total = total / max(int(keep.sum()), 1)
    return total


def xlogy_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def oracle(inputs: dict, per_token_fn, reduction: str, upstream: Tensor | None):
    """Float64 autograd of ``reduce(per_token_fn(student logits))``: ``(loss, (dH, dW), size)``,
    ``size`` the same reduction of ``|w_i KL_i|`` (the scale a signed sum's error is judged by)."""
    hidden = inputs["hidden"].detach().double().requires_grad_()
    weight = inputs["weight"].detach().double().requires_grad_()
    per_token = per_token_fn(hidden @ weight.t())
    labels, token_weight = inputs.get("labels"), inputs.get("token_weight")
    loss = reduce(per_token, labels, token_weight, reduction)
    grads = torch.autograd.grad(
        loss, (hidden, weight), None if upstream is None else upstream.double()
    )
    if not inputs["weight"].requires_grad:
        grads = (grads[0], None)
    size = reduce(
        per_token.abs(), labels, None if token_weight is None else token_weight.abs(), reduction
    )
    return loss.detach(), grads, size.detach()


def exact_per_token(ref_logits: Tensor, temperature: float):
    log_p = torch.log_softmax(ref_logits.double() / temperature, dim=-1)
    return lambda z: xlogy_ratio(log_p, torch.log_softmax(z / temperature, dim=-1)).sum(-1)


def topk_per_token(index: Tensor, logprob: Tensor, tail: Tensor, temperature: float):
    """The approximate loss; ``log q_t`` by a masked logsumexp, tail term dropped if k = V."""

    def fn(z: Tensor) -> Tensor:
        log_q = torch.log_softmax(z / temperature, dim=-1)
        lp, lt = logprob.double(), tail.double()
        loss = xlogy_ratio(lp, log_q.gather(-1, index)).sum(-1)
        if index.shape[-1] < z.shape[-1]:
            log_q_tail = log_q.scatter(-1, index, NEG_INF).logsumexp(-1)
            loss = loss + xlogy_ratio(lt, log_q_tail)
        return loss

    return fn


def run(fn, inputs: dict, upstream: Tensor | None, *args, **kwargs):
    """Loss and (dH, dW) of a fused op."""
    loss = fn(
        inputs["hidden"],
        inputs["weight"],
        *args,
        labels=inputs.get("labels"),
        token_weight=inputs.get("token_weight"),
        **kwargs,
    )
    wrt = [t for t in (inputs["hidden"], inputs["weight"]) if t.requires_grad]
    grads = dict(zip(map(id, wrt), torch.autograd.grad(loss, wrt, upstream), strict=True))
    return loss, (grads.get(id(inputs["hidden"])), grads.get(id(inputs["weight"])))


def assert_matches(got, want, tol: float, seed: int) -> None:
    """Relative errors of loss, dH, dW; the loss's relative to ``max(|loss|, size)``."""
    loss, size = want[0], (want[2] if len(want) > 2 else want[0])
    errors = [
        rel_err(got[0], loss) * float(loss.norm()) / max(float(loss.norm()), float(size.norm()))
    ]
    errors += [rel_err(g, w) for g, w in zip(got[1], want[1], strict=True)]
    assert max(errors) < tol, f"seed={seed} errors(loss, dH, dW)={errors}"


def upstream_for(inputs: dict, reduction: str) -> Tensor | None:
    return torch.randn(inputs["hidden"].shape[:-1]) * 3 if reduction == "none" else None


# ---- exact and streamed KL ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_exact_matches_oracle(backend, shape, reduction, temperature):
    gen, seed = generator()
    inputs = make_inputs(*SHAPES[shape], gen=gen)
    upstream = upstream_for(inputs, reduction)
    got = run(
        uk.fused_linear_kl,
        inputs,
        upstream,
        inputs["ref_hidden"],
        inputs["ref_weight"],
        temperature=temperature,
        reduction=reduction,
        chunk_size=16,
        backend=backend,
    )
    per_token = exact_per_token(ref_logits_of(inputs), temperature)
    assert_matches(got, oracle(inputs, per_token, reduction, upstream), 1e-5, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_streamed_bf16_logits_with_zero_probabilities(backend, reduction):
    """Cached bf16 reference logits, some ``−inf`` (p = 0: contributes 0, never NaN)."""
    gen, seed = generator()
    inputs = make_inputs(37, 19, 1013, gen=gen)
    ref_logits = ref_logits_of(inputs).bfloat16()
    ref_logits[torch.rand(ref_logits.shape, generator=gen) < 0.2] = NEG_INF
    upstream = upstream_for(inputs, reduction)
    got = run(
        uk.fused_linear_kl,
        inputs,
        upstream,
        ref_logits=ref_logits,
        temperature=1.5,
        reduction=reduction,
        chunk_size=8,
        backend=backend,
    )
    per_token = exact_per_token(ref_logits, 1.5)
    assert_matches(got, oracle(inputs, per_token, reduction, upstream), 1e-5, seed)


def test_streamed_from_memory_mapped_safetensors(tmp_path):
    """A safetensors tensor (memory-mapped by ``safe_open``) is read row chunk by row chunk."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen, seed = generator()
    inputs = make_inputs(2 * 19, 19, 1013, gen=gen)
    logits = ref_logits_of(inputs).bfloat16().reshape(2, 19, 1013)
    save_file({"ref_logits": logits}, str(tmp_path / "ref.safetensors"))
    for key in ("hidden", "labels", "token_weight"):
        inputs[key] = inputs[key].detach().reshape(2, 19, *inputs[key].shape[1:])
    inputs["hidden"].requires_grad_()
    with safe_open(str(tmp_path / "ref.safetensors"), "pt") as cache:
        mapped = cache.get_tensor("ref_logits")
        got = run(uk.fused_linear_kl, inputs, None, ref_logits=mapped, chunk_size=7)
    assert got[1][0].shape == (2, 19, 19)
    assert_matches(got, oracle(inputs, exact_per_token(logits, 1.0), "mean", None), 1e-5, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_student_and_reference_give_zero(backend):
    gen, _ = generator()
    inputs = make_inputs(37, 19, 1013, gen=gen, logit_scale=3.0)
    hidden, weight = inputs["hidden"], inputs["weight"]
    loss = uk.fused_linear_kl(
        hidden, weight, hidden.detach(), labels=inputs["labels"], temperature=0.7, backend=backend
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert abs(float(loss)) < 1e-6
    assert all(float(g.abs().max()) < 1e-6 for g in grads)
    index, logprob, tail = make_topk(hidden.detach() @ weight.detach().t(), 50, 0.7, gen)
    loss = uk.fused_linear_kl_topk(
        hidden, weight, index, logprob, tail, temperature=0.7, backend=backend
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert abs(float(loss)) < 1e-6
    assert all(float(g.abs().max()) < 1e-5 for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_huge_logits(backend, reduction):
    """Logits about ±1e4 (exact in fp32: integer inputs, τ a power of two) neither overflow nor
    lose the gradient."""
    gen, seed = generator()
    inputs = make_inputs(37, 19, 1013, gen=gen)
    inputs["hidden"] = torch.randint(-200, 201, (37, 19), generator=gen).float().requires_grad_()
    inputs["weight"] = torch.randint(-9, 10, (1013, 19), generator=gen).float().requires_grad_()
    inputs["ref_hidden"] = torch.randint(-200, 201, (37, 19), generator=gen).float()
    inputs["ref_weight"] = inputs["weight"].detach()
    assert (inputs["hidden"] @ inputs["weight"].t()).abs().max() > 5e3
    upstream = upstream_for(inputs, reduction)
    got = run(
        uk.fused_linear_kl,
        inputs,
        upstream,
        inputs["ref_hidden"],
        reduction=reduction,
        temperature=2.0,
        backend=backend,
    )
    per_token = exact_per_token(ref_logits_of(inputs), 2.0)
    assert_matches(got, oracle(inputs, per_token, reduction, upstream), 1e-5, seed)
    index, logprob, tail = make_topk(ref_logits_of(inputs), 16, 2.0, gen)
    got = run(
        uk.fused_linear_kl_topk,
        inputs,
        upstream,
        index,
        logprob,
        tail,
        reduction=reduction,
        temperature=2.0,
        backend=backend,
    )
    per_token = topk_per_token(index, logprob, tail, 2.0)
    assert_matches(got, oracle(inputs, per_token, reduction, upstream), 1e-5, seed)


# ---- top-k KL ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("k", "temperature"), [(1, 1.0), (32, 0.6), (256, 2.0)])
def test_topk_matches_autograd_of_approximate_loss(backend, shape, reduction, k, temperature):
    gen, seed = generator()
    inputs = make_inputs(*SHAPES[shape], gen=gen)
    index, logprob, tail = make_topk(ref_logits_of(inputs), k, temperature, gen)
    upstream = upstream_for(inputs, reduction)
    got = run(
        uk.fused_linear_kl_topk,
        inputs,
        upstream,
        index,
        logprob,
        tail,
        temperature=temperature,
        reduction=reduction,
        chunk_size=16,
        backend=backend,
    )
    per_token = topk_per_token(index, logprob, tail, temperature)
    assert_matches(got, oracle(inputs, per_token, reduction, upstream), 1e-5, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_with_full_vocabulary_equals_exact(backend):
    """k = V, ``log p_t = −inf``: the approximation is exact (and its empty tail is no NaN)."""
    gen, seed = generator()
    inputs = make_inputs(37, 19, 301, gen=gen)
    index, logprob, tail = make_topk(ref_logits_of(inputs), 301, 0.8, gen)
    assert bool((tail == NEG_INF).all())
    upstream = torch.randn(37)
    options = {"temperature": 0.8, "reduction": "none", "backend": backend}
    topk = run(uk.fused_linear_kl_topk, inputs, upstream, index, logprob, tail, **options)
    exact = run(
        uk.fused_linear_kl, inputs, upstream, inputs["ref_hidden"], inputs["ref_weight"], **options
    )
    assert_matches(topk, exact, 1e-5, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_zero_probability_entries_and_empty_tail_mass(backend):
    """``log p_k = −inf`` entries and ``log p_t = −inf`` (p_t = 0) with a non-empty student tail."""
    gen, seed = generator()
    inputs = make_inputs(37, 19, 1013, gen=gen)
    index, logprob, tail = make_topk(ref_logits_of(inputs), 20, 1.0, gen)
    logprob[:, -3:] = NEG_INF
    logprob = torch.log_softmax(logprob, dim=-1)  # all the mass on the top-k
    tail.fill_(NEG_INF)
    upstream = torch.randn(37)
    got = run(
        uk.fused_linear_kl_topk,
        inputs,
        upstream,
        index,
        logprob,
        tail,
        reduction="none",
        backend=backend,
    )
    per_token = topk_per_token(index, logprob, tail, 1.0)
    assert_matches(got, oracle(inputs, per_token, "none", upstream), 1e-5, seed)


# ---- shared behaviour --------------------------------------------------------------------


def both_ops(inputs: dict, gen: torch.Generator):
    """``(fn, positional args)`` of the exact and the top-k op on ``inputs``."""
    topk = make_topk(ref_logits_of(inputs), 8, 1.0, gen)
    return [
        (uk.fused_linear_kl, (inputs["ref_hidden"], inputs["ref_weight"])),
        (uk.fused_linear_kl_topk, topk),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fully_masked_batch(backend, reduction):
    """No valid row: zero loss, zero finite gradients, still connected to the graph."""
    gen, _ = generator()
    inputs = make_inputs(37, 19, 1013, gen=gen)
    inputs["labels"].fill_(-100)
    upstream = torch.ones(37) if reduction == "none" else None
    for fn, args in both_ops(inputs, gen):
        loss, grads = run(fn, inputs, upstream, *args, reduction=reduction, backend=backend)
        assert loss.requires_grad and torch.count_nonzero(loss) == 0
        for grad in grads:
            assert grad is not None and torch.isfinite(grad).all()
            assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_input_frozen_weight_no_labels(backend):
    """``[B, T, d]`` input, frozen shared weight, every row selected when there are no labels."""
    gen, seed = generator()
    inputs = make_inputs(2 * 23, 19, 1013, gen=gen, trainable_weight=False)
    for key in ("hidden", "ref_hidden"):
        inputs[key] = inputs[key].detach().reshape(2, 23, 19)
    inputs["hidden"].requires_grad_()
    inputs["labels"] = inputs["token_weight"] = None
    inputs["ref_weight"] = inputs["weight"]
    upstream = torch.randn(2, 23)
    for fn, args in both_ops(inputs, gen):
        got = run(fn, inputs, None, *args, backend=backend)
        assert got[1][1] is None and got[1][0].shape == (2, 23, 19)
        per_token = (
            exact_per_token(ref_logits_of(inputs), 1.0)
            if fn is uk.fused_linear_kl
            else topk_per_token(*args, 1.0)
        )
        assert_matches(got, oracle(inputs, per_token, "mean", None), 1e-5, seed)
        got = run(fn, inputs, upstream, *args, reduction="none", backend=backend)
        assert_matches(got, oracle(inputs, per_token, "none", upstream), 1e-5, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_pytorch(backend):
    """bf16 error against the float64 oracle is at most PyTorch's own bf16 computation's."""
    gen, seed = generator()
    inputs = make_inputs(64, 32, 1013, gen=gen, dtype=torch.bfloat16)
    per_token = exact_per_token(ref_logits_of(inputs), 1.0)
    want = oracle(inputs, per_token, "mean", None)
    ours = run(
        uk.fused_linear_kl,
        inputs,
        None,
        inputs["ref_hidden"],
        inputs["ref_weight"],
        backend=backend,
    )
    hidden, weight = inputs["hidden"], inputs["weight"]
    log_q = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    log_p = torch.log_softmax((inputs["ref_hidden"] @ inputs["ref_weight"].t()).float(), dim=-1)
    per = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    keep = inputs["labels"] != -100
    theirs_loss = (per * inputs["token_weight"] * keep).sum() / keep.sum()
    theirs = (theirs_loss, torch.autograd.grad(theirs_loss, (hidden, weight)))
    for got, torch_value, ref in zip(
        (ours[0], *ours[1]), (theirs[0], *theirs[1]), (want[0], *want[1]), strict=True
    ):
        assert rel_err(got, ref) <= rel_err(torch_value, ref) * 1.05 + 1e-3, seed


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(backend, reduction):
    gen, _ = generator()
    inputs = make_inputs(9, 5, 31, gen=gen, dtype=torch.float64)
    labels, token_weight = inputs["labels"], inputs["token_weight"].double()
    ref = (inputs["ref_hidden"], inputs["ref_weight"])
    topk = make_topk(ref_logits_of(inputs), 6, 0.7, gen)
    options = {
        "labels": labels,
        "token_weight": token_weight,
        "temperature": 0.7,
        "reduction": reduction,
        "chunk_size": 4,
        "backend": backend,
    }

    def exact(hidden, weight):
        return uk.fused_linear_kl(hidden, weight, *ref, **options)

    def approximate(hidden, weight):
        return uk.fused_linear_kl_topk(hidden, weight, *topk, **options)

    for fn in (exact, approximate):
        assert torch.autograd.gradcheck(fn, (inputs["hidden"], inputs["weight"]))


def test_backends_agree_at_epilogue_level():
    """Every backend's epilogues equal the torch specification on one raw chunk of 64 rows
    (several parallel tasks), k up to 256."""
    gen, seed = generator()
    torch.set_num_threads(2)
    torch_backend = importlib.import_module("unlearn_kernels.backends.torch_backend")
    x = torch.randn(64, 2053, generator=gen) * 4
    x_ref = torch.randn(64, 2053, generator=gen) * 4
    index, logprob, tail = make_topk(x_ref, 256, 1.3, gen)
    scale = torch.randn(64, generator=gen)
    for param in BACKENDS[1:]:
        if param.marks and param.marks[0].name == "skip":
            continue
        other = uk.backends.get_backend(param.values[0], x.device)
        for spec, got in (
            (torch_backend.kl_forward, other.kl_forward),
            (torch_backend.kl_topk_forward, other.kl_topk_forward),
        ):
            args = (x_ref,) if spec is torch_backend.kl_forward else (index, logprob, tail)
            want_x, got_x = x.clone(), x.clone()
            math = KLRowMath(temperature=1.3)
            want = spec(want_x, *args, scale, math)
            outs = got(got_x, *args, scale, math)
            for a, b in zip((*outs, got_x), (*want, want_x), strict=True):
                assert rel_err(a, b) < 1e-5, (param.values[0], spec.__name__, seed)
            backward = getattr(other, spec.__name__.replace("forward", "backward"))
            got_x = x.clone()
            backward(got_x, *args, *want[1:], scale, math)
            assert rel_err(got_x, want_x) < 1e-5, (param.values[0], spec.__name__, seed)


def undefined_references(gen: torch.Generator, n: int, vocab: int, k: int):
    """Reference logits and a top-k cache with rows that are no distribution: rows 1-3 of the
    logits hold a NaN, are all −inf, hold a +inf; rows 1-3 of the cache hold a NaN log-prob, a
    +inf tail, a +inf log-prob. Row 4 has legitimate −inf (zero-probability) entries."""
    ref_logits = torch.randn(n, vocab, generator=gen) * 2
    ref_logits[1, 3] = float("nan")
    ref_logits[2] = NEG_INF
    ref_logits[3, 0] = float("inf")
    ref_logits[4, :5] = NEG_INF
    index, logprob, tail = make_topk(ref_logits.nan_to_num(0.0, 0.0, 0.0), k, 1.0, gen)
    logprob[1, 2] = float("nan")
    tail[2] = float("inf")
    logprob[3, 0] = float("inf")
    logprob[4, 1:] = NEG_INF
    return ref_logits, (index, logprob, tail)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_undefined_reference_rows_are_nan_on_every_backend(reduction):
    """A reference row that is no distribution gives that row a NaN loss and an all-NaN
    gradient row, identically on every backend; the other rows are unaffected."""
    gen, seed = generator()
    inputs = make_inputs(9, 7, 61, gen=gen, ignore_fraction=0.0)
    inputs["token_weight"] = None
    ref_logits, topk = undefined_references(gen, 9, 61, 6)
    undefined = torch.tensor([False, True, True, True, False, False, False, False, False])
    results = {}
    for param in BACKENDS:
        if param.marks and param.marks[0].name == "skip":
            continue
        backend = param.values[0]
        upstream = torch.ones(9) if reduction == "none" else None
        results[backend] = [
            run(uk.fused_linear_kl, inputs, upstream, ref_logits=ref_logits, **options)
            for options in [{"reduction": reduction, "backend": backend, "chunk_size": 4}]
        ] + [
            run(
                uk.fused_linear_kl_topk,
                inputs,
                upstream,
                *topk,
                reduction=reduction,
                backend=backend,
                chunk_size=4,
            )
        ]
    for backend, per_op in results.items():
        for loss, (grad_hidden, grad_weight) in per_op:
            if reduction == "none":
                assert torch.equal(torch.isnan(loss), undefined), (backend, seed)
            else:
                assert torch.isnan(loss), (backend, seed)
            assert torch.equal(torch.isnan(grad_hidden).all(1), undefined), (backend, seed)
            assert torch.isfinite(grad_hidden[~undefined]).all(), (backend, seed)
            assert torch.isnan(grad_weight).all(), (backend, seed)
    reference = results["torch"]
    for backend, per_op in results.items():
        for (loss, grads), (want_loss, want_grads) in zip(per_op, reference, strict=True):
            if reduction == "none":
                assert rel_err(loss[~undefined], want_loss[~undefined]) < 1e-5, (backend, seed)
            assert rel_err(grads[0][~undefined], want_grads[0][~undefined]) < 1e-5, seed


def test_undefined_reference_is_a_value_error_when_checking(monkeypatch):
    gen, _ = generator()
    inputs = make_inputs(9, 7, 61, gen=gen, ignore_fraction=0.0)
    ref_logits, (index, logprob, tail) = undefined_references(gen, 9, 61, 6)
    monkeypatch.setenv("UNLEARN_KERNELS_CHECK_FINITE", "1")
    hidden, weight = inputs["hidden"], inputs["weight"]

    def exact(logits, labels=None):
        return uk.fused_linear_kl(hidden, weight, ref_logits=logits, labels=labels)

    def topk(lp, lt, labels=None):
        return uk.fused_linear_kl_topk(hidden, weight, index, lp, lt, labels=labels)

    only = lambda row: torch.where(torch.arange(9) == row, 0, -100)  # noqa: E731
    with pytest.raises(ValueError, match="ref_logits holds 1 NaN or"):
        exact(ref_logits, only(1))
    with pytest.raises(ValueError, match="ref_logits row 2 is −inf everywhere"):
        exact(ref_logits, only(2))
    with pytest.raises(ValueError, match="ref_logits holds 1 NaN or"):
        exact(ref_logits, only(3))
    assert torch.isfinite(exact(ref_logits, only(4)))  # −inf entries are zero probabilities
    with pytest.raises(ValueError, match="ref_topk_logprob holds 1 NaN"):
        topk(logprob, tail, only(1))
    with pytest.raises(ValueError, match="ref_tail_logprob holds 1 NaN"):
        topk(logprob, tail, only(2))
    with pytest.raises(ValueError, match="ref_topk_logprob holds 1 NaN"):
        topk(logprob, tail, only(3))
    assert torch.isfinite(topk(logprob, tail, only(4)))
    assert torch.isfinite(exact(ref_logits, only(0)))  # skipped rows are not read
    with pytest.raises(ValueError, match="ref_hidden holds 1 non-finite"):
        ref_hidden = inputs["ref_hidden"].clone()
        ref_hidden[0, 0] = float("nan")
        uk.fused_linear_kl(hidden, weight, ref_hidden)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_topk_from_padded_cache_layout(backend, reduction):
    """``[B, T, k]`` tensors zero-padded on ignored rows (as ``ReferenceBatch.to_padded``
    returns them: index 0 repeated, out-of-vocabulary too) go in as they are: skipped rows are
    not validated, and the result is that of the packed rows."""
    gen, seed = generator()
    inputs = make_inputs(2 * 17, 19, 301, gen=gen)
    index, logprob, tail = make_topk(ref_logits_of(inputs), 12, 1.0, gen)
    skipped = (inputs["labels"] == -100) | (inputs["token_weight"] == 0)
    index[skipped], logprob[skipped], tail[skipped] = 0, 0.0, 0.0
    index[skipped.nonzero()[:1, 0]] = 10**6  # never read
    upstream = upstream_for(inputs, reduction)
    got = run(
        uk.fused_linear_kl_topk,
        inputs,
        upstream,
        index,
        logprob,
        tail,
        reduction=reduction,
        backend=backend,
    )
    per_token = topk_per_token(index.clamp(0, 300), logprob, tail, 1.0)
    assert_matches(got, oracle(inputs, per_token, reduction, upstream), 1e-5, seed)
    padded = {
        key: inputs[key].detach().reshape(2, 17, *inputs[key].shape[1:])
        for key in ("hidden", "labels", "token_weight")
    }
    padded["hidden"].requires_grad_()
    loss = uk.fused_linear_kl_topk(
        padded["hidden"],
        inputs["weight"],
        index.reshape(2, 17, 12),
        logprob.reshape(2, 17, 12),
        tail.reshape(2, 17),
        labels=padded["labels"],
        token_weight=padded["token_weight"],
        reduction=reduction,
        backend=backend,
    )
    assert rel_err(loss.reshape(got[0].shape), got[0]) < 1e-6, seed


class TestBadInput:
    def setup_method(self):
        gen, _ = generator()
        self.inputs = make_inputs(8, 4, 10, gen=gen)
        self.cache = make_topk(ref_logits_of(self.inputs), 3, 1.0, gen)

    def exact(self, **override):
        args = {"ref_hidden": self.inputs["ref_hidden"], "labels": self.inputs["labels"]}
        args.update(override)
        return uk.fused_linear_kl(self.inputs["hidden"], self.inputs["weight"], **args)

    def topk(self, index=None, logprob=None, tail=None, **override):
        args = [
            a if a is not None else b
            for a, b in zip((index, logprob, tail), self.cache, strict=True)
        ]
        return uk.fused_linear_kl_topk(
            self.inputs["hidden"], self.inputs["weight"], *args, **override
        )

    @pytest.mark.parametrize(
        ("override", "word"),
        [
            ({"ref_hidden": torch.randn(8, 5)}, "ref_hidden"),
            ({"ref_hidden": None}, "ref_hidden"),
            ({"ref_logits": torch.randn(8, 10)}, "ref_hidden"),
            ({"ref_weight": torch.randn(9, 4)}, "ref_weight"),
            ({"ref_weight": torch.randn(10, 4, dtype=torch.float64)}, "ref_weight"),
            ({"ref_hidden": None, "ref_logits": torch.randn(8, 11)}, "ref_logits"),
            ({"ref_hidden": None, "ref_logits": torch.ones(8, 10, dtype=torch.long)}, "ref_logits"),
            ({"labels": torch.full((8,), 10)}, "labels"),
            ({"token_weight": torch.ones(7)}, "token_weight"),
            ({"temperature": 0.0}, "temperature"),
            ({"temperature": float("inf")}, "temperature"),
            ({"reduction": "avg"}, "reduction"),
            ({"chunk_size": -1}, "chunk_size"),
            ({"backend": "gpu"}, "backend"),
            ({"ref_hidden": None, "ref_logits": torch.randn(8, 10, device="meta")}, "ref_logits"),
            ({"ref_hidden": torch.randn(8, 4, device="meta")}, "ref_hidden"),
            ({"labels": torch.randint(0, 10, (8,), dtype=torch.uint8)}, "ignore_index"),
            ({"temperature": "1"}, "temperature"),
            ({"temperature": True}, "temperature"),
            ({"chunk_size": True}, "chunk_size"),
            ({"backend": ""}, "backend"),
        ],
    )
    def test_exact_value_error_names_argument(self, override, word):
        with pytest.raises(ValueError, match=word):
            self.exact(**override)

    def test_non_finite_reference_named_when_checking(self, monkeypatch):
        ref_hidden = torch.randn(8, 4)
        ref_hidden[2, 1] = float("inf")
        monkeypatch.setenv("UNLEARN_KERNELS_CHECK_FINITE", "1")
        with pytest.raises(ValueError, match="ref_hidden holds 1 non-finite"):
            self.exact(ref_hidden=ref_hidden)

    @pytest.mark.parametrize(
        ("override", "word"),
        [
            ({"index": torch.zeros(8, 3, dtype=torch.long)}, "distinct"),
            ({"index": torch.full((8, 3), 10)}, "ref_topk_index"),
            ({"index": torch.zeros(8, 0, dtype=torch.long)}, "ref_topk_index"),
            ({"index": torch.zeros(8, 3)}, "ref_topk_index"),
            ({"logprob": torch.zeros(8, 4)}, "ref_topk_logprob"),
            ({"tail": torch.zeros(8, 1)}, "ref_tail_logprob"),
            ({"temperature": -1.0}, "temperature"),
        ],
    )
    def test_topk_value_error_names_argument(self, override, word):
        with pytest.raises(ValueError, match=word):
            self.topk(**override)

    def test_shared_failures_name_hidden(self):
        meta = {k: v.to("meta") for k, v in self.inputs.items()}
        for fn, args in (
            (uk.fused_linear_kl, (meta["ref_hidden"],)),
            (uk.fused_linear_kl_topk, tuple(t.to("meta") for t in self.cache)),
        ):
            with pytest.raises(ValueError, match="hidden is on the meta device"):
                fn(meta["hidden"], meta["weight"], *args, labels=meta["labels"])
        empty = torch.randn(8, 0)
        with pytest.raises(ValueError, match="hidden must have d >= 1"):
            uk.fused_linear_kl(empty, torch.randn(10, 0), empty)
        with pytest.raises(ValueError, match="hidden must have d >= 1"):
            uk.fused_linear_kl_topk(empty, torch.randn(10, 0), *self.cache)
        double = {k: v.detach().double() for k, v in self.inputs.items() if k != "labels"}
        with pytest.raises(ValueError, match="hidden is float64, which backend='triton'"):
            uk.fused_linear_kl(
                double["hidden"], double["weight"], double["ref_hidden"], backend="triton"
            )
        with pytest.raises(ValueError, match="hidden is float64, which backend='triton'"):
            uk.fused_linear_kl_topk(
                double["hidden"], double["weight"], *self.cache, backend="triton"
            )
