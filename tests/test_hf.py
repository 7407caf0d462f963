"""unlearn_kernels.hf: fused response-only loss of HF / PEFT / QLoRA models against the
unfused ``model(input_ids, labels=...)`` path, and the label shift on hand-made examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import lora, qlora_model, random_pairs, tiny_llama, unshifted_labels
from oracle import generator, rel_err

from unlearn_kernels.data import causal_lm_labels, response_mask
from unlearn_kernels.hf import (
    causal_lm_loss,
    check_output_head,
    final_hidden_states,
    frozen_forward,
    output_head,
)

pytestmark = pytest.mark.hf
TOL = 1e-5


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of every trainable parameter; each must exist (a ``None`` fails here)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"no gradient for {name}"
            grads[name] = param.grad.clone()
            param.grad = None
    assert grads, "no trainable parameter"
    return grads


def compare_with_unfused(model: torch.nn.Module, data, seed: int) -> None:
    """Fused mean loss and every trainable gradient equal HF's own loss on masked labels."""
    labels = data.labels()
    fused = causal_lm_loss(model, data.input_ids, data.attention_mask, data.prompt_lengths)
    fused.backward()
    fused_grads = trainable_grads(model)
    unfused = model(
        input_ids=data.input_ids,
        attention_mask=data.attention_mask,
        labels=unshifted_labels(labels),
    ).loss
    unfused.backward()
    unfused_grads = trainable_grads(model)
    assert rel_err(fused, unfused) < TOL, seed
    assert fused_grads.keys() == unfused_grads.keys()
    for name, grad in fused_grads.items():
        assert grad.norm() > 0, name
        assert rel_err(grad, unfused_grads[name]) < TOL, (name, seed)


def test_labels_shift_and_mask_by_hand():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [0, 0, 3, 4, 5, 6], [0, 0, 3, 4, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    prompts = torch.tensor([2, 1, 0])
    assert response_mask(mask, prompts).tolist() == [
        [False, False, True, True, True, False],
        [False, False, False, True, True, True],
        [False, False, True, True, True, True],
    ]
    # Row t predicts token t+1; the first real token of the left-padded, prompt-less example
    # follows a padding row, which carries no loss.
    assert causal_lm_labels(ids, mask, prompts, ignore_index=-1).tolist() == [
        [-1, 7, 8, 9, -1, -1],
        [-1, -1, 4, 5, 6, -1],
        [-1, -1, 4, 5, 6, -1],
    ]
    assert causal_lm_labels(ids[:1]).tolist() == [[6, 7, 8, 9, 0, -100]]


@pytest.mark.parametrize(
    ("mask", "prompts", "argument"),
    [
        (torch.ones(2, 4), [1, 1], "attention_mask"),
        (torch.ones(2, 3, dtype=torch.long), [1, 1], "attention_mask"),
        (torch.ones(2, 4, dtype=torch.long), [1, 1, 1], "prompt_lengths"),
        (torch.ones(2, 4, dtype=torch.long), [5, 1], "prompt_lengths"),
        (torch.ones(2, 4, dtype=torch.long), [-1, 1], "prompt_lengths"),
    ],
)
def test_labels_reject_bad_input(mask, prompts, argument):
    with pytest.raises(ValueError, match=argument):
        causal_lm_labels(torch.ones(2, 4, dtype=torch.long), mask, torch.tensor(prompts))


def test_fused_loss_matches_model_loss_full_finetune():
    gen, seed = generator()
    model = tiny_llama(seed)
    compare_with_unfused(model, random_pairs(gen, 5), seed)


def test_fused_loss_matches_model_loss_peft_lora():
    gen, seed = generator()
    model = lora(tiny_llama(seed))
    compare_with_unfused(model, random_pairs(gen, 5), seed)
    grads_exist = [n for n, p in model.named_parameters() if p.requires_grad]
    assert grads_exist and all("lora_" in n for n in grads_exist)


def test_signed_sequence_weights_and_none_reduction():
    gen, seed = generator()
    model = lora(tiny_llama(seed))
    data = random_pairs(gen, 4)
    signs = torch.tensor([1.0, -1.0, 0.5, -2.0])
    labels = data.labels()
    per_row = causal_lm_loss(
        model,
        data.input_ids,
        data.attention_mask,
        data.prompt_lengths,
        token_weight=signs,
        reduction="none",
    )
    logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    expected = (
        F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        * signs[:, None]
    )
    assert per_row.shape == labels.shape
    assert rel_err(per_row, expected) < TOL, seed
    (per_row.sum() - expected.sum()).abs().backward()  # both paths are differentiable
    trainable_grads(model)
    per_seq = causal_lm_loss(
        model,
        data.input_ids,
        data.attention_mask,
        data.prompt_lengths,
        token_weight=signs,
        reduction="sum",
    )
    per_token = causal_lm_loss(
        model,
        data.input_ids,
        data.attention_mask,
        data.prompt_lengths,
        token_weight=signs[:, None].expand(labels.shape),
        reduction="sum",
    )
    assert rel_err(per_seq, expected.sum()) < TOL and rel_err(per_token, per_seq) < TOL
    with pytest.raises(ValueError, match="token_weight"):
        causal_lm_loss(
            model,
            data.input_ids,
            data.attention_mask,
            data.prompt_lengths,
            token_weight=torch.ones(3),
        )


def test_hidden_states_without_logits_match_output_hidden_states():
    gen, seed = generator()
    model = lora(tiny_llama(seed))
    data = random_pairs(gen, 3)
    hidden = final_hidden_states(model, data.input_ids, data.attention_mask)
    head = output_head(model)
    logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    assert rel_err(head.logits(hidden), logits) < TOL, seed
    assert head.weight is model.get_base_model().lm_head.weight and head.bias is None


def test_gemma2_softcap_is_read_and_applied():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gen, seed = generator()
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=3.0,
    )
    model = lora(Gemma2ForCausalLM(config).train())
    with torch.no_grad():  # make the cap bite: logits well beyond ±3
        model.get_base_model().lm_head.weight.mul_(20.0)
    assert output_head(model).softcap == 3.0
    data = random_pairs(gen, 4)
    check_output_head(model, data.input_ids, data.attention_mask)
    compare_with_unfused(model, data, seed)


