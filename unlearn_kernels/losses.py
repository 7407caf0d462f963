"""``nn.Module`` fronts of the fused losses, in the conventions of ``torch.nn.CrossEntropyLoss``
and ``torch.nn.KLDivLoss``: options in the constructor (validated there), tensors in
``forward`` in the functional's order. Class weights are a buffer, so they follow ``.to()``.

The parameter documentation is the functional's, stamped onto each Module's constructor and
``forward`` from its docstring (:func:`stamp_docs`), never copied.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from unlearn_kernels._checks import check_class_weight
from unlearn_kernels.ops.cross_entropy import (
    CrossEntropyOutput,
    cross_entropy_row_math,
    fused_linear_cross_entropy,
)
from unlearn_kernels.ops.kl import fused_linear_kl, fused_linear_kl_topk, kl_row_math

__all__ = [
    "FusedLinearCrossEntropyLoss",
    "FusedLinearKLLoss",
    "FusedLinearKLTopkLoss",
    "stamp_docs",
]


def _sections(fn: Callable[..., Any]) -> tuple[dict[str, str], str]:
    """``fn``'s docstring as its ``Args:`` entries by name (each with its continuation lines,
    as written) and its ``Returns:`` section."""
    lines = inspect.getdoc(fn).splitlines()
    entries: dict[str, list[str]] = {}
    returns: list[str] = []
    section = None
    for line in lines:
        if line in ("Args:", "Returns:"):
            section = line
        elif section == "Args:" and line.startswith("    ") and not line.startswith("     "):
            name = line.strip().split(":", 1)[0]
            entries[name] = [line]
        elif section == "Args:" and line.startswith("     ") and entries:
            entries[next(reversed(entries))].append(line)
        elif section == "Returns:" and line.startswith("    "):
            returns.append(line)
        elif line.strip():
            section = None
    return {name: "\n".join(text) for name, text in entries.items()}, "\n".join(returns)


def stamp_docs(*functionals: Callable[..., Any]) -> Callable[[type], type]:
    """Class decorator: append to the class docstring the ``Args:`` entries of its constructor's
    parameters and to ``forward``'s those of its parameters and the ``Returns:`` section, all
    taken from the first of ``functionals`` that documents them."""
    docs: dict[str, str] = {}
    for functional in reversed(functionals):
        docs.update(_sections(functional)[0])
    returns = _sections(functionals[0])[1] or _sections(functionals[-1])[1]

    def args(method: Callable[..., Any]) -> str:
        names = [p for p in inspect.signature(method).parameters if p != "self"]
        missing = [name for name in names if name not in docs]
        if missing:
            raise ValueError(f"{method.__qualname__}: {missing} not documented by the functional")
        return "Args:\n" + "\n".join(docs[name] for name in names)

    def stamp(cls: type) -> type:
        cls.__doc__ = f"{inspect.getdoc(cls)}\n\n{args(cls.__init__)}\n"
        forward = cls.forward
        forward.__doc__ = f"{inspect.getdoc(forward)}\n\n{args(forward)}\n\nReturns:\n{returns}\n"
        return cls

    return stamp


class _FusedLoss(nn.Module):
    """Keeps a front's options as given, after ``validate`` (the functional's own validation
    of the options that need no tensor) accepted them; shows them in ``repr``."""

    def __init__(self, options: dict[str, Any], validate: Callable[..., Any]) -> None:
        super().__init__()
        self.options = options
        validate(**{k: v for k, v in options.items() if k not in ("ignore_index", "backend")})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


@stamp_docs(fused_linear_cross_entropy)
class FusedLinearCrossEntropyLoss(_FusedLoss):
    """:func:`~unlearn_kernels.fused_linear_cross_entropy` as a Module."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        softcap: float | None = None,
        label_smoothing: float = 0.0,
        class_weight: Tensor | None = None,
        lse_square_scale: float = 0.0,
        token_scaling: bool = False,
        shift: bool = False,
        return_z_loss: bool = False,
        return_lse: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        options = {
            "ignore_index": ignore_index,
            "reduction": reduction,
            "softcap": softcap,
            "label_smoothing": label_smoothing,
            "lse_square_scale": lse_square_scale,
            "token_scaling": token_scaling,
            "shift": shift,
            "return_z_loss": return_z_loss,
            "return_lse": return_lse,
            "return_token_accuracy": return_token_accuracy,
            "return_predicted_tokens": return_predicted_tokens,
            "chunk_size": chunk_size,
            "backend": backend,
        }
        super().__init__(options, functools.partial(cross_entropy_row_math, class_weight_sum=None))
        check_class_weight(class_weight)
        self.register_buffer("class_weight", class_weight)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        token_weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor | CrossEntropyOutput:
        """The fused cross-entropy of ``hidden @ weightᵀ (+ bias)`` against ``labels``."""
        return fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            token_weight=token_weight,
            bias=bias,
            class_weight=self.class_weight,
            **self.options,
        )


@stamp_docs(fused_linear_kl)
class FusedLinearKLLoss(_FusedLoss):
    """:func:`~unlearn_kernels.fused_linear_kl` (forward or reverse KL, or the generalised JSD)
    as a Module."""

    def __init__(
        self,
        *,
        direction: str = "forward",
        beta: float | None = None,
        temperature: float = 1.0,
        softcap: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        options = {
            "direction": direction,
            "beta": beta,
            "temperature": temperature,
            "softcap": softcap,
            "ignore_index": ignore_index,
            "reduction": reduction,
            "chunk_size": chunk_size,
            "backend": backend,
        }
        super().__init__(options, kl_row_math)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_logits: Tensor | None = None,
        labels: Tensor | None = None,
        token_weight: Tensor | None = None,
        bias: Tensor | None = None,
        ref_bias: Tensor | None = None,
    ) -> Tensor:
        """The divergence from the cached reference to ``hidden @ weightᵀ (+ bias)``."""
        return fused_linear_kl(
            hidden,
            weight,
            ref_hidden,
            ref_weight,
            ref_logits=ref_logits,
            labels=labels,
            token_weight=token_weight,
            bias=bias,
            ref_bias=ref_bias,
            **self.options,
        )


@stamp_docs(fused_linear_kl_topk, fused_linear_kl)
class FusedLinearKLTopkLoss(_FusedLoss):
    """:func:`~unlearn_kernels.fused_linear_kl_topk` as a Module."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        softcap: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        options = {
            "temperature": temperature,
            "softcap": softcap,
            "ignore_index": ignore_index,
            "reduction": reduction,
            "chunk_size": chunk_size,
            "backend": backend,
        }
        super().__init__(options, kl_row_math)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        ref_topk_index: Tensor,
        ref_topk_logprob: Tensor,
        ref_tail_logprob: Tensor,
        labels: Tensor | None = None,
        token_weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """The top-k KL from cached reference log-probs to ``hidden @ weightᵀ (+ bias)``."""
        return fused_linear_kl_topk(
            hidden,
            weight,
            ref_topk_index,
            ref_topk_logprob,
            ref_tail_logprob,
            labels=labels,
            token_weight=token_weight,
            bias=bias,
            **self.options,
        )
