"""Reference cache: run the frozen reference once over a data set and keep, per response token,
what each objective needs, so training never holds a second model or reference logits.
For users: ``docs/cache.md`` (building, opening, feeding the fused ops, the format).

The reference is the model with its PEFT adapters disabled (``disable_adapter()``, no second
copy; a plain model is its own reference). For every response row — row ``t`` of an example
predicts token ``t + 1``; rows are those of :func:`~unlearn_kernels.data.causal_lm_labels`
that are not ignored, example by example, position by position — with reference logits
``z = softcap(W h + b)`` and ``p = softmax(z/τ)``:

============== ========= ====================================================================
name           shape     content
============== ========= ====================================================================
label          [n]       the target token ``y`` (to check alignment with a training batch)
hidden         [n, d]    final hidden states ``h`` (exact KL), in ``hidden_dtype``
topk_index     [n, k]    the ``k`` most likely tokens under ``p`` (compressed KL)
topk_logprob   [n, k]    their ``log p_v``
tail_logprob   [n]       ``log(1 − Σ_{v∈K} p_v) = lse_{v∉K}(z_v/τ) − lse(z/τ)``: the tail's own
                         logsumexp, so no cancellation when the top-k hold nearly all the mass
                         (``−inf`` when ``k = V``)
label_logprob  [n]       ``log softmax(z)_y`` at temperature 1 (NPO/SimNPO: per-example sums)
============== ========= ====================================================================

Logits are rebuilt from ``h`` chunk by chunk (never ``[n, V]`` for a whole batch). Log-probs
are stored in fp32, ``label``/``topk_index`` as int32.

**On disk.** A directory of ``shard-NNNNN.safetensors`` files, each holding whole examples
and at most ``max_shard_bytes`` of tensors (its ``row_offsets [e + 1]`` included), then
``manifest.json``, written last and atomically (temp file, fsync, ``os.replace``): a build
that stops midway leaves no manifest and is refused. The manifest lists every shard's size
(checked on open) and SHA-256 (checked on a shard's first read), the settings, a random
``build_id``, and the fingerprint of what the cache was built from: the model (names, shapes,
dtypes and values of its parameters, and its config), the data (token content, and the file
hash when read from a file) and the tokenizer (what decides its token ids). Adapter parameters
are left out of the model's fingerprint: the reference runs without them, and they change at
every training step. Every shard's metadata repeats the manifest's header, so an edited
manifest, or a cache rebuilt under an open reader, is refused (schema and rules:
:mod:`~unlearn_kernels.train.cache_manifest`). Opening a cache against other inputs is a
``ValueError``. Only safetensors and JSON are read: nothing is unpickled. Reads are
memory-mapped slices, one batch at a time.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from unlearn_kernels.data.formats import TokenizedPairs, file_sha256, tokenizer_sha256
from unlearn_kernels.hf import (
    OutputHead,
    check_output_head,
    final_hidden_states,
    frozen_forward,
    output_head,
    unwrap_model,
)
from unlearn_kernels.ops.chunking import accumulate_dtype, chunk_rows
from unlearn_kernels.train.cache_manifest import (
    CACHE_FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_PATTERN,
    check_consistency,
    differing_fields,
    header,
    header_text,
    read_manifest,
)

DEFAULT_SHARD_BYTES = 256 * 2**20
#: Elements hashed per tensor by a sampled (not full) weight fingerprint.
SAMPLE_ELEMENTS = 4096
ROW_FIELDS = ("label", "hidden", "topk_index", "topk_logprob", "tail_logprob", "label_logprob")
_HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I32": torch.int32,
    "I64": torch.int64,
}
#: Config keys that do not change the forward pass.
_COSMETIC_CONFIG_KEYS = {
    "architectures",
    "dtype",
    "torch_dtype",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "transformers_version",
    "use_cache",
}


@dataclass(frozen=True)
class CacheSettings:
    """What a cache stores. ``topk=0`` stores no top-k; ``temperature`` applies to top-k only."""

    topk: int = 32
    temperature: float = 1.0
    store_hidden: bool = True
    store_label_logprob: bool = True
    hidden_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.hidden_dtype, torch.dtype):
            object.__setattr__(self, "hidden_dtype", str(self.hidden_dtype).removeprefix("torch."))
        if self.hidden_dtype not in _HIDDEN_DTYPES:
            raise ValueError(
                f"hidden_dtype must be one of {sorted(_HIDDEN_DTYPES)}, got {self.hidden_dtype!r}"
            )
        if not isinstance(self.topk, int) or self.topk < 0:
            raise ValueError(f"topk must be an int >= 0, got {self.topk!r}")
        if not 0.0 < float(self.temperature) < float("inf"):
            raise ValueError(f"temperature must be positive and finite, got {self.temperature!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        if not (self.topk or self.store_hidden or self.store_label_logprob):
            raise ValueError(
                "settings store nothing: set topk > 0, store_hidden or store_label_logprob"
            )

    def field_names(self) -> tuple[str, ...]:
        """The per-row tensors a cache with these settings holds (a subset of ``ROW_FIELDS``)."""
        stored = {
            "label": True,
            "hidden": self.store_hidden,
            "topk_index": self.topk > 0,
            "topk_logprob": self.topk > 0,
            "tail_logprob": self.topk > 0,
            "label_logprob": self.store_label_logprob,
        }
        return tuple(name for name in ROW_FIELDS if stored[name])


def _normalised_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters and buffers the reference uses, named as in the plain model: adapter tensors
    (PEFT ``adapter_layer_names`` such as ``lora_A``, ``modules_to_save``) are dropped and wrapper
    levels (``base_layer``, ``original_module``) removed, so a PEFT model with adapters disabled
    fingerprints like its base model."""
    base = unwrap_model(model)
    adapter_names = set()
    for module in base.modules():
        adapter_names.update(getattr(type(module), "adapter_layer_names", ()))
    named = []
    for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
        parts = name.split(".")
        if adapter_names.intersection(parts):
            continue
        named.append(
            (".".join(p for p in parts if p not in ("base_layer", "original_module")), tensor)
        )
    return sorted(named, key=lambda item: item[0])


