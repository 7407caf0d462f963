"""The memory a QLoRA unlearning run needs, derived from the model config.

What a step of ``unlearn-kernels run`` with ``adapter.kind: qlora``, an 8-bit AdamW and gradient
checkpointing holds, part by part (``b`` = bytes of the compute dtype, ``N`` = tokens of one
micro-batch, ``n`` = its response rows, at most ``N``)::

    nf4 weights      decoder linears: 0.5 byte per weight + a float32 absmax per 64
    dense weights    embeddings, lm_head (unless tied), norms: b per weight
    LoRA             r·(in + out) per adapted linear, float32; its gradient likewise, one per
                     task buffer (two for NGDiff)
    8-bit AdamW      2 bytes per LoRA weight + two float32 absmax per 256 (tensors below 4096
                     elements keep float32 states: 8 bytes per weight)
    checkpoints      every layer's input, N·d·b per layer
    one layer        the layer recomputed in backward: its saved activations and their
                     gradients, N·(8d + 3·d_kv + 6·I)·b, two float32 norm inputs N·2d·4, and one
                     dequantised weight, max(I·d, d·d)·b
    fused loss       the gradient of the hidden states N·d·b and the buffers of the chunk
                     plan CUDA would make (:func:`~unlearn_kernels.ops.chunking.plan_chunks`,
                     m rows): one chunk of logits m·V·4 (fp32 logits for b = 2) and their
                     gradient cast m·V·b, the chunk's rows m·d·b; for KL a second chunk of
                     logits and of reference rows

The total is the weights, LoRA, its gradients, the optimizer state and the checkpoints, plus the
larger of one layer and the fused loss: the loss's buffers are freed when its forward ends (its
gradient is computed there), before backward recomputes the first layer. Nothing here holds
``N·V`` logits: that is what the fused losses remove (for Llama-3-8B at 2048 tokens, 1 GB in
bf16 and as much again for their gradient). The estimate leaves out the CUDA context and the
allocator's cached blocks (on GPU), the interpreter and libraries (on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from unlearn_kernels.ops.chunking import plan_chunks

#: The decoder linears of a Llama-style layer: ``name -> (in_features, out_features)`` as
#: functions of ``(d, d_kv, d_q, I)``.
_LINEARS = {
    "q_proj": lambda d, kv, q, i: (d, q),
    "k_proj": lambda d, kv, q, i: (d, kv),
    "v_proj": lambda d, kv, q, i: (d, kv),
    "o_proj": lambda d, kv, q, i: (q, d),
    "gate_proj": lambda d, kv, q, i: (d, i),
    "up_proj": lambda d, kv, q, i: (d, i),
    "down_proj": lambda d, kv, q, i: (i, d),
}
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size (one float32 absmax each)
ADAM8_BLOCK = 256  # bitsandbytes' 8-bit optimizer block size (two float32 absmax each)
ADAM8_MIN_SIZE = 4096  # smaller tensors keep float32 optimizer states


@dataclass(frozen=True)
class QLoRAMemory:
    """Bytes of each part of a QLoRA unlearning step (see the module docstring)."""

    nf4_weights: int
    dense_weights: int
    lora: int
    lora_grads: int
    optimizer: int
    checkpoints: int
    one_layer: int
    fused_loss: int

    @property
    def total(self) -> int:
        """Everything that stays, plus the larger of the two working sets."""
        working = ("one_layer", "fused_loss")
        stays = sum(getattr(self, f.name) for f in fields(self) if f.name not in working)
        return stays + max(self.one_layer, self.fused_loss)

    def table(self) -> str:
        """One line per part and the total (see :attr:`total`), in GB (10⁹ bytes)."""
        rows = [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)]
        lines = [
            f"{name:<14}{value / 1e9:8.2f} GB" for name, value in [*rows, ("total", self.total)]
        ]
        return "\n".join(lines)


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    value = getattr(config, key, default)
    return default if value is None else value


def qlora_memory(
    config: Any,
    *,
    tokens: int,
    response_tokens: int | None = None,
    lora_rank: int = 8,
    targets: tuple[str, ...] = tuple(_LINEARS),
    compute_bytes: int = 2,
    task_buffers: int = 1,
    kl: bool = False,
) -> QLoRAMemory:
    """The parts of a QLoRA step on a Llama-style ``config`` (a transformers config or a
    mapping of its keys).

    Args:
        tokens: ``N``, the tokens of one micro-batch of one set (batch size × padded length).
        response_tokens: ``n``, its rows that carry a loss (default ``N``).
        lora_rank: LoRA ``r``; ``targets`` the adapted linears (default: all of them).
        compute_bytes: ``b``, bytes of the compute dtype and of the unquantised weights.
        task_buffers: gradient buffers of the LoRA weights (NGDiff keeps two).
        kl: the method reads a cached reference for a forward KL (``kl``, ``yao``, ``graddiff``
            with ``retain_loss: kl``).
    """
    d = _get(config, "hidden_size")
    layers = _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    head_dim = _get(config, "head_dim", d // heads)
    d_q = heads * head_dim
    d_kv = _get(config, "num_key_value_heads", heads) * head_dim
    inter = _get(config, "intermediate_size")
    vocab = _get(config, "vocab_size")
    tied = _get(config, "tie_word_embeddings", False)
    n = tokens if response_tokens is None else response_tokens
    b = compute_bytes

    shapes = [_LINEARS[name](d, d_kv, d_q, inter) for name in _LINEARS]
    quantised = layers * sum(i * o for i, o in shapes)
    nf4 = quantised // 2 + 4 * math.ceil(quantised / NF4_BLOCK)
    dense = b * (vocab * d * (1 if tied else 2) + layers * 2 * d + d)
    # LoRA A (r × in) and B (out × r) of each target are separate tensors
    pieces = [lora_rank * size for t in targets for size in _LINEARS[t](d, d_kv, d_q, inter)]
    lora = 4 * layers * sum(pieces)

    def adam8(size: int) -> int:
        if size < ADAM8_MIN_SIZE:
            return 8 * size
        return 2 * size + 8 * math.ceil(size / ADAM8_BLOCK)

    optimizer = layers * sum(adam8(size) for size in pieces)
    checkpoints = layers * tokens * d * b
    one_layer = (
        tokens * (8 * d + 3 * d_kv + 6 * inter) * b
        + tokens * 2 * d * 4
        + max(inter * d, d_q * d) * b
    )
    dtype = {2: torch.bfloat16, 4: torch.float32}.get(b)
    if dtype is None:
        raise ValueError(f"compute_bytes must be 2 or 4, got {compute_bytes!r}")
    plan = plan_chunks(max(n, 1), vocab, d, dtype, "cuda")
    fused = tokens * d * b + sum(plan.buffer_bytes(1 + kl, 1 + kl).values())
    return QLoRAMemory(
        nf4_weights=nf4,
        dense_weights=dense,
        lora=lora,
        lora_grads=lora * task_buffers,
        optimizer=optimizer,
        checkpoints=checkpoints,
        one_layer=one_layer,
        fused_loss=fused,
    )
