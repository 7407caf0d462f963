"""(prompt, response) data: the JSONL format, tokenisation, and response-only causal labels.

**JSONL format.** One JSON object per line, UTF-8; blank lines are skipped::

    {"prompt": "Q: Who wrote Dune?\\nA:", "response": " Frank Herbert."}

``prompt`` and ``response`` are strings (other keys are ignored). Each side is tokenised on its
own without special tokens and the ids are joined as ``[bos] + prompt + response + [eos]``
(``bos``/``eos`` only when their ids are given), so the prompt length is exact; any space
between the two belongs in the strings.

**Pre-tokenised data** is a :class:`TokenizedPairs` of three tensors, also stored as a
safetensors file with exactly these names: ``input_ids`` ``[B, T]`` int, ``attention_mask``
``[B, T]`` (1 on tokens, 0 on padding, either side), ``prompt_lengths`` ``[B]`` (the number of
prompt tokens, ``bos`` included, counted from the first real token).

**Labels.** Row ``t`` of a causal LM's hidden states predicts token ``t + 1``, so
``labels[b, t] = input_ids[b, t + 1]`` when token ``t + 1`` is a response token and ``t`` is a
real token, else ``ignore_index`` (prompt, padding and the last position).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from unlearn_kernels._deps import require

_TENSOR_NAMES = ("input_ids", "attention_mask", "prompt_lengths")


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """SHA-256 of a file, read in ``block``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(block):
            digest.update(piece)
    return digest.hexdigest()


def response_mask(attention_mask: Tensor, prompt_lengths: Tensor) -> Tensor:
    """``[B, T]`` bool: real tokens whose rank among the real tokens is ``>= prompt_length``."""
    real = attention_mask.bool()
    rank = real.long().cumsum(1) - 1
    return real & (rank >= prompt_lengths.to(rank.device)[:, None])


def causal_lm_labels(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    prompt_lengths: Tensor | Sequence[int] | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Shifted response-only labels: ``labels[b, t] = input_ids[b, t+1]`` on response targets.

    Args:
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]``, 1 on tokens and 0 on padding (default: no padding).
        prompt_lengths: ``[B]`` prompt tokens per example, counted from the first real token
            (default 0: every token after the first is a target).
        ignore_index: the label of rows that carry no loss.

    Returns:
        ``[B, T]`` int64 labels aligned with the hidden states (row ``t`` predicts ``t + 1``).
    """
    input_ids, attention_mask, prompt_lengths = _check_pair_tensors(
        input_ids, attention_mask, prompt_lengths
    )
    target = response_mask(attention_mask, prompt_lengths)
    valid = torch.zeros_like(target)
    valid[:, :-1] = target[:, 1:] & attention_mask[:, :-1].bool()
    labels = torch.full_like(input_ids, ignore_index, dtype=torch.int64)
    labels[:, :-1] = torch.where(valid[:, :-1], input_ids[:, 1:].long(), ignore_index)
    return labels


def _check_pair_tensors(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    prompt_lengths: Tensor | Sequence[int] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate and default the three tensors; every failure is a ``ValueError`` naming one."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {_describe(input_ids)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    batch, _ = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
            f"got {_describe(attention_mask)}"
        )
    if attention_mask.dtype.is_floating_point or bool(
        ((attention_mask != 0) & (attention_mask != 1)).any()
    ):
        raise ValueError("attention_mask must hold only integer or bool 0/1 values")
    if prompt_lengths is None:
        prompt_lengths = torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
    prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
    if prompt_lengths.shape != (batch,) or prompt_lengths.dtype.is_floating_point:
        raise ValueError(
            f"prompt_lengths must be an integer tensor of shape [B]=[{batch}], "
            f"got {_describe(prompt_lengths)}"
        )
    n_real = attention_mask.long().sum(1)
    if bool(((prompt_lengths < 0) | (prompt_lengths > n_real)).any()):
        raise ValueError(
            "prompt_lengths must lie in [0, number of real tokens] for every example, got "
            f"{prompt_lengths.tolist()} for lengths {n_real.tolist()}"
        )
    return input_ids, attention_mask, prompt_lengths.long()


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)} {value.dtype}"
    return type(value).__name__


@dataclass(frozen=True, eq=False)
class TokenizedPairs:
    """A tokenised (prompt, response) data set; see the module docstring for the layout.

    ``source_sha256`` is the hash of the file it was read from, when it came from one.
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompt_lengths: Tensor
    source_sha256: str | None = None

    def __post_init__(self) -> None:
        ids, mask, lengths = _check_pair_tensors(
            self.input_ids, self.attention_mask, self.prompt_lengths
        )
        object.__setattr__(self, "input_ids", ids.long())
        object.__setattr__(self, "attention_mask", mask.long())
        object.__setattr__(self, "prompt_lengths", lengths)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def sequences(self) -> Iterator[tuple[Tensor, int]]:
        """Each example's real tokens (padding dropped) and prompt length."""
        real = self.attention_mask.bool()
        for b in range(len(self)):
            yield self.input_ids[b][real[b]], int(self.prompt_lengths[b])

    def select(self, indices: Sequence[int]) -> TokenizedPairs:
        """Examples ``indices``, right-padded with 0 to their longest, whatever the padding here."""
        real = self.attention_mask.bool()
        rows = [self.input_ids[i][real[i]] for i in indices]
        width = max((r.numel() for r in rows), default=0)
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for b, row in enumerate(rows):
            ids[b, : row.numel()] = row
            mask[b, : row.numel()] = 1
        return TokenizedPairs(ids, mask, self.prompt_lengths[list(indices)].clone())

    def batches(self, batch_size: int) -> Iterator[tuple[int, TokenizedPairs]]:
        """``(first example index, right-padded batch)`` over consecutive examples."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        for start in range(0, len(self), batch_size):
            yield start, self.select(range(start, min(start + batch_size, len(self))))

    def labels(self, ignore_index: int = -100) -> Tensor:
        """Shifted response-only labels (see :func:`causal_lm_labels`)."""
        return causal_lm_labels(
            self.input_ids, self.attention_mask, self.prompt_lengths, ignore_index
        )

    def content_sha256(self) -> str:
        """Hash of every example's real tokens and prompt length, in order (padding-independent)."""
        digest = hashlib.sha256(f"pairs:{len(self)}".encode())
        for tokens, prompt_length in self.sequences():
            digest.update(f"|{prompt_length}:{tokens.numel()}|".encode())
            digest.update(tokens.cpu().numpy().tobytes())
        return digest.hexdigest()


