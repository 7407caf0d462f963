"""Input validation shared by the public ops: every failure is a ``ValueError`` naming the
argument and what was expected.

Shapes, dtypes, devices and label ranges are always checked. Finiteness costs a read of every
input, so it is checked only with ``UNLEARN_KERNELS_CHECK_FINITE=1`` (for debugging a run
whose loss went NaN: the error names the first non-finite input). Per-row reference values
(reference logits, top-k log-probs) are checked, like every per-row value check, only on the
rows that carry a loss: rows the op skips are never read.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
KL_REDUCTIONS = ("mean", "sum", "none", "batchmean")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16)
#: Rows per block when a per-row reference tensor (possibly memory-mapped) is checked.
_CHECK_BLOCK_ROWS = 4096


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it holds no data)")
    return value


def finite_checking() -> bool:
    return os.environ.get("UNLEARN_KERNELS_CHECK_FINITE") == "1"


def check_finite(**tensors: Tensor | None) -> None:
    """With ``UNLEARN_KERNELS_CHECK_FINITE=1``: every given tensor holds only finite values."""
    if not finite_checking():
        return
    for name, value in tensors.items():
        if value is not None and not bool(torch.isfinite(value.detach()).all()):
            count = int((~torch.isfinite(value.detach())).sum())
            raise ValueError(f"{name} holds {count} non-finite value(s) (NaN or ±inf)")


def check_log_values(
    n_rows: int, rows: Tensor | None, *, nonempty: bool = False, **tensors: Tensor | None
) -> None:
    """With ``UNLEARN_KERNELS_CHECK_FINITE=1``: the rows that carry a loss (``rows``, a bool
    ``[n_rows]`` mask; every row when ``None``) of each tensor (``[*lead, ...]`` with
    ``n_rows`` lead elements) hold no NaN or +inf; ``−inf`` is a zero probability. With
    ``nonempty`` (logits of a distribution), every such row also has an entry above ``−inf``.
    Read in blocks of rows, so a memory-mapped tensor is never loaded whole."""
    if not finite_checking():
        return
    for name, value in tensors.items():
        if value is None:
            continue
        flat = value.detach().reshape(n_rows, -1)
        index = torch.arange(n_rows) if rows is None else rows.cpu().nonzero().squeeze(1)
        for start in range(0, index.numel(), _CHECK_BLOCK_ROWS):
            picked = index[start : start + _CHECK_BLOCK_ROWS]
            block = flat.index_select(0, picked.to(flat.device))
            bad = torch.isnan(block) | (block == float("inf"))
            if bool(bad.any()):
                raise ValueError(
                    f"{name} holds {int(bad.sum())} NaN or +inf value(s) in rows that carry a "
                    "loss (−inf, a zero probability, is allowed)"
                )
            empty = (block == float("-inf")).all(dim=1)
            if nonempty and bool(empty.any()):
                row = int(picked[empty.nonzero()[0, 0].cpu()])
                raise ValueError(
                    f"{name} row {row} is −inf everywhere: its reference distribution is undefined"
                )


def check_linear(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    weight_name: str = "weight",
    bias_name: str = "bias",
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
    if d == 0:
        raise ValueError(f"hidden must have d >= 1 features, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"{weight_name} must be [V, d] with d={d}, got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError(f"{weight_name} has an empty vocabulary (V=0)")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{weight_name} dtype {weight.dtype} must match hidden dtype {hidden.dtype} "
            "(or call the loss under torch.autocast, which casts both to its dtype)"
        )
    if weight.device != hidden.device:
        raise ValueError(f"{weight_name} is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_tensor(bias_name, bias)
        if bias.shape != (vocab,):
            raise ValueError(f"{bias_name} must be [V]=[{vocab}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(
                f"{bias_name} must be {hidden.dtype} on {hidden.device}, "
                f"got {bias.dtype} on {bias.device}"
            )
    return vocab, d


def check_backend_dtype(backend: str, hidden: Tensor) -> None:
    """The chosen backend supports ``hidden``'s dtype (Triton: no float64)."""
    if backend == "triton" and hidden.dtype == torch.float64:
        raise ValueError(
            "hidden is float64, which backend='triton' does not support: use float32/bf16/fp16, "
            "or backend='torch'/'cpu' for float64 (e.g. gradcheck)"
        )


