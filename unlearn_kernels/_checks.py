"""Input validation shared by the public ops: every failure is a ``ValueError`` naming the
argument and what was expected.

Shapes, dtypes, devices and label ranges are always checked. Finiteness costs a read of every
input, so it is checked only with ``UNLEARN_KERNELS_CHECK_FINITE=1`` (for debugging a run
whose loss went NaN: the error names the first non-finite input).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_finite(**tensors: Tensor | None) -> None:
    """With ``UNLEARN_KERNELS_CHECK_FINITE=1``: every given tensor holds only finite values."""
    if os.environ.get("UNLEARN_KERNELS_CHECK_FINITE") != "1":
        return
    for name, value in tensors.items():
        if value is not None and not bool(torch.isfinite(value.detach()).all()):
            count = int((~torch.isfinite(value.detach())).sum())
            raise ValueError(f"{name} holds {count} non-finite value(s) (NaN or ±inf)")


def check_linear(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, *, weight_name: str = "weight"
) -> tuple[int, int]:
    """Check ``hidden [N, d] | [B, T, d]``, ``weight [V, d]``, ``bias [V]``; return ``(V, d)``."""
    check_tensor("hidden", hidden)
    check_tensor(weight_name, weight)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, d] or [B, T, d], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"hidden must be float32, float16, bfloat16 (or float64), got {hidden.dtype}"
        )
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"{weight_name} must be [V, d] with d={d}, got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError(f"{weight_name} has an empty vocabulary (V=0)")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{weight_name} dtype {weight.dtype} must match hidden dtype {hidden.dtype}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"{weight_name} is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(f"bias must be [V]=[{vocab}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(
                f"bias must be {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}"
            )
    return vocab, d


def check_labels(labels: Tensor, hidden: Tensor, vocab: int, ignore_index: int) -> None:
    """``labels`` has ``hidden``'s leading shape and values in ``[0, V) ∪ {ignore_index}``."""
    check_tensor("labels", labels)
    lead = tuple(hidden.shape[:-1])
    if tuple(labels.shape) != lead:
        raise ValueError(
            f"labels must have shape {lead} (hidden without d), got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, found {value}"
        )


def check_token_weight(token_weight: Tensor | None, hidden: Tensor) -> None:
    if token_weight is None:
        return
    check_tensor("token_weight", token_weight)
    lead = tuple(hidden.shape[:-1])
    if tuple(token_weight.shape) != lead:
        raise ValueError(f"token_weight must have shape {lead}, got {tuple(token_weight.shape)}")
    if not token_weight.is_floating_point():
        raise ValueError(f"token_weight must be a float tensor, got {token_weight.dtype}")
    if token_weight.device != hidden.device:
        raise ValueError(
            f"token_weight is on {token_weight.device} but hidden is on {hidden.device}"
        )


def check_options(reduction: str, chunk_size: int | None, softcap: float | None = None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if softcap is not None and not (0.0 < float(softcap) < float("inf")):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