def read_jsonl_pairs(path: str | Path) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs from a JSONL file in the format of the module docstring."""
    return [(prompt, response) for _, prompt, response in read_jsonl_lines(path)]


def read_jsonl_lines(path: str | Path) -> list[tuple[int, str, str]]:
    """``(line number, prompt, response)`` of every non-blank line of a JSONL pairs file; a
    malformed line is a ``ValueError`` naming the file and the line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
            if not isinstance(record, dict) or not all(
                isinstance(record.get(key), str) for key in ("prompt", "response")
            ):
                raise ValueError(
                    f'{path}:{line_no}: expected an object with string "prompt" and "response"'
                )
            records.append((line_no, record["prompt"], record["response"]))
    return records


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, from a ``tokenizers.Tokenizer`` or an HF
    tokenizer (both have ``encode(text, add_special_tokens=False)``)."""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(encoded, "ids", encoded))


def tokenize_pairs(
    pairs: Iterable[tuple[str, str]],
    tokenizer: Any,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    max_length: int | None = None,
    names: Sequence[str] | None = None,
) -> TokenizedPairs:
    """Tokenise ``(prompt, response)`` pairs as ``[bos] + prompt + response + [eos]``.

    Args:
        pairs: ``(prompt, response)`` strings.
        tokenizer: a ``tokenizers.Tokenizer`` or a Hugging Face tokenizer.
        bos_token_id, eos_token_id: added when given (e.g. ``tokenizer.bos_token_id``).
        max_length: sequences are cut to this many tokens from the end of the response.
        names: how errors name each pair (e.g. ``"forget.jsonl:7"``; default ``pairs[i]``).

    A response that tokenises to nothing, or that ``max_length`` cuts away entirely, is a
    ``ValueError`` naming the pair.
    """
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    sequences, prompt_lengths = [], []
    for index, (prompt, response) in enumerate(pairs):
        name = f"pairs[{index}]" if names is None else names[index]
        head = ([bos_token_id] if bos_token_id is not None else []) + _encode(tokenizer, prompt)
        response_ids = _encode(tokenizer, response)
        if not response_ids:
            raise ValueError(f"{name}: the response {response!r} tokenises to no token")
        tail = response_ids + ([eos_token_id] if eos_token_id is not None else [])
        ids = (head + tail)[:max_length]
        if len(ids) <= len(head):
            raise ValueError(
                f"{name} has no response token left (prompt {len(head)} tokens, "
                f"response {len(tail)}, max_length={max_length})"
            )
        sequences.append(ids)
        prompt_lengths.append(len(head))
    if not sequences:
        raise ValueError("pairs is empty")
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for b, ids in enumerate(sequences):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[b, : len(ids)] = 1
    return TokenizedPairs(input_ids, attention_mask, torch.tensor(prompt_lengths))


def save_pairs(data: TokenizedPairs, path: str | Path) -> None:
    """Write pre-tokenised data as a safetensors file of the three tensors."""
    save_file({name: getattr(data, name).contiguous() for name in _TENSOR_NAMES}, str(path))


def load_pairs(
    path: str | Path,
    tokenizer: Any = None,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    max_length: int | None = None,
) -> TokenizedPairs:
    """Read a ``.jsonl`` file (tokenised with ``tokenizer``) or a pre-tokenised ``.safetensors``.

    The result's ``source_sha256`` is the file's hash.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if set(tensors) != set(_TENSOR_NAMES):
            raise ValueError(f"{path} must hold exactly {_TENSOR_NAMES}, found {sorted(tensors)}")
        data = TokenizedPairs(*(tensors[name] for name in _TENSOR_NAMES))
    elif path.suffix == ".jsonl":
        if tokenizer is None:
            raise ValueError(f"tokenizer is needed to read the JSONL file {path}")
        data = tokenize_pairs(
            read_jsonl_pairs(path),
            tokenizer,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            max_length=max_length,
        )
    else:
        raise ValueError(f"path must end in .jsonl or .safetensors, got {path.name!r}")
    return TokenizedPairs(
        data.input_ids, data.attention_mask, data.prompt_lengths, file_sha256(path)
    )