def _hash_tensor(digest: Any, tensor: Tensor, full: bool) -> None:
    flat = tensor.detach().reshape(-1)
    if not full and flat.numel() > SAMPLE_ELEMENTS:
        flat = flat[torch.linspace(0, flat.numel() - 1, SAMPLE_ELEMENTS, device=flat.device).long()]
    digest.update(flat.contiguous().cpu().view(torch.uint8).numpy().data)


def model_fingerprint(
    model: nn.Module, *, full: bool = True, progress: bool = False
) -> dict[str, Any]:
    """Identity of the reference computed by ``model`` (with any PEFT adapters disabled).

    ``structure``: hash of parameter/buffer names, shapes and dtypes; ``weights``: hash of their
    values (every byte, or ``SAMPLE_ELEMENTS`` evenly spaced elements per tensor when not
    ``full``), including bitsandbytes quantisation state; ``config``: hash of the model config
    without cosmetic keys. ``progress`` shows a progress bar (bytes hashed) on stderr.
    """
    base = unwrap_model(model)
    structure, weights = hashlib.sha256(), hashlib.sha256()
    n_parameters = 0
    named = _normalised_parameters(model)
    total = sum(t.nbytes for _, t in named) if full else len(named)
    bar = tqdm(
        total=total,
        desc="hashing weights" if full else "sampling weights",
        unit="B" if full else "tensor",
        unit_scale=full,
        disable=not progress,
    )
    for name, tensor in named:
        structure.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        n_parameters += tensor.numel()
        _hash_tensor(weights, tensor, full)
        bar.update(tensor.nbytes if full else 1)
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            for key, value in sorted(quant_state.as_dict(packed=True).items()):
                weights.update(key.encode())
                _hash_tensor(weights, value, full)
        if getattr(tensor, "SCB", None) is not None:
            _hash_tensor(weights, tensor.SCB, full)
    bar.close()
    config = {
        key: value
        for key, value in base.config.to_dict().items()
        if not key.startswith("_") and key not in _COSMETIC_CONFIG_KEYS
    }
    config_text = json.dumps(config, sort_keys=True, default=str)
    return {
        "structure": structure.hexdigest(),
        "weights": weights.hexdigest(),
        "weights_hash": "full" if full else "sample",
        "config": hashlib.sha256(config_text.encode()).hexdigest(),
        "n_parameters": n_parameters,
    }


