"""unlearn_kernels.patch: the patched model's loss and gradients against a float64 oracle of
the model's own ``labels=`` loss on its materialised logits, for every supported family, plain,
PEFT and bitsandbytes; token weights; ``num_items_in_batch``; undo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import FAMILY_CONFIGS, lora, qlora_model, random_pairs, tiny_causal_lm
from oracle import generator, rel_err

import unlearn_kernels as uk
from unlearn_kernels.patching import FAMILIES

pytestmark = pytest.mark.hf
TOL = 1e-5


def test_every_supported_family_has_a_tiny_config():
    assert set(FAMILY_CONFIGS) == set(FAMILIES)


def build(model_type: str, variant: str, seed: int, tmp_path) -> torch.nn.Module:
    """The family's tiny model: plain (every weight trains), LoRA on every linear layer, or
    nf4 decoder layers with LoRA."""
    if variant == "plain":
        return tiny_causal_lm(model_type, seed)
    if variant == "peft":
        return lora(tiny_causal_lm(model_type, seed), targets="all-linear")
    return qlora_model(tmp_path, seed, model_type, targets="all-linear")


def sharpen_head(model: torch.nn.Module) -> None:
    """Scale lm_head so logits reach well beyond the Gemma softcap (±3)."""
    with torch.no_grad():
        uk.hf.output_head(model).weight.mul_(20.0)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable gradient, then cleared; each must exist and be non-zero."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {name}"
            assert p.grad.norm() > 0, f"zero gradient for {name}"
            out[name] = p.grad.clone()
            p.grad = None
    assert out
    return out


def oracle_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None):
    """The model's own shifted loss in float64 on its logits: ``Σ w ℓ / #labelled``."""
    z = logits[:, :-1].double()
    target = labels[:, 1:]
    per_token = F.cross_entropy(z.transpose(1, 2), target, ignore_index=-100, reduction="none")
    if weight is not None:
        per_token = per_token * weight[:, 1:].double()
    return per_token.sum() / (target != -100).sum()


def batch(gen: torch.Generator, n: int):
    data = random_pairs(gen, n)
    labels = data.input_ids.masked_fill(
        torch.arange(data.input_ids.shape[1]) < data.prompt_lengths[:, None], -100
    ).masked_fill(data.attention_mask == 0, -100)
    return data.input_ids, data.attention_mask, labels


@pytest.mark.parametrize("variant", ["plain", "peft", "bnb"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "signed_weights"])
def test_patched_loss_and_gradients_equal_the_float64_oracle(
    model_type, variant, weighted, tmp_path
):
    if variant == "bnb" and weighted:
        pytest.skip("the weighted loss is the same code path; bnb is covered unweighted")
    gen, seed = generator()
    model = build(model_type, variant, seed, tmp_path)
    if FAMILIES[model_type].softcap:
        sharpen_head(model)
    ids, mask, labels = batch(gen, 4)
    weight = None
    if weighted:
        weight = torch.randn(labels.shape, generator=gen)  # mixed signs, any magnitude

    logits = model(input_ids=ids, attention_mask=mask).logits
    expected = oracle_loss(logits, labels, weight)
    expected.backward()
    expected_grads = grads_of(model)
    if not weighted:  # the model's own fp32 loss is the same quantity
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert rel_err(own, expected) < TOL, seed

    with uk.patch(model):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, token_weight=weight)
    assert out.logits is None
    out.loss.backward()
    got_grads = grads_of(model)
    # a signed sum can cancel to near zero: the error is relative to the unsigned sum's size
    size = expected.abs() if weight is None else oracle_loss(logits.detach(), labels, weight.abs())
    error = float((out.loss.detach().double() - expected).abs() / size)
    assert error < TOL, (seed, float(out.loss), float(expected))
    assert got_grads.keys() == expected_grads.keys()
    for name, g in got_grads.items():
        assert rel_err(g, expected_grads[name]) < TOL, (name, seed)


def test_num_items_in_batch_makes_accumulation_one_large_batch():
    gen, seed = generator()
    model = lora(tiny_causal_lm("llama", seed), targets="all-linear")
    ids, mask, labels = batch(gen, 6)
    weight = torch.rand(labels.shape, generator=gen) + 0.5  # one sign: no cancelling sum
    uk.patch(model)
    whole = model(input_ids=ids, attention_mask=mask, labels=labels, token_weight=weight).loss
    whole.backward()
    expected = grads_of(model)
    n_items = int((labels[:, 1:] != -100).sum())
    total = 0.0
    for part in (slice(0, 2), slice(2, 6)):
        loss = model(
            input_ids=ids[part],
            attention_mask=mask[part],
            labels=labels[part],
            token_weight=weight[part],
            num_items_in_batch=torch.tensor(n_items),
        ).loss
        loss.backward()
        total += float(loss.detach())
    assert abs(total - float(whole)) <= TOL * abs(float(whole)), seed
    for name, g in grads_of(model).items():
        assert rel_err(g, expected[name]) < TOL, (name, seed)


