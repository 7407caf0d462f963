"""What every metric reads from a model: answer-token NLLs and greedy answers.

**Tokenisation** is training's (:func:`~unlearn_kernels.data.unlearn.tokenize_split`):
``[bos] + prompt + response + [eos]`` with prompt = question and response = answer, BOS/EOS
and the chat template as the run config's ``data`` section says (``add_bos``, ``add_eos``,
``chat_template``), so the scored tokens are the trained ones (EOS included).

**NLLs** ``ℓ_t = −log p(y_t | x, y_<t)`` of the response tokens come from the fused
per-token cross-entropy (``reduction="none"``) on the decoder's final hidden states: the
``[N, V]`` logits are never built. Batches are right-padded, sorted by length (less padding),
and run under :func:`~unlearn_kernels.hf.frozen_forward` (no grad, no dropout).

**Greedy answers** come from ``model.generate`` (``do_sample=False``) on left-padded prompts,
cut at the first EOS and decoded without special tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from unlearn_kernels.data.formats import TokenizedPairs
from unlearn_kernels.data.unlearn import IGNORE_INDEX, tokenize_split
from unlearn_kernels.hf import final_hidden_states, frozen_forward, output_head, unwrap_model


@dataclass(frozen=True)
class Prompting:
    """How questions and answers become tokens: the run config's ``data`` options and the
    resolved special-token ids."""

    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: bool = False

    @classmethod
    def of(
        cls,
        model: nn.Module,
        tokenizer: Any,
        *,
        add_bos: bool = True,
        add_eos: bool = True,
        chat_template: bool = False,
    ) -> Prompting:
        """BOS/EOS ids of the tokenizer, else of the model's config (as training resolves them)."""
        from unlearn_kernels.train.model import special_token_ids

        bos, eos = special_token_ids(tokenizer, unwrap_model(model).config)
        for flag, on, token in (("add_bos", add_bos, bos), ("add_eos", add_eos, eos)):
            if on and token is None and not (flag == "add_bos" and chat_template):
                raise ValueError(f"{flag} is true but neither the tokenizer nor the model has one")
        return cls(bos if add_bos else None, eos if add_eos else None, chat_template)

    def tokenize(self, tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> TokenizedPairs:
        """``(prompt, response)`` pairs as training tokenises them (no ``max_length`` cut)."""
        return tokenize_split(
            pairs,
            tokenizer,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            max_length=None,
            chat_template=self.chat_template,
        )


def model_device(model: nn.Module) -> torch.device:
    """Where the inputs go: the device of the input embeddings."""
    return unwrap_model(model).get_input_embeddings().weight.device


def _length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Example indices, longest first, in groups of ``batch_size``."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def response_nll(
    model: nn.Module,
    data: TokenizedPairs,
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "scoring",
) -> list[Tensor]:
    """Per example, the float64 CPU vector of its response tokens' NLLs ``ℓ_t`` (in order)."""
    head = output_head(model)
    device = model_device(model)
    lengths = data.attention_mask.sum(1).tolist()
    out: list[Tensor | None] = [None] * len(data)
    batches = list(_length_batches(lengths, batch_size))
    with frozen_forward(model):
        for index in tqdm(batches, desc=desc, disable=not progress, leave=False):
            batch = data.select(index)
            labels = batch.labels(IGNORE_INDEX).to(device)
            hidden = final_hidden_states(
                model, batch.input_ids.to(device), batch.attention_mask.to(device)
            )
            nll = head.cross_entropy(hidden, labels, reduction="none").double().cpu()
            keep = (labels != IGNORE_INDEX).cpu()
            for row, i in enumerate(index):
                out[i] = nll[row][keep[row]]
    return out


def mean_nll(nll: Sequence[Tensor]) -> list[float]:
    """Each example's mean response-token NLL ``(1/|y|) Σ_t ℓ_t``."""
    return [float(v.mean()) for v in nll]


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids`` without special tokens, stripped (HF tokenizer or ``tokenizers``)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def greedy_continuations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Tensor],
    *,
    eos_token_id: int | None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding, cut at the first
    ``eos_token_id`` (generation stops there too) and decoded without special tokens."""
    from transformers import GenerationConfig

    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = next(t for t in (pad, eos_token_id, 0) if t is not None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos_token_id,
    )
    device = model_device(model)
    out: list[str | None] = [None] * len(prompts)
    batches = list(_length_batches([p.numel() for p in prompts], batch_size))
    with frozen_forward(model):
        for index in tqdm(batches, desc=desc, disable=not progress, leave=False):
            width = max(prompts[i].numel() for i in index)
            ids = torch.full((len(index), width), pad, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(index):
                n = prompts[i].numel()
                ids[row, width - n :] = prompts[i]
                mask[row, width - n :] = 1
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for row, i in enumerate(index):
                new = generated[row, width:].tolist()
                if eos_token_id is not None and eos_token_id in new:
                    new = new[: new.index(eos_token_id)]
                out[i] = decode(tokenizer, new)
    return out


def prompt_tokens(data: TokenizedPairs) -> list[Tensor]:
    """Each example's prompt ids (``[bos] + prompt``, or its chat rendering)."""
    return [tokens[:length] for tokens, length in data.sequences()]


def verbatim_prefixes(
    data: TokenizedPairs, eos_token_id: int | None
) -> tuple[list[Tensor], list[list[int]]]:
    """Per example the prefix ``prompt + a[:⌊|a|/2⌋]`` and the rest ``a[⌊|a|/2⌋:]`` of its
    response ``a`` (a trailing ``eos_token_id`` dropped first)."""
    prefixes, rests = [], []
    for tokens, length in data.sequences():
        answer = tokens[length:].tolist()
        if eos_token_id is not None and answer and answer[-1] == eos_token_id:
            answer = answer[:-1]
        half = len(answer) // 2
        prefixes.append(tokens[: length + half])
        rests.append(answer[half:])
    return prefixes, rests