def load_tokenizer(path: str | Path) -> Any:
    """A local tokenizer: a ``tokenizer.json`` file (``tokenizers``) or a Hugging Face
    tokenizer directory (``AutoTokenizer``, local files only)."""
    path = Path(path)
    if path.is_file():
        require("tokenizers", purpose=f"the tokenizer file {path.name}")
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    if path.is_dir():
        require("transformers", purpose="a tokenizer directory")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    raise ValueError(f"tokenizer path {str(path)!r} is neither a tokenizer.json nor a directory")


#: The parts of a ``tokenizers`` serialisation that decide the token ids of a text encoded
#: without special tokens; truncation, padding, the post-processor (special tokens added by
#: ``add_special_tokens=True``; BOS/EOS are explicit here and land in the data's own hash),
#: the decoder and the format version do not, and differ between loaders or after a call.
_TOKEN_ID_FIELDS = ("model", "normalizer", "pre_tokenizer", "added_tokens")


def tokenizer_sha256(tokenizer: Any) -> str:
    """Identity of what a tokenizer maps text to: the hash of its vocabulary and merges
    (``model``), normaliser, pre-tokeniser and added/special tokens (sorted by id), nothing
    else — the same for a ``tokenizer.json`` and its Hugging Face directory, and unchanged by
    a ``tok(..., truncation=True, padding=...)`` call. A tokenizer without a ``tokenizers``
    backend is hashed by its class, vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "to_str"):
        serialised = json.loads(backend.to_str())
        identity = {key: serialised.get(key) for key in _TOKEN_ID_FIELDS}
        identity["added_tokens"] = sorted(identity["added_tokens"] or [], key=lambda t: t["id"])
    elif hasattr(tokenizer, "get_vocab"):
        identity = {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": sorted(getattr(tokenizer, "all_special_tokens", [])),
        }
    else:
        raise ValueError(f"tokenizer of type {type(tokenizer).__name__} cannot be fingerprinted")
    text = json.dumps(identity, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