def test_undo_and_context_manager_restore_the_original_forward():
    gen, seed = generator()
    model = tiny_causal_lm("llama", seed)
    ids, mask, labels = batch(gen, 3)
    own = model(input_ids=ids, attention_mask=mask, labels=labels)
    with uk.patch(model) as handle:
        assert "forward" in model.__dict__
        patched = model(ids, mask, labels=labels)  # positional arguments bind as before
        assert patched.logits is None
        with pytest.raises(ValueError, match="already patched"):
            uk.patch(model)
    assert not handle.active and "forward" not in model.__dict__
    again = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(again.loss, own.loss) and again.logits is not None
    assert rel_err(patched.loss, own.loss) < TOL
    handle.undo()  # idempotent
    assert "forward" not in model.__dict__

    other = tiny_causal_lm("llama", seed)
    handle = uk.patch(model)
    assert "forward" not in other.__dict__  # instance-level: other models untouched
    assert other(input_ids=ids, labels=labels).logits is not None
    handle.undo()


def test_logits_only_when_asked_and_without_labels():
    gen, seed = generator()
    model = tiny_causal_lm("gemma2", seed)
    sharpen_head(model)
    ids, mask, labels = batch(gen, 3)
    own = model(input_ids=ids, attention_mask=mask).logits
    with uk.patch(model):
        assert rel_err(model(input_ids=ids, attention_mask=mask).logits, own) < TOL
        out = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
        assert rel_err(out.logits, own) < TOL
        last = model(
            input_ids=ids, attention_mask=mask, labels=labels, return_logits=True, logits_to_keep=1
        )
        assert rel_err(last.logits, own[:, -1:]) < TOL
        with pytest.raises(ValueError, match="token_weight needs labels"):
            model(input_ids=ids, token_weight=torch.ones(ids.shape))
        with pytest.raises(ValueError, match="token_weight must have the shape of labels"):
            model(input_ids=ids, labels=labels, token_weight=torch.ones(3))


def test_class_level_patch_by_model_type_and_undo():
    from transformers import LlamaForCausalLM

    gen, seed = generator()
    ids, mask, labels = batch(gen, 2)
    before = LlamaForCausalLM.__dict__["forward"]
    with uk.patch("llama"):
        model = tiny_causal_lm("llama", seed)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert LlamaForCausalLM.__dict__["forward"] is before
    assert rel_err(out.loss, oracle_loss(logits, labels, None)) < TOL, seed


def test_unsupported_architecture_names_itself_and_the_supported_ones():
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"'granite'.*Llama \(llama\).*Gemma-3 \(gemma3_text\)"):
        uk.patch(GraniteForCausalLM(config))
    with pytest.raises(ValueError, match="'cohere'"):
        uk.patch("cohere")


def test_lora_on_lm_head_is_refused_at_patch_time():
    _, seed = generator()
    model = lora(tiny_causal_lm("qwen2", seed), targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="lm_head"):
        uk.patch(model)


def test_a_model_with_accelerate_hooks_is_patched_beneath_them():
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class CountCalls(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountCalls.calls += 1
            return args, kwargs

    gen, seed = generator()
    model = tiny_causal_lm("mistral", seed)
    ids, mask, labels = batch(gen, 2)
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    add_hook_to_module(model, CountCalls())
    with uk.patch(model):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert CountCalls.calls == 1 and out.logits is None
    assert rel_err(out.loss, own) < TOL, seed
    remove_hook_from_module(model)  # accelerate puts _old_forward back as model.forward
    assert model.forward.__func__ is type(model).forward  # the original, not ours


def _trainer_step(model, rows, tmp_path, name, **args):
    """One SGD step of transformers' own Trainer on ``rows``; the trainable tensors after it."""
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(tmp_path / name),
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **args,
    )
    Trainer(model=model, args=arguments, train_dataset=rows).train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_transformers_trainer_keeps_token_weight_and_honours_num_items_in_batch(tmp_path):
    """One batch of 4 and two accumulated micro-batches of 2 (of unequal label counts) take the
    same step: the Trainer's ``num_items_in_batch`` reaches the fused loss; ``token_weight``
    survives the Trainer's column filter (all-zero weights leave the model as it was)."""
    gen, seed = generator()
    ids = torch.randint(4, 97, (4, 12), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[:2, 3:8] = -100  # micro-batch 1 has far fewer labelled tokens than micro-batch 2
    weight = torch.randn(labels.shape, generator=gen)

    def rows(w):
        return [
            {"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": labels[i], "token_weight": w[i]}
            for i in range(4)
        ]  # fmt: skip

    results = {}
    for name, args, w in (
        ("whole", {"per_device_train_batch_size": 4}, weight),
        (
            "accumulated",
            {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
            weight,
        ),
        ("zero", {"per_device_train_batch_size": 4}, torch.zeros_like(weight)),
    ):
        model = lora(tiny_causal_lm("qwen3", seed), targets="all-linear")
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with uk.patch(model):
            results[name] = _trainer_step(model, rows(w), tmp_path, name, **args)
    for n, p in results["whole"].items():
        assert not torch.equal(p, start[n])
        assert rel_err(results["accumulated"][n] - start[n], p - start[n]) < 1e-5, (n, seed)
        assert torch.equal(results["zero"][n], start[n]), n
