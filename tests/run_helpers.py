"""A tiny local world for run-level tests: a model directory with its tokenizer, and forget /
retain JSONL files (no hub access)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hf_helpers import WORDS, tiny_llama, word_tokenizer

from unlearn_kernels.train.config import RunConfig, validate_config


def save_tiny_model(path: Path, seed: int = 0, **overrides) -> Path:
    """``tiny_llama`` with a word-level tokenizer (BOS 1, EOS 2, PAD 0), saved to ``path``."""
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(seed, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    model.save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(),
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    tokenizer.save_pretrained(path)
    return path


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """``n`` random prompt/response lines of 2–6 and 1–7 words."""
    rng = random.Random(seed)
    words = WORDS[4:]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
            response = " ".join(rng.choice(words) for _ in range(rng.randint(1, 7)))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def tiny_world(root: Path, *, n_forget: int = 10, n_retain: int = 23, seed: int = 0) -> dict:
    """Model and data under ``root``; returns the config keys that point at them."""
    save_tiny_model(root / "model", seed)
    return {
        "model": str(root / "model"),
        "data": {
            "forget": str(write_pairs(root / "forget.jsonl", n_forget, seed + 1)),
            "retain": str(write_pairs(root / "retain.jsonl", n_retain, seed + 2)),
        },
    }


def config_for(world: dict, method_name: str, output_dir: Path, **sections) -> RunConfig:
    """A validated config: ``world``'s files, the method, tiny-run defaults, ``sections``."""
    tree = {
        **world,
        "data": {**world["data"], **sections.pop("data", {})},
        "method": {"name": method_name, **sections.pop("method", {})},
        "train": {"steps": 4, "batch_size": 3, "checkpoint_every": 0, **sections.pop("train", {})},
        "output_dir": str(output_dir),
        **sections,
    }
    return validate_config(tree)