def check_labels(labels: Tensor, hidden: Tensor, vocab: int, ignore_index: int) -> None:
    """``labels`` has ``hidden``'s leading shape and values in ``[0, V) ∪ {ignore_index}``,
    compared in int64; ``ignore_index`` must be a value of ``labels``' dtype."""
    check_tensor("labels", labels)
    lead = tuple(hidden.shape[:-1])
    if tuple(labels.shape) != lead:
        raise ValueError(
            f"labels must have shape {lead} (hidden without d), got {tuple(labels.shape)}"
        )
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(
            f"ignore_index={ignore_index} is no {labels.dtype} value (range [{info.min}, "
            f"{info.max}]), so no label could be ignored: pass an ignore_index in that range "
            "or int64 labels"
        )
    wide = labels.long()
    bad = (wide != ignore_index) & ((wide < 0) | (wide >= vocab))
    if bool(bad.any()):
        value = int(wide[bad][0])
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


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def check_options(
    reduction: str,
    chunk_size: int | None,
    softcap: float | None = None,
    reductions: tuple[str, ...] = REDUCTIONS,
) -> None:
    if not isinstance(reduction, str) or reduction not in reductions:
        raise ValueError(f"reduction must be one of {reductions}, got {reduction!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if softcap is not None:
        _positive_float("softcap", softcap)


def check_temperature(temperature: float) -> float:
    """``τ`` as a positive finite float."""
    return _positive_float("temperature", temperature)


def check_flags(**flags: object) -> None:
    """Each flag is a ``bool``."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def check_real(
    name: str, value: object, low: float, high: float, *, high_open: bool = False
) -> float:
    """A real number in ``[low, high]`` (``[low, high)`` with ``high_open``), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    above = value >= high if high_open else value > high
    if not low <= value or above:
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}{right}, got {value!r}")
    return value


def check_class_weight(
    class_weight: Tensor | None, vocab: int | None = None, device: torch.device | None = None
) -> None:
    """``class_weight`` is a finite, non-negative float ``[V]`` (``[vocab]`` and on ``device``
    when given)."""
    if class_weight is None:
        return
    check_tensor("class_weight", class_weight)
    shape_ok = class_weight.dim() == 1 and vocab in (None, class_weight.shape[0])
    if not shape_ok or not class_weight.is_floating_point():
        expected = "[V]" if vocab is None else f"[V]=[{vocab}]"
        raise ValueError(
            f"class_weight must be a float tensor of shape {expected}, "
            f"got {class_weight.dtype} of shape {tuple(class_weight.shape)}"
        )
    if device is not None and class_weight.device != device:
        raise ValueError(f"class_weight is on {class_weight.device} but hidden is on {device}")
    values = class_weight.detach()
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError("class_weight must hold finite, non-negative values")


def loss_rows(
    labels: Tensor | None, token_weight: Tensor | None, ignore_index: int
) -> Tensor | None:
    """Bool ``[N]`` mask of the (flattened) rows that carry a loss — label ≠ ``ignore_index``
    and token weight ≠ 0 — or ``None`` when neither is given (every row)."""
    if labels is None and token_weight is None:
        return None
    keep = None if labels is None else labels.reshape(-1).long() != ignore_index
    if token_weight is not None:
        nonzero = token_weight.reshape(-1) != 0
        keep = nonzero if keep is None else keep & nonzero
    return keep


def check_selection(
    labels: Tensor | None, token_weight: Tensor | None, hidden: Tensor, vocab: int, ignore: int
) -> None:
    if labels is not None:
        check_labels(labels, hidden, vocab, ignore)
    check_token_weight(token_weight, hidden)


