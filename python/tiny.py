"""A tiny local world for the recipes' ``--tiny`` runs (CPU, seconds, no downloads): a random
Llama-shaped model with a word-level tokenizer, and forget / retain JSONL files."""

from __future__ import annotations

import json
import random
from pathlib import Path


def tiny_world(
    root: Path,
    *,
    vocab: int = 128,
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    n_forget: int = 12,
    n_retain: int = 24,
    prompt_words: tuple[int, int] = (3, 8),
    response_words: tuple[int, int] = (2, 8),
    tied: bool = False,
    seed: int = 0,
) -> dict[str, str]:
    """Write ``root/model`` (a saved ``LlamaForCausalLM`` and its tokenizer) and
    ``root/{forget,retain}.jsonl`` (random words, lengths drawn from the given ranges); return
    their paths."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(vocab - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    # bf16 on disk: a run loading it as float32 copies every weight out of the file's memory
    # map, so its resident memory is what it holds (no file pages left mapped)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(seed)
    paths = {"model": str(root / "model")}
    for split, n in (("forget", n_forget), ("retain", n_retain)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                prompt = " ".join(rng.choice(words[4:]) for _ in range(rng.randint(*prompt_words)))
                response = " ".join(
                    rng.choice(words[4:]) for _ in range(rng.randint(*response_words))
                )
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
        paths[split] = str(root / f"{split}.jsonl")
    return paths
