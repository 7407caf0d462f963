"""The demo world's tokenizer: word level, trained locally with ``tokenizers`` on the world's
own text, saved as a ``PreTrainedTokenizerFast`` with ``[BOS]``, ``[EOS]``, ``[PAD]``,
``[UNK]``. Words and punctuation marks are tokens (``Whitespace`` pre-tokenizer)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]


def train_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over every word of ``texts`` (PAD 0, BOS 1,
    EOS 2, UNK 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )


def world_texts(files: dict[str, str]) -> list[str]:
    """Every question and answer string in the world's TOFU files (one text per string)."""
    import json

    texts = []
    for name, text in files.items():
        if not name.endswith(".json") or name == "world.json":
            continue
        for line in text.splitlines():
            record = json.loads(line)
            texts += [record["question"], record["answer"]]
            texts += [record.get("paraphrased_answer", ""), *record.get("perturbed_answer", [])]
    return [t for t in texts if t]