def check_reference(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    ref_bias: Tensor | None,
    ref_logits: Tensor | None,
) -> None:
    """Exactly one of ``ref_hidden`` (``hidden``'s shape, any float dtype; with the reference
    head ``ref_weight``/``ref_bias`` in ``hidden``'s dtype) and ``ref_logits`` (``hidden``'s
    leading shape × V, any float dtype and device)."""
    if (ref_hidden is None) == (ref_logits is None):
        raise ValueError("pass exactly one of ref_hidden (exact) and ref_logits (streamed)")
    vocab = weight.shape[0]
    if ref_hidden is not None:
        check_tensor("ref_hidden", ref_hidden)
        if ref_hidden.shape != hidden.shape:
            raise ValueError(
                f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, "
                f"got {tuple(ref_hidden.shape)}"
            )
        if not ref_hidden.is_floating_point() or ref_hidden.device != hidden.device:
            raise ValueError(
                f"ref_hidden must be a float tensor on {hidden.device}, "
                f"got {ref_hidden.dtype} on {ref_hidden.device}"
            )
        if ref_weight is not None:
            check_linear(
                hidden, ref_weight, ref_bias, weight_name="ref_weight", bias_name="ref_bias"
            )
            if ref_weight.shape[0] != vocab:
                raise ValueError(
                    f"ref_weight must be [V, d] = {tuple(weight.shape)} like weight, "
                    f"got {tuple(ref_weight.shape)}"
                )
        return
    if ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_weight and ref_bias are only used with ref_hidden, not ref_logits")
    check_tensor("ref_logits", ref_logits)
    expected = (*hidden.shape[:-1], vocab)
    if tuple(ref_logits.shape) != expected:
        raise ValueError(
            f"ref_logits must be [*hidden.shape[:-1], V] = {expected}, "
            f"got {tuple(ref_logits.shape)}"
        )
    if not ref_logits.is_floating_point():
        raise ValueError(f"ref_logits must be a float tensor, got {ref_logits.dtype}")


def check_topk(
    hidden: Tensor,
    vocab: int,
    index: Tensor,
    logprob: Tensor,
    tail_logprob: Tensor,
    rows: Tensor | None,
) -> None:
    """``index`` integer ``[*lead, k]``, ``logprob`` float ``[*lead, k]``, ``tail_logprob``
    float ``[*lead]``; in the rows that carry a loss (``rows``, every row when ``None``) the
    ``k`` ids are distinct and in ``[0, V)``. Skipped rows (e.g. the zero padding of
    :meth:`~unlearn_kernels.train.reference_cache.ReferenceBatch.to_padded`) are not read."""
    lead = tuple(hidden.shape[:-1])
    for name, value in (
        ("ref_topk_index", index),
        ("ref_topk_logprob", logprob),
        ("ref_tail_logprob", tail_logprob),
    ):
        check_tensor(name, value)
        if value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")
    if index.dim() != len(lead) + 1 or tuple(index.shape[:-1]) != lead:
        raise ValueError(f"ref_topk_index must be [*{lead}, k], got {tuple(index.shape)}")
    k = index.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"ref_topk_index must have 1 <= k <= V={vocab} columns, got k={k}")
    if index.dtype not in INDEX_DTYPES:
        raise ValueError(f"ref_topk_index must be an integer tensor, got {index.dtype}")
    if tuple(logprob.shape) != tuple(index.shape) or not logprob.is_floating_point():
        raise ValueError(
            f"ref_topk_logprob must be a float tensor of shape {tuple(index.shape)}, "
            f"got {logprob.dtype} of shape {tuple(logprob.shape)}"
        )
    if tuple(tail_logprob.shape) != lead or not tail_logprob.is_floating_point():
        raise ValueError(
            f"ref_tail_logprob must be a float tensor of shape {lead}, "
            f"got {tail_logprob.dtype} of shape {tuple(tail_logprob.shape)}"
        )
    used = index.reshape(-1, k)
    if rows is not None:
        used = used[rows]
    if bool(((used < 0) | (used >= vocab)).any()):
        raise ValueError(f"ref_topk_index must lie in [0, {vocab}) on the rows that carry a loss")
    ordered = used.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError(
            "ref_topk_index must hold k distinct token ids on every row that carries a loss"
        )
