"""Each method's loss terms and LoRA gradients against the same objective written naively on
materialised logits in float64 (docs/methods.md), on every backend.

The fused side runs the fp32 model through ``Method.terms`` over two micro-batches (so the
step-total normalisation is exercised) with the reference read from a real cache; the oracle
runs a float64 copy of the model, takes the reference from the same model with its adapters
disabled (not from the cache) and writes each objective out from its formula.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from hf_helpers import lora, random_pairs, tiny_llama
from oracle import available_backends, generator, rel_err

from unlearn_kernels.data.unlearn import MicroBatch, StepTotals, TokenBatch, with_responses
from unlearn_kernels.methods import METHODS, LogitLosses, ResponseLosses, get_method
from unlearn_kernels.methods.base import OBJECTIVE
from unlearn_kernels.train.ngdiff import TaskGradients
from unlearn_kernels.train.reference_cache import (
    CacheSettings,
    ReferenceCache,
    build_reference_cache,
)

pytestmark = pytest.mark.hf
TOPK = 8

# (method, its params, reference kind)
CASES = [
    ("ga", {}, None),
    ("graddiff", {"gamma": 0.7, "alpha": 1.3}, None),
    ("graddiff", {"retain_loss": "kl", "alpha": 0.6}, "hidden"),
    ("kl", {"gamma": 1.2, "alpha": 0.8}, "hidden"),
    ("kl", {}, "topk"),
    ("yao", {}, "hidden"),
    ("yao", {"eps1": 0.3, "eps2": 0.9, "eps3": 1.7}, "topk"),
    ("npo", {"beta": 0.7, "alpha": 0.5}, None),
    ("simnpo", {"beta": 2.5, "delta": 0.4, "gamma": 0.3}, None),
    ("ngdiff", {}, None),
]


# ---- the naive objectives ----------------------------------------------------------------


def token_nll(model, batch: TokenBatch) -> torch.Tensor:
    """``[B, T]`` −log p(label) from full logits, 0 on ignored rows."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits, dim=-1)
    valid = batch.labels != -100
    picked = logp.gather(-1, batch.labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(valid, -picked, torch.zeros_like(picked))


def token_kl(model, batch: TokenBatch, kind: str) -> torch.Tensor:
    """Per response row ``KL(p_ref ‖ p_θ)``; the reference is the model without adapters.
    ``kind="topk"``: docs/design.md §2's compressed KL over the reference's top-k and its tail."""
    valid = batch.labels != -100
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with model.disable_adapter(), torch.no_grad():
        log_p = torch.log_softmax(model(**inputs).logits[valid], dim=-1)
    log_q = torch.log_softmax(model(**inputs).logits[valid], dim=-1)
    if kind == "hidden":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    top = log_p.topk(TOPK, dim=-1).indices
    in_k = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, top, True)
    p, q = log_p.exp(), log_q.exp()
    p_t, q_t = (p * ~in_k).sum(-1), (q * ~in_k).sum(-1)
    kl_k = torch.where(in_k, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    return kl_k + p_t * (p_t.log() - q_t.log())


def naive_objective(model, name: str, params, batches, kind: str | None) -> dict[str, torch.Tensor]:
    """The method's terms (and ``objective`` or its two tasks) over all micro-batches."""

    def mean_nll(split: str) -> torch.Tensor:
        total = sum(token_nll(model, getattr(b, split)).sum() for b in batches)
        return total / sum(getattr(b, split).n_tokens for b in batches)

    def mean_kl() -> torch.Tensor:
        total = sum(token_kl(model, b.retain, kind).sum() for b in batches)
        return total / sum(b.retain.n_tokens for b in batches)

    def forget_sequences() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nll = torch.cat([token_nll(model, b.forget).sum(1) for b in batches])
        with model.disable_adapter(), torch.no_grad():
            ref = torch.cat([token_nll(model, b.forget).sum(1) for b in batches])
        lengths = torch.cat([(b.forget.labels != -100).sum(1) for b in batches])
        return nll, ref, lengths

    p = params
    if name == "ga":
        t = {"forget_nll": mean_nll("forget")}
        t[OBJECTIVE] = -t["forget_nll"]
    elif name == "graddiff":
        retain = ("retain_kl", mean_kl()) if p.retain_loss == "kl" else ("retain_nll", None)
        t = {"forget_nll": mean_nll("forget")}
        t[retain[0]] = retain[1] if retain[1] is not None else mean_nll("retain")
        t[OBJECTIVE] = -p.gamma * t["forget_nll"] + p.alpha * t[retain[0]]
    elif name == "kl":
        t = {"forget_nll": mean_nll("forget"), "retain_kl": mean_kl()}
        t[OBJECTIVE] = -p.gamma * t["forget_nll"] + p.alpha * t["retain_kl"]
    elif name == "yao":
        t = {
            "forget_nll": mean_nll("forget"),
            "mismatch_nll": mean_nll("mismatch"),
            "retain_kl": mean_kl(),
        }
        t[OBJECTIVE] = (
            -p.eps1 * t["forget_nll"] + p.eps2 * t["mismatch_nll"] + p.eps3 * t["retain_kl"]
        )
    elif name == "npo":
        nll, ref_nll, _ = forget_sequences()
        log_ratio = -nll + ref_nll
        t = {"npo": (2 / p.beta) * torch.log1p(torch.exp(p.beta * log_ratio)).mean()}
        t["retain_nll"] = mean_nll("retain")
        t[OBJECTIVE] = p.gamma * t["npo"] + p.alpha * t["retain_nll"]
    elif name == "simnpo":
        nll, _, lengths = forget_sequences()
        inner = -(p.beta / lengths) * (-nll) - p.delta
        t = {"simnpo": -(2 / p.beta) * torch.log(torch.sigmoid(inner)).mean()}
        t["retain_nll"] = mean_nll("retain")
        t[OBJECTIVE] = p.gamma * t["simnpo"] + p.alpha * t["retain_nll"]
    elif name == "ngdiff":
        t = {"forget_nll": mean_nll("forget"), "retain_nll": mean_nll("retain")}
        t["forget"], t["retain"] = t["forget_nll"], t["retain_nll"]
    else:
        raise AssertionError(name)
    return t


# ---- fixtures ----------------------------------------------------------------------------


def tiny_gemma2(seed: int):
    """A 2-layer Gemma-2 (final logit softcap 3, tied embeddings) in train mode."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=3.0,
    )
    return Gemma2ForCausalLM(config).train()


def setup_case(tmp_path, gen, kind: str | None, needs, family: str = "llama"):
    """A fp32 LoRA model, its fp64 copy, and two micro-batches with cached reference rows
    (the cache built from the base model: the adapters are disabled for it)."""
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    base = tiny_llama(seed) if family == "llama" else tiny_gemma2(seed)
    with torch.no_grad():  # logits of order 1 and adapters far from zero: KL(ref ‖ θ) ≈ 1
        base.lm_head.weight.mul_(10.0)
        model = lora(base)
        for name, q in model.named_parameters():
            if "lora_B" in name:
                q.mul_(30.0)
    model64 = copy.deepcopy(model).double()
    forget, retain = random_pairs(gen, 7), random_pairs(gen, 9)
    caches = {}
    if needs.retain_reference:
        settings = CacheSettings(
            topk=TOPK if kind == "topk" else 0,
            store_hidden=kind == "hidden",
            store_label_logprob=False,
        )
        build_reference_cache(model, retain, tmp_path / "retain", settings)
        caches["retain"] = ReferenceCache(tmp_path / "retain", model=model, data=retain)
    if needs.forget_logprob:
        settings = CacheSettings(topk=0, store_hidden=False, store_label_logprob=True)
        build_reference_cache(model, forget, tmp_path / "forget", settings)
        caches["forget"] = ReferenceCache(tmp_path / "forget", model=model, data=forget)

    def batch(data, split, index):
        b = TokenBatch.of(data, index)
        return replace(b, reference=caches[split].batch(index)) if split in caches else b

    batches = []
    for f_index, r_index in (([3, 0, 5], [8, 1, 4, 2]), ([6, 1, 2], [0, 7, 3, 5])):
        mismatch = with_responses(forget, f_index, retain, r_index[:3], None)
        batches.append(
            MicroBatch(
                batch(forget, "forget", f_index),
                batch(retain, "retain", r_index),
                TokenBatch(mismatch.input_ids, mismatch.attention_mask, mismatch.labels(), f_index),
            )
        )
    return model, model64, batches


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            grads[name] = p.grad.detach().clone()
            p.grad = None
    return grads


def run_fused(method, model, task, batches, totals) -> dict[str, float]:
    values: dict[str, float] = {}
    for batch in batches:
        for term in method.terms(model, task, batch, totals):
            assert term.task == task
            term.loss.backward()
            values[term.name] = values.get(term.name, 0.0) + term.value
    return values


# ---- tests -------------------------------------------------------------------------------


def test_every_method_is_covered():
    assert {case[0] for case in CASES} == set(METHODS)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize(("name", "params", "kind"), CASES)
def test_terms_and_lora_grads_match_naive_fp64(tmp_path, backend, name, params, kind):
    gen, seed = generator()
    cls = get_method(name)
    p = cls.Params(**params)
    method = cls(p, ResponseLosses(backend=backend))
    model, model64, batches = setup_case(tmp_path, gen, kind, method.needs())
    totals = StepTotals.of(batches)
    batches64 = [
        MicroBatch(
            *(
                None if b is None else replace(b, reference=None)
                for b in (mb.forget, mb.retain, mb.mismatch)
            )
        )
        for mb in batches
    ]
    oracle = naive_objective(model64, name, p, batches64, kind)
    for task in method.tasks:
        values = run_fused(method, model, task, batches, totals)
        grads = lora_grads(model)
        expected = torch.autograd.grad(
            oracle[task], [q for q in model64.parameters() if q.requires_grad], retain_graph=True
        )
        for term, value in values.items():
            assert rel_err(torch.tensor(value), oracle[term]) < 2e-5, (term, value, seed)
        names = [n for n, q in model64.named_parameters() if q.requires_grad]
        assert set(grads) == set(names)
        for n, g in zip(names, expected, strict=True):
            assert g.norm() > 0, (n, seed)
            assert rel_err(grads[n], g) < 1e-4, (n, task, seed)


SOFTCAP_CASES = [("kl", {}, "hidden", "gemma2"), ("yao", {}, "topk", "gemma2")]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize(("name", "params", "kind", "family"), SOFTCAP_CASES)
def test_softcapped_head_matches_naive_fp64(tmp_path, backend, name, params, kind, family):
    """Gemma-2's final-logit softcap reaches the KL's student and reference logits."""
    gen, seed = generator()
    cls = get_method(name)
    p = cls.Params(**params)
    method = cls(p, ResponseLosses(backend=backend))
    model, model64, batches = setup_case(tmp_path, gen, kind, method.needs(), family)
    totals = StepTotals.of(batches)
    oracle = naive_objective(model64, name, p, batches, kind)
    values = run_fused(method, model, OBJECTIVE, batches, totals)
    grads = lora_grads(model)
    names = [n for n, q in model64.named_parameters() if q.requires_grad]
    expected = torch.autograd.grad(
        oracle[OBJECTIVE], [q for q in model64.parameters() if q.requires_grad]
    )
    for term, value in values.items():
        assert rel_err(torch.tensor(value), oracle[term]) < 2e-5, (term, value, seed)
    for n, g in zip(names, expected, strict=True):
        assert rel_err(grads[n], g) < 1e-4, (n, seed)


@pytest.mark.parametrize(
    ("name", "params", "kind", "family"),
    [(*case, "llama") for case in CASES] + SOFTCAP_CASES,
)
def test_logit_losses_give_the_fused_objective(tmp_path, name, params, kind, family):
    """The unfused path (the model's own logits, ``labels=`` loss) computes the same terms."""
    gen, seed = generator()
    cls = get_method(name)
    p = cls.Params(**params)
    fused, unfused = cls(p, ResponseLosses()), cls(p, LogitLosses())
    model, _, batches = setup_case(tmp_path, gen, kind, fused.needs(), family)
    totals = StepTotals.of(batches)
    for task in fused.tasks:
        a = run_fused(fused, model, task, batches, totals)
        ga = lora_grads(model)
        b = run_fused(unfused, model, task, batches, totals)
        gb = lora_grads(model)
        assert a.keys() == b.keys()
        for term in a:
            assert abs(a[term] - b[term]) <= 1e-5 * max(1.0, abs(b[term])), (term, seed)
        for n in ga:
            assert rel_err(ga[n], gb[n]) < 1e-4, (n, seed)


def test_ngdiff_direction_is_the_normalised_difference(tmp_path):
    """After both tasks' backward, ``.grad`` is ``g_R/‖g_R‖ − g_F/‖g_F‖`` of the fp64 oracle."""
    gen, seed = generator()
    cls = get_method("ngdiff")
    method = cls(cls.Params())
    model, model64, batches = setup_case(tmp_path, gen, None, method.needs())
    totals = StepTotals.of(batches)
    params = [q for q in model.parameters() if q.requires_grad]
    grads = TaskGradients(params)
    for task in method.tasks:
        grads.accumulate(task)
        run_fused(method, model, task, batches, totals)
    grads.combine()
    oracle = naive_objective(model64, "ngdiff", method.params, batches, None)
    leaves = [q for q in model64.parameters() if q.requires_grad]
    g_f = torch.autograd.grad(oracle["forget"], leaves, retain_graph=True)
    g_r = torch.autograd.grad(oracle["retain"], leaves)
    norm_f = torch.sqrt(sum((g * g).sum() for g in g_f))
    norm_r = torch.sqrt(sum((g * g).sum() for g in g_r))
    direction = torch.cat(
        [(r / norm_r - f / norm_f).reshape(-1) for f, r in zip(g_f, g_r, strict=True)]
    )
    got = torch.cat([q.grad.reshape(-1) for q in params])
    assert rel_err(got, direction) < 1e-4, seed
