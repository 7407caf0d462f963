"""Tiny Hugging Face models, data and tokenizers built locally (no hub access)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from unlearn_kernels.data.formats import TokenizedPairs

VOCAB = 97
WORDS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(VOCAB - 4)]


def tiny_llama(seed: int, *, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A 2-layer Llama with random weights (d=32, V=97) in train mode."""
    return tiny_causal_lm("llama", seed, **overrides).to(dtype)


#: Tiny configs of every family :func:`unlearn_kernels.patch` supports (d=32, V=97, 2 layers).
#: The Gemma caps are small so that the softcap bites on random weights.
FAMILY_CONFIGS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 3.0},
}


def tiny_causal_lm(model_type: str, seed: int, **overrides) -> nn.Module:
    """A 2-layer model of ``model_type`` with random weights (d=32, V=97) in train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **FAMILY_CONFIGS[model_type],
        **overrides,
    }
    config = AutoConfig.for_model(model_type, **settings)
    return AutoModelForCausalLM.from_config(config).train()


def lora(model: nn.Module, *, targets: tuple[str, ...] | str = ("q_proj", "v_proj")) -> nn.Module:
    """PEFT LoRA with random (non-zero) A and B, so the adapters change the outputs
    (``targets="all-linear"``: every linear layer but ``lm_head``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=targets if isinstance(targets, str) else list(targets),
        init_lora_weights=False,
    )
    return get_peft_model(model, config)


def random_pairs(
    gen: torch.Generator, n: int, *, min_len: int = 5, max_len: int = 14
) -> TokenizedPairs:
    """Right-padded random sequences with random prompt lengths (at least one response token)."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    width = int(lengths.max())
    ids = torch.randint(4, VOCAB, (n, width), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    prompts = torch.stack([torch.randint(1, int(n_) - 1, (), generator=gen) for n_ in lengths])
    return TokenizedPairs(ids, mask, prompts)


def unshifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Undo the shift: the labels ``model(input_ids, labels=...)`` expects (it shifts itself)."""
    out = torch.full_like(labels, -100)
    out[:, 1:] = labels[:, :-1]
    return out


def word_tokenizer(words: list[str] = WORDS):
    """A word-level ``tokenizers.Tokenizer`` over ``words`` (whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def hf_word_tokenizer(words: list[str] = WORDS):
    """:func:`word_tokenizer` as a Hugging Face fast tokenizer with BOS/EOS/PAD/UNK tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(words),
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )


@functools.cache
def bnb_usable() -> str | None:
    """``None`` if bitsandbytes nf4 runs forward and backward on CPU here, else the reason."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to("cpu")
        x = torch.randn(3, 64, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None
    except Exception as err:  # any failure means: skip
        return f"bitsandbytes nf4 cannot run on CPU here: {err!r}"
    return None


def qlora_model(
    tmp_path: Path,
    seed: int,
    model_type: str = "llama",
    *,
    targets: tuple[str, ...] | str = ("q_proj", "v_proj"),
) -> nn.Module:
    """``tiny_causal_lm`` (d=64) saved and reloaded with bitsandbytes nf4 decoder layers, plus
    LoRA on ``targets``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if (reason := bnb_usable()) is not None:
        pytest.skip(reason)
    base = tiny_causal_lm(model_type, seed, hidden_size=64, intermediate_size=128)
    base.save_pretrained(tmp_path / "base")
    quantised = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base",
        dtype=torch.float32,
        local_files_only=True,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
    )
    return lora(quantised.train(), targets=targets)