def _data_fingerprint(data: TokenizedPairs) -> dict[str, Any]:
    return {
        "content_sha256": data.content_sha256(),
        "source_sha256": data.source_sha256,
        "n_examples": len(data),
    }


def reference_rows(
    hidden: Tensor,
    head: OutputHead,
    labels: Tensor,
    settings: CacheSettings,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Top-k, tail and label log-probs of rows ``hidden [n, d]`` under ``head``, chunk by chunk.

    Returns the fields of ``settings`` other than ``label``/``hidden``, on ``hidden``'s device.
    """
    n, vocab = hidden.shape[0], head.weight.shape[0]
    k = settings.topk
    if k > vocab:
        raise ValueError(f"settings.topk={k} exceeds the vocabulary size {vocab}")
    acc = accumulate_dtype(head.weight.dtype)
    out = {}
    if k:
        out["topk_index"] = torch.empty(n, k, dtype=torch.int32, device=hidden.device)
        out["topk_logprob"] = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
        out["tail_logprob"] = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if settings.store_label_logprob:
        out["label_logprob"] = torch.empty(n, dtype=torch.float32, device=hidden.device)
    rows = chunk_rows(n, vocab, chunk_size, torch.finfo(acc).bits // 8)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        z = head.logits(hidden[start:end]).to(acc)
        lse = torch.logsumexp(z, dim=1)
        if settings.store_label_logprob:
            target = labels[start:end].long()[:, None]
            out["label_logprob"][start:end] = z.gather(1, target).squeeze(1) - lse
        if k:
            if settings.temperature != 1.0:
                z.div_(settings.temperature)
                lse = torch.logsumexp(z, dim=1)
            top, index = z.topk(k, dim=1)
            out["topk_index"][start:end] = index
            out["topk_logprob"][start:end] = top - lse[:, None]
            z.scatter_(1, index, float("-inf"))
            out["tail_logprob"][start:end] = torch.logsumexp(z, dim=1) - lse
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ShardWriter:
    """Buffers whole examples and writes a shard before its tensors would exceed ``max_bytes``.

    A shard's tensors take ``8 + Σ_examples (their rows' bytes + 8)`` bytes (the ``+ 8`` are
    ``row_offsets``); ``peak_bytes`` is the most ever buffered (writing a shard concatenates the
    buffer, briefly holding it twice).
    """

    def __init__(
        self, path: Path, names: Sequence[str], max_bytes: int, metadata: dict[str, str]
    ) -> None:
        self.path, self.names, self.max_bytes, self.metadata = path, names, max_bytes, metadata
        self.pending: list[dict[str, Tensor]] = []
        self.pending_bytes = self.peak_bytes = 8
        self.next_example = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, example: dict[str, Tensor]) -> None:
        """Buffer one example (its record fits a shard: checked by the caller up front)."""
        size = sum(t.nbytes for t in example.values()) + 8
        if self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.append(example)
        self.pending_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.pending_bytes)

    def flush(self) -> None:
        if not self.pending:
            return
        counts = torch.tensor([e["label"].shape[0] for e in self.pending], dtype=torch.int64)
        tensors = {"row_offsets": torch.cat([counts.new_zeros(1), counts.cumsum(0)])}
        for name in self.names:
            tensors[name] = torch.cat([e[name] for e in self.pending]).contiguous()
        file = self.path / SHARD_PATTERN.format(len(self.shards))
        save_file(tensors, str(file), metadata=self.metadata)
        _fsync(file)
        self.shards.append(
            {
                "file": file.name,
                "first_example": self.next_example,
                "n_examples": len(self.pending),
                "n_rows": int(counts.sum()),
                "tensor_bytes": sum(t.nbytes for t in tensors.values()),
                "bytes": file.stat().st_size,
                "sha256": file_sha256(file),
            }
        )
        self.next_example += len(self.pending)
        self.pending, self.pending_bytes = [], 8


def example_record_bytes(n_rows: int, hidden_size: int, settings: CacheSettings) -> int:
    """Bytes of a shard holding one example of ``n_rows`` response rows alone: the rows' tensors
    (as :class:`CacheSettings` stores them), the example's ``row_offsets`` entry and the shard's
    leading one. A shard's ``max_shard_bytes`` must be at least this for the largest example."""
    row = 4  # label, int32
    if settings.store_hidden:
        row += hidden_size * _HIDDEN_DTYPES[settings.hidden_dtype].itemsize
    if settings.topk:
        row += settings.topk * (4 + 4) + 4  # index int32, log-prob and tail fp32
    if settings.store_label_logprob:
        row += 4
    return 16 + n_rows * row


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _check_positive_int(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}"
        )


