"""Forget / retain data for an unlearning run: loading, the step sampler, micro-batches.

**Sets.** The *forget* set (its responses must stop being produced) and the *retain* set (whose
behaviour must not change), each a JSONL file of ``{"prompt", "response"}`` lines
(:mod:`unlearn_kernels.data.formats`), tokenised once into :class:`TokenizedPairs`.

**Sampling.** Step ``s`` takes ``grad_accum`` micro-batches of ``batch_size`` examples from each
set. Each set is read as an endless stream of permutations (one per pass over the set), so the
retain set cycles when it is shorter than the run needs and every example of a set is seen
once per pass. The ``k``-th element of a stream is a pure function of ``(seed, set, k)``, and so
is Yao et al.'s *random mismatch* (forget prompts paired with the responses of random retain
examples): resuming a run needs only the step number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unlearn_kernels.data.formats import (
    TokenizedPairs,
    file_sha256,
    read_jsonl_lines,
    tokenize_pairs,
)

IGNORE_INDEX = -100


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed determined by ``seed`` and ``parts`` (stable across processes)."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def read_split(
    path: str | Path,
    tokenizer: Any,
    *,
    bos_token_id: int | None,
    eos_token_id: int | None,
    max_length: int | None,
    chat_template: bool = False,
) -> TokenizedPairs:
    """Tokenise one JSONL set as :func:`tokenize_split` does; errors name ``path:line``. An
    empty set is a ``ValueError``."""
    records = read_jsonl_lines(path)
    if not records:
        raise ValueError(f"{path} holds no example (every line is blank)")
    data = tokenize_split(
        [(prompt, response) for _, prompt, response in records],
        tokenizer,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        max_length=max_length,
        chat_template=chat_template,
        names=[f"{path}:{line}" for line, _, _ in records],
    )
    return replace(data, source_sha256=file_sha256(path))


def tokenize_split(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Any,
    *,
    bos_token_id: int | None,
    eos_token_id: int | None,
    max_length: int | None,
    chat_template: bool = False,
    names: Sequence[str] | None = None,
) -> TokenizedPairs:
    """:func:`~unlearn_kernels.data.formats.tokenize_pairs` of ``(prompt, response)`` pairs,
    the one tokenisation of training and evaluation.

    With ``chat_template`` each prompt is rendered as a single user turn by the tokenizer's chat
    template (with the generation prompt; the template supplies any BOS, so ``bos_token_id`` is
    not added).
    """
    prompts = [prompt for prompt, _ in pairs]
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.chat_template is true but the tokenizer has no chat template")
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            for prompt in prompts
        ]
        bos_token_id = None
    return tokenize_pairs(
        [(prompt, response) for prompt, (_, response) in zip(prompts, pairs, strict=True)],
        tokenizer,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        max_length=max_length,
        names=names,
    )


def with_responses(
    prompts: TokenizedPairs,
    prompt_index: list[int],
    responses: TokenizedPairs,
    response_index: list[int],
    max_length: int | None,
) -> TokenizedPairs:
    """Prompt of ``prompts[prompt_index[b]]`` followed by the response of
    ``responses[response_index[b]]``, cut to ``max_length`` from the end of the response."""
    rows, lengths = [], []
    for p, r in zip(prompt_index, response_index, strict=True):
        prompt_ids, prompt_length = _example(prompts, p)
        response_ids, response_start = _example(responses, r)
        ids = torch.cat([prompt_ids[:prompt_length], response_ids[response_start:]])
        rows.append(ids[:max_length])
        lengths.append(prompt_length)
    width = max(row.numel() for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : row.numel()] = row
        mask[b, : row.numel()] = 1
    return TokenizedPairs(ids, mask, torch.tensor(lengths))


def _example(data: TokenizedPairs, index: int) -> tuple[Tensor, int]:
    real = data.attention_mask[index].bool()
    return data.input_ids[index][real], int(data.prompt_lengths[index])


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """Examples ``index`` of one set: right-padded tokens and their shifted response-only
    ``labels`` (row ``t`` predicts token ``t + 1``; ``-100`` elsewhere), plus the cached
    reference rows of these examples when the method needs them."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    index: list[int]
    reference: Any = None  # train.reference_cache.ReferenceBatch

    @classmethod
    def of(cls, data: TokenizedPairs, index: list[int]) -> TokenBatch:
        pairs = data.select(index)
        return cls(pairs.input_ids, pairs.attention_mask, pairs.labels(IGNORE_INDEX), index)

    @property
    def n_tokens(self) -> int:
        """Response targets in the batch."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> TokenBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
        )


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """One micro-batch of a step: forget examples, retain examples (``None`` when the method uses
    none) and the forget prompts with random retain responses (``None`` unless asked for)."""

    forget: TokenBatch
    retain: TokenBatch | None = None
    mismatch: TokenBatch | None = None


@dataclass(frozen=True)
class StepTotals:
    """Normalisers over all micro-batches of a step, so that accumulated micro-batch terms equal
    the term of the whole step: ``NLL(S) = Σ_mb Σ_t ℓ_t / S_tokens``."""

    forget_tokens: float
    retain_tokens: float
    mismatch_tokens: float
    forget_sequences: float

    @classmethod
    def of(cls, micro_batches: list[MicroBatch]) -> StepTotals:
        def tokens(split: str) -> int:
            return sum(getattr(mb, split).n_tokens for mb in micro_batches if getattr(mb, split))

        return cls(
            forget_tokens=tokens("forget"),
            retain_tokens=tokens("retain"),
            mismatch_tokens=tokens("mismatch"),
            forget_sequences=sum(len(mb.forget.index) for mb in micro_batches),
        )

    def per_process(self, world: int) -> StepTotals:
        """The normalisers of one of ``world`` processes that each hold a share of the step's
        examples: the totals over ``world``, so that the mean over the processes of their terms
        (what a data-parallel all-reduce of the gradients computes) is the step's term."""
        if world == 1:
            return self
        return StepTotals(*(getattr(self, f.name) / world for f in fields(self)))


class StepSampler:
    """Example indices of every micro-batch of every step (see the module docstring)."""

    def __init__(
        self,
        n_forget: int,
        n_retain: int,
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        self.sizes = {"forget": n_forget, "retain": n_retain}
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.seed, self.shuffle = seed, shuffle
        self._orders: dict[tuple[str, int], list[int]] = {}

    def _order(self, split: str, epoch: int) -> list[int]:
        key = (split, epoch)
        if key not in self._orders:
            n = self.sizes[split]
            if self.shuffle:
                gen = torch.Generator().manual_seed(derived_seed(self.seed, split, epoch))
                order = torch.randperm(n, generator=gen).tolist()
            else:
                order = list(range(n))
            self._orders = {k: v for k, v in self._orders.items() if k[0] != split}
            self._orders[key] = order
        return self._orders[key]

    def indices(self, split: str, step: int, micro_batch: int) -> list[int]:
        """The ``batch_size`` examples of ``split`` in micro-batch ``micro_batch`` of ``step``."""
        n = self.sizes[split]
        first = (step * self.grad_accum + micro_batch) * self.batch_size
        out = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, n)
            out.append(self._order(split, epoch)[offset])
        return out

    def mismatch(self, step: int, micro_batch: int) -> list[int]:
        """Random retain examples whose responses go with this micro-batch's forget prompts."""
        gen = torch.Generator().manual_seed(derived_seed(self.seed, "mismatch", step, micro_batch))
        return torch.randint(0, self.sizes["retain"], (self.batch_size,), generator=gen).tolist()
