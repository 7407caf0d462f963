"""Data formats shared by the reference cache, the training layer and the demo."""

from unlearn_kernels.data.formats import (
    TokenizedPairs,
    causal_lm_labels,
    load_pairs,
    load_tokenizer,
    read_jsonl_pairs,
    response_mask,
    save_pairs,
    tokenize_pairs,
)

__all__ = [
    "TokenizedPairs",
    "causal_lm_labels",
    "load_pairs",
    "load_tokenizer",
    "read_jsonl_pairs",
    "response_mask",
    "save_pairs",
    "tokenize_pairs",
]