def _input_device(model: nn.Module, head: OutputHead) -> torch.device:
    """Where the token ids go: the input embedding's device (under a ``device_map`` the
    model's hooks move activations on from there), else the output layer's."""
    embedding = unwrap_model(model).get_input_embeddings()
    device = getattr(getattr(embedding, "weight", None), "device", None)
    return head.weight.device if device is None or device.type == "meta" else device


def build_reference_cache(
    model: nn.Module,
    data: TokenizedPairs,
    path: str | Path,
    settings: CacheSettings | None = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_size: int | None = None,
    full_weight_hash: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the frozen reference over ``data`` once and write a cache directory at ``path``.

    Args:
        model: a transformers causal LM, or a PEFT model whose adapters are disabled for the
            pass (the reference is the base model); on any device or ``device_map``, its output
            layer in memory.
        data: the examples, processed ``batch_size`` at a time (right-padded).
        settings: what to store (default :class:`CacheSettings`).
        tokenizer: recorded in the fingerprint when given.
        max_shard_bytes: bound on the tensors of one shard, and so on what the writer holds.
        chunk_size: rows of reference logits formed at once (default: a 256 MiB budget).
        full_weight_hash: hash every weight byte (else a sample per tensor; faster on big models).
        overwrite: replace an existing cache at ``path``.
        progress: progress bars on stderr for the weight hash and the pass over the data.

    Every argument is checked before anything is written: a bad one leaves ``path`` untouched.

    Returns:
        The manifest (also written to ``path/manifest.json``); its ``build_seconds`` is the
        wall time of this call, fingerprinting included.
    """
    started = time.perf_counter()
    settings = settings or CacheSettings()
    if not isinstance(settings, CacheSettings):
        raise ValueError(f"settings must be a CacheSettings, got {type(settings).__name__}")
    if not isinstance(data, TokenizedPairs):
        raise ValueError(f"data must be a TokenizedPairs, got {type(data).__name__}")
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_shard_bytes", max_shard_bytes)
    _check_positive_int("chunk_size", chunk_size, optional=True)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path {str(path)!r} exists and is not a directory")
    if (path / MANIFEST).exists() and not overwrite:
        raise ValueError(f"path {str(path)!r} already holds a reference cache (overwrite=False)")
    head = output_head(model)
    if head.weight.device.type == "meta":
        raise ValueError(
            "model's output layer is offloaded (on the meta device): the reference logits need "
            "lm_head in memory; use a device map that keeps it on a device"
        )
    vocab, hidden_size = head.weight.shape
    if settings.topk > vocab:
        raise ValueError(f"settings.topk={settings.topk} exceeds the vocabulary size {vocab}")
    labels = data.labels()
    largest = example_record_bytes(int((labels != -100).sum(1).max()), hidden_size, settings)
    if largest > max_shard_bytes:
        raise ValueError(
            f"max_shard_bytes={max_shard_bytes} is smaller than the largest example's record "
            f"({largest} bytes): raise it"
        )
    manifest: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "version": FORMAT_VERSION,
        "build_id": secrets.token_hex(16),
        "settings": asdict(settings),
        "fingerprint": {
            "model": model_fingerprint(model, full=full_weight_hash, progress=progress),
            "data": _data_fingerprint(data),
            "tokenizer": None if tokenizer is None else tokenizer_sha256(tokenizer),
        },
        "hidden_size": hidden_size,
        "vocab_size": vocab,
        "n_examples": len(data),
        "n_rows": int((labels != -100).sum()),
    }

    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).unlink(missing_ok=True)
    for stale in path.glob("shard-*.safetensors"):
        stale.unlink()
    names = settings.field_names()
    metadata = {"format": CACHE_FORMAT, "header": header_text(manifest)}
    writer = _ShardWriter(path, names, max_shard_bytes, metadata)
    hidden_dtype = _HIDDEN_DTYPES[settings.hidden_dtype]
    bar = tqdm(total=len(data), desc="reference pass", unit="example", disable=not progress)
    with frozen_forward(model, disable_adapters=True):
        device = _input_device(model, head)
        for start, batch in data.batches(batch_size):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            if start == 0:
                check_output_head(model, ids[:1], mask[:1])
            labels = batch.labels()
            valid = labels != -100
            states = final_hidden_states(model, ids, mask)
            rows = states[valid.to(states.device)].to(head.weight.device)
            target = labels[valid]
            record = {"label": target.to(torch.int32)}
            record.update(reference_rows(rows, head, target.to(rows.device), settings, chunk_size))
            if settings.store_hidden:
                record["hidden"] = rows.to(hidden_dtype)
            offsets = [0, *valid.sum(1).cumsum(0).tolist()]
            record = {name: record[name].cpu() for name in names}
            for first, end in itertools.pairwise(offsets):  # copies: no view pins the batch
                writer.add({name: record[name][first:end].clone() for name in names})
            bar.update(len(batch))
    writer.flush()
    bar.close()

    manifest.update(
        max_shard_bytes=max_shard_bytes,
        peak_buffered_bytes=writer.peak_bytes,
        build_seconds=round(time.perf_counter() - started, 3),
        shards=writer.shards,
    )
    _write_json_atomically(path / MANIFEST, manifest)
    return manifest


@dataclass(frozen=True, eq=False)
class ReferenceBatch:
    """Cached reference rows of some examples, packed: example ``j`` owns rows
    ``row_offsets[j]:row_offsets[j+1]``. Fields the cache does not store are ``None``;
    ``label`` and ``topk_index`` are int64."""

    example_index: Tensor
    row_offsets: Tensor
    label: Tensor
    hidden: Tensor | None = None
    topk_index: Tensor | None = None
    topk_logprob: Tensor | None = None
    tail_logprob: Tensor | None = None
    label_logprob: Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the batch's tensors."""
        return sum(t.nbytes for f in fields(self) if (t := getattr(self, f.name)) is not None)

    def sequence_logprob(self) -> Tensor:
        """``[b]`` reference log-likelihood of each example's response: ``Σ_t label_logprob``."""
        if self.label_logprob is None:
            raise ValueError("the cache stores no label_logprob (store_label_logprob=False)")
        owner = torch.repeat_interleave(
            torch.arange(len(self.example_index)), self.row_offsets.diff()
        )
        total = torch.zeros(len(self.example_index), dtype=self.label_logprob.dtype)
        return total.index_add_(0, owner, self.label_logprob)

    def to_padded(self, name: str, labels: Tensor, ignore_index: int = -100) -> Tensor:
        """Field ``name`` scattered to ``labels``' ``[B, T]`` layout (zeros on ignored rows).

        The result goes into the fused ops as it is, with the same ``labels``: e.g.
        ``fused_linear_kl_topk(h, W, *(b.to_padded(f, labels) for f in ("topk_index",
        "topk_logprob", "tail_logprob")), labels=labels)``; they never read ignored rows.

        ``labels`` must be this batch's examples in order; a row count or label that differs
        from the cache's is a ``ValueError`` (different data, tokenisation or order).
        """
        value = getattr(self, name) if name in ROW_FIELDS else None
        if value is None:
            raise ValueError(f"name {name!r} is not a per-row field stored in this cache")
        if labels.dim() != 2 or labels.shape[0] != len(self.example_index):
            raise ValueError(
                f"labels must be [B, T] with B={len(self.example_index)}, got {list(labels.shape)}"
            )
        valid = labels.long() != ignore_index
        if not torch.equal(valid.sum(1).cpu(), self.row_offsets.diff()):
            raise ValueError(
                "labels have a different number of response rows per example than the cache: "
                f"{valid.sum(1).tolist()} vs {self.row_offsets.diff().tolist()}"
            )
        if not torch.equal(labels[valid].cpu().long(), self.label):
            raise ValueError("labels differ from the cached reference's target tokens")
        out = value.new_zeros(*labels.shape, *value.shape[1:])
        out[valid.cpu()] = value
        return out.to(labels.device)


class ReferenceCache:
    """A built cache, opened for reading.

    Opening validates ``manifest.json`` against its schema (see
    :mod:`~unlearn_kernels.train.cache_manifest`: every field is checked or held to the shards)
    and every shard's size, tensor shapes and copy of the manifest's header, then the
    fingerprints given. Shards are hashed on first read when ``verify``, and every later read
    checks that the shard still belongs to the cache that was opened, so a cache rebuilt or
    edited under an open reader is refused rather than served.

    Args:
        path: the cache directory.
        model: the model to be trained against it (its adapter-free fingerprint must match),
            or ``None`` to skip that check explicitly (required: omitting it is a ``ValueError``).
        data: the data it is used with (token content, and file hash when both are known),
            or ``None`` to skip (required, as ``model``).
        tokenizer: checked when given and the cache records one (a cache built from
            pre-tokenised data may not; its token content is checked through ``data``).
        settings: the settings expected (all fields must match), or ``None``.
        verify: check each shard's SHA-256 the first time it is read.

    :meth:`open` opens with no inputs to compare against (the integrity checks only).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        model: nn.Module | Literal["unset"] | None = "unset",
        data: TokenizedPairs | Literal["unset"] | None = "unset",
        tokenizer: Any = None,
        settings: CacheSettings | None = None,
        verify: bool = True,
    ) -> None:
        for name, value in (("model", model), ("data", data)):
            if isinstance(value, str) and value == "unset":
                raise ValueError(
                    f"{name}: pass the {name} the cache is used with, or {name}=None to skip "
                    "that check explicitly (ReferenceCache.open(path) skips both)"
                )
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise ValueError(
                f"path {str(self.path)!r} holds no complete reference cache: {MANIFEST} is missing "
                "(the build was interrupted or never run); rebuild it"
            )
        self.manifest = read_manifest(manifest_file)
        try:
            self.settings = CacheSettings(**self.manifest["settings"])
        except ValueError as err:
            raise ValueError(f"{manifest_file} field settings: {err}; rebuild the cache") from err
        self._header = header(self.manifest)
        self.verify = verify
        self._verified: set[str] = set()
        self._offsets: dict[int, Tensor] = {}
        self._first = [s["first_example"] for s in self.manifest["shards"]]
        for shard_id in range(len(self.manifest["shards"])):
            with self._open_shard(shard_id, hash_check=False) as f:
                self._check_shard_layout(shard_id, f)
        check_consistency(manifest_file, self.manifest)
        self._check_fingerprint(model, data, tokenizer, settings)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> ReferenceCache:
        """Open the cache at ``path`` with the checks that need no inputs: the manifest, the
        shards' sizes, shapes and headers (and their SHA-256 on first read when ``verify``).
        Nothing ties it to a model or data set: prefer the constructor when you have them."""
        return cls(path, model=None, data=None, verify=verify)

    def _shard_problem(self, shard_id: int, message: str) -> ValueError:
        file = self.path / self.manifest["shards"][shard_id]["file"]
        return ValueError(f"shard {file} {message}")

    def _open_shard(self, shard_id: int, *, hash_check: bool = True) -> Any:
        """The shard opened for reading, after checking that its size and header are those of
        the cache opened (and, first time and with ``verify``, its SHA-256)."""
        shard = self.manifest["shards"][shard_id]
        file = self.path / shard["file"]
        size = file.stat().st_size if file.is_file() else None
        if size != shard["bytes"]:
            raise self._shard_problem(
                shard_id,
                f"is {'missing' if size is None else f'{size} bytes'}, field "
                f"shards.{shard_id}.bytes of {MANIFEST} says {shard['bytes']}: the cache is "
                "truncated, damaged or was rebuilt since it was opened; rebuild or reopen it",
            )
        if hash_check and self.verify and shard["file"] not in self._verified:
            if file_sha256(file) != shard["sha256"]:
                raise self._shard_problem(
                    shard_id,
                    f"does not match its SHA-256 (field shards.{shard_id}.sha256 of {MANIFEST}): "
                    "the cache is damaged",
                )
            self._verified.add(shard["file"])
        handle = safe_open(str(file), framework="pt")
        try:
            recorded = json.loads((handle.metadata() or {}).get("header", "null"))
        except json.JSONDecodeError:
            recorded = None
        if recorded != self._header:
            fields_ = differing_fields(self._header, recorded) if recorded else ["(all)"]
            raise self._shard_problem(
                shard_id,
                f"records other values for {', '.join('field ' + f for f in fields_)} than "
                f"{MANIFEST}: the manifest "
                "was edited, or the cache was rebuilt since it was opened; rebuild or reopen it",
            )
        return handle

    def _check_shard_layout(self, shard_id: int, f: Any) -> None:
        """The shard's tensors (names, shapes, dtypes, bytes) are those its manifest entry and
        the settings describe; read from the safetensors header only."""
        shard = self.manifest["shards"][shard_id]
        n, e = shard["n_rows"], shard["n_examples"]
        s = self.settings
        expected = {"row_offsets": ((e + 1,), torch.int64), "label": ((n,), torch.int32)}
        if s.store_hidden:
            expected["hidden"] = ((n, self.manifest["hidden_size"]), _HIDDEN_DTYPES[s.hidden_dtype])
        if s.topk:
            expected["topk_index"] = ((n, s.topk), torch.int32)
            expected["topk_logprob"] = ((n, s.topk), torch.float32)
            expected["tail_logprob"] = ((n,), torch.float32)
        if s.store_label_logprob:
            expected["label_logprob"] = ((n,), torch.float32)
        found = {}
        for name in f.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            piece = f.get_slice(name)
            found[name] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(piece.get_dtype()))
        for name, field, count in (
            ("row_offsets", "n_examples", lambda shape: shape[0] - 1),
            ("label", "n_rows", lambda shape: shape[0]),
        ):
            shape = found.get(name, expected[name])[0]
            if shape != expected[name][0]:
                raise ValueError(
                    f"{self.path / MANIFEST} field shards.{shard_id}.{field}: {shard[field]} "
                    f"but the shard holds {count(shape)}; rebuild the cache"
                )
        if found != expected:
            wrong = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            raise self._shard_problem(
                shard_id, f"holds tensors {', '.join(wrong)} unlike the settings: rebuild the cache"
            )
        nbytes = sum(
            torch.Size(shape).numel() * dtype.itemsize for shape, dtype in expected.values()
        )
        if nbytes != shard["tensor_bytes"]:
            raise ValueError(
                f"{self.path / MANIFEST} field shards.{shard_id}.tensor_bytes: "
                f"{shard['tensor_bytes']} but the shard holds {nbytes}; rebuild the cache"
            )

    def _check_fingerprint(
        self,
        model: nn.Module | None,
        data: TokenizedPairs | None,
        tokenizer: Any,
        settings: CacheSettings | None,
    ) -> None:
        recorded = self.manifest["fingerprint"]
        problems = []
        if model is not None:
            full = recorded["model"]["weights_hash"] == "full"
            actual = model_fingerprint(model, full=full)
            problems += [
                f"model {key}"
                for key in ("structure", "weights", "config")
                if actual[key] != recorded["model"][key]
            ]
        if data is not None:
            actual = _data_fingerprint(data)
            if actual["content_sha256"] != recorded["data"]["content_sha256"]:
                problems.append("data tokens")
            if None not in (actual["source_sha256"], recorded["data"]["source_sha256"]) and (
                actual["source_sha256"] != recorded["data"]["source_sha256"]
            ):
                problems.append("data file")
        if tokenizer is not None and recorded["tokenizer"] not in (
            None,
            tokenizer_sha256(tokenizer),
        ):
            problems.append("tokenizer")
        if settings is not None and settings != self.settings:
            problems += [
                f"setting {f.name} ({getattr(settings, f.name)!r} vs cached "
                f"{getattr(self.settings, f.name)!r})"
                for f in fields(settings)
                if getattr(settings, f.name) != getattr(self.settings, f.name)
            ]
        if problems:
            raise ValueError(
                f"reference cache {str(self.path)!r} was built from other inputs — mismatched: "
                f"{', '.join(problems)}; rebuild it for these inputs"
            )

    def __len__(self) -> int:
        return self.manifest["n_examples"]

    def _row_offsets(self, shard_id: int) -> Tensor:
        if shard_id not in self._offsets:
            with self._open_shard(shard_id) as f:
                self._offsets[shard_id] = f.get_tensor("row_offsets")
        return self._offsets[shard_id]

    def _runs(self, indices: list[int]) -> Iterator[tuple[int, int, int]]:
        """``(shard, first local example, end)`` for maximal runs of consecutive indices."""
        j = 0
        while j < len(indices):
            shard_id = bisect.bisect_right(self._first, indices[j]) - 1
            shard = self.manifest["shards"][shard_id]
            local = indices[j] - shard["first_example"]
            end = local + 1
            while (
                j + 1 < len(indices)
                and indices[j + 1] == indices[j] + 1
                and end < shard["n_examples"]
            ):
                j, end = j + 1, end + 1
            j += 1
            yield shard_id, local, end

    def batch(self, indices: Sequence[int]) -> ReferenceBatch:
        """The cached rows of examples ``indices`` (any order), read as memory-mapped slices."""
        indices = [int(i) for i in indices]
        if not indices or min(indices) < 0 or max(indices) >= len(self):
            raise ValueError(f"indices must be a non-empty list in [0, {len(self)}), got {indices}")
        names = self.settings.field_names()
        pieces: dict[str, list[Tensor]] = {name: [] for name in names}
        counts = []
        for shard_id, local, end in self._runs(indices):
            offsets = self._row_offsets(shard_id)
            first, last = int(offsets[local]), int(offsets[end])
            counts.append(offsets[local : end + 1].diff())
            with self._open_shard(shard_id) as f:
                for name in names:
                    pieces[name].append(f.get_slice(name)[first:last])
        counts = torch.cat(counts)
        values = {
            name: parts[0] if len(parts) == 1 else torch.cat(parts)
            for name, parts in pieces.items()
        }
        for name in ("label", "topk_index"):
            if name in values:
                values[name] = values[name].long()
        return ReferenceBatch(
            example_index=torch.tensor(indices, dtype=torch.int64),
            row_offsets=torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
            **values,
        )

    def row_bytes(self) -> int:
        """Bytes of one row in a :class:`ReferenceBatch` (``label``/``topk_index`` as int64)."""
        s = self.settings
        size = 8
        if s.store_hidden:
            size += self.manifest["hidden_size"] * _HIDDEN_DTYPES[s.hidden_dtype].itemsize
        if s.topk:
            size += s.topk * (8 + 4) + 4
        if s.store_label_logprob:
            size += 4
        return size

    def iter_batches(
        self, *, batch_size: int | None = None, max_bytes: int | None = None
    ) -> Iterator[ReferenceBatch]:
        """Consecutive examples in batches of at most ``batch_size`` examples and at most
        ``max_bytes`` of tensors (:attr:`ReferenceBatch.nbytes`); one batch is held at a time."""
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        row_bytes = self.row_bytes()
        current: list[int] = []
        size = 8  # the leading row offset
        for shard_id, shard in enumerate(self.manifest["shards"]):
            counts = self._row_offsets(shard_id).diff().tolist()
            for local, count in enumerate(counts):
                example_bytes = 16 + count * row_bytes  # its index, its offset, its rows
                if max_bytes is not None and 8 + example_bytes > max_bytes:
                    raise ValueError(
                        f"max_bytes={max_bytes} is smaller than example "
                        f"{shard['first_example'] + local}'s {8 + example_bytes} bytes"
                    )
                full = (batch_size is not None and len(current) == batch_size) or (
                    max_bytes is not None and size + example_bytes > max_bytes
                )
                if full:
                    yield self.batch(current)
                    current, size = [], 8
                current.append(shard["first_example"] + local)
                size += example_bytes
        if current:
            yield self.batch(current)
