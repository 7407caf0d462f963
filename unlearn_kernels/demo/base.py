"""The demo's base models: a small Llama-shaped model trained from scratch on the world.

The *target* model trains on every trained author and the world facts; the *retain-only*
model of a forget split on that split's retain authors and the world facts (TOFU's retain
model). Training is response-only next-token cross-entropy through the package's fused loss
(:func:`unlearn_kernels.hf.causal_lm_loss`; the logits are never materialised), AdamW with a
linear warmup and a cosine decay, a seeded data order: the same settings give the same weights
on the same machine.

Models are cached under ``cache_dir`` by a key of the world and training settings
(:func:`cached_model`), each a complete Hugging Face model directory (weights, config,
tokenizer, ``training.json``) written atomically and reused by a repeat run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from unlearn_kernels._io import write_dir_atomically
from unlearn_kernels.data.formats import TokenizedPairs, tokenize_pairs

log = logging.getLogger("unlearn_kernels")

#: Bumped whenever training changes for the same settings.
TRAINING_VERSION = 1
TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class BaseSettings:
    """Shape and training of a base model.

    Args:
        hidden_size, layers, heads, intermediate_size: the Llama shape (untied output head).
        epochs: passes over the training pairs.
        batch_size: pairs per optimizer step.
        lr: AdamW's peak learning rate (linear warmup over ``warmup`` of the steps, then
            cosine to 0).
        weight_decay: AdamW's.
        seed: of the initial weights and the data order.
    """

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 256
    epochs: int = 16
    batch_size: int = 64
    lr: float = 5e-3
    warmup: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "layers", "heads", "intermediate_size", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of heads")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/unlearn-kernels`` (``~/.cache/unlearn-kernels`` without it)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "unlearn-kernels"


def build_model(settings: BaseSettings, tokenizer: Any) -> torch.nn.Module:
    """A freshly initialised Llama-shaped causal LM for ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(config)


def tokenize(pairs: list[tuple[str, str]], tokenizer: Any) -> TokenizedPairs:
    """``[BOS] question answer [EOS]``, the answer the response (as the run and eval read it)."""
    return tokenize_pairs(
        pairs,
        tokenizer,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def train_model(
    pairs: list[tuple[str, str]],
    tokenizer: Any,
    settings: BaseSettings,
    *,
    desc: str = "train",
    progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a fresh model on ``pairs`` (module docstring); returns it (eval mode) and a summary
    (final epoch's mean loss, seconds, steps)."""
    from unlearn_kernels.hf import causal_lm_loss

    data = tokenize(pairs, tokenizer)
    model = build_model(settings, tokenizer).train()
    per_epoch = math.ceil(len(data) / settings.batch_size)
    total = per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    warmup = max(1, int(settings.warmup * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order = torch.Generator().manual_seed(settings.seed)
    started = time.perf_counter()
    epoch_loss = float("nan")
    with tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for _ in range(settings.epochs):
            permutation = torch.randperm(len(data), generator=order).tolist()
            losses = []
            for start in range(0, len(data), settings.batch_size):
                batch = data.select(permutation[start : start + settings.batch_size])
                loss = causal_lm_loss(
                    model, batch.input_ids, batch.attention_mask, batch.prompt_lengths
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.update()
            epoch_loss = sum(losses) / len(losses)
            bar.set_postfix(loss=f"{epoch_loss:.4f}")
    summary = {
        "final_epoch_loss": epoch_loss,
        "seconds": time.perf_counter() - started,
        "steps": total,
        "examples": len(data),
    }
    return model.eval(), summary


def model_key(pairs: list[tuple[str, str]], tokenizer: Any, settings: BaseSettings) -> str:
    """Cache key of a base model: what it trains on (the pairs, the tokenizer's vocabulary),
    the settings, the versions."""
    from unlearn_kernels.data.formats import tokenizer_sha256

    digest = hashlib.sha256()
    for question, answer in pairs:
        digest.update(json.dumps([question, answer]).encode())
    text = json.dumps(
        {
            "pairs": digest.hexdigest(),
            "tokenizer": tokenizer_sha256(tokenizer),
            "settings": asdict(settings),
            "version": TRAINING_VERSION,
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_model(
    directory: Path,
    pairs: list[tuple[str, str]],
    tokenizer: Any,
    settings: BaseSettings,
    *,
    desc: str,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """The model directory at ``directory``: reused if complete, else trained and written
    atomically. Returns it and its ``training.json`` summary (``cached``: whether reused)."""
    directory = Path(directory)
    done = directory / TRAINING_FILE
    if done.is_file():
        return directory, {**json.loads(done.read_text(encoding="utf-8")), "cached": True}
    model, summary = train_model(pairs, tokenizer, settings, desc=desc, progress=progress)
    summary = {**summary, "settings": asdict(settings)}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")

    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_dir_atomically(directory, fill)
    except ValueError:
        if not done.is_file():  # another process wrote it meanwhile: theirs is as good
            raise
    return directory, {**summary, "cached": False}