def test_unsupported_logit_transform_is_detected():
    from transformers import GraniteConfig, GraniteForCausalLM

    gen, _ = generator()
    config = GraniteConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        logits_scaling=4.0,
    )
    data = random_pairs(gen, 2)
    with pytest.raises(ValueError, match="logit"):
        check_output_head(GraniteForCausalLM(config), data.input_ids, data.attention_mask)


def test_lm_head_adapter_and_quantised_head_are_rejected():
    _, seed = generator()
    model = lora(tiny_llama(seed), targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="lm_head"):
        output_head(model)
    with model.disable_adapter():  # disabled adapters leave the raw weight in charge
        assert output_head(model).weight is model.get_base_model().lm_head.base_layer.weight
    plain = tiny_llama(seed)
    plain.lm_head.weight = torch.nn.Parameter(
        torch.zeros(97, 32, dtype=torch.int8), requires_grad=False
    )
    with pytest.raises(ValueError, match="quantised"):
        output_head(plain)


def test_frozen_forward_restores_modes_and_disables_adapters():
    gen, seed = generator()
    model = lora(tiny_llama(seed))
    data = random_pairs(gen, 2)
    base_logits = None
    with frozen_forward(model, disable_adapters=True):
        assert not model.training and not torch.is_grad_enabled()
        base_logits = model(input_ids=data.input_ids).logits
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=data.input_ids).logits, base_logits)
    assert all(m.training for m in model.modules())
    with (
        pytest.raises(ValueError, match="PeftModel"),
        frozen_forward(model.get_base_model(), disable_adapters=True),
    ):
        pass


def test_qlora_nf4_matches_unfused_with_gradients(tmp_path):
    gen, seed = generator()
    model = qlora_model(tmp_path, seed)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    compare_with_unfused(model, random_pairs(gen, 4), seed)
