"""One causal-LM forward for every family in :data:`~.families.FAMILIES`, on the fused loss.

With ``labels`` (or ``shift_labels``) the decoder runs, and the loss comes from the final hidden
states and ``lm_head``'s weight without building the ``[B, T, V]`` logits. Row ``t`` predicts
``labels[:, t + 1]``, as in ``transformers``' ``ForCausalLMLoss``; ``token_weight`` has the shape
of ``labels`` and is shifted with them (``token_weight[:, t + 1]`` weighs that target)::

    loss = Σ_t w_t ℓ_t / #{t : label_t ≠ -100}      (all w = 1: the model's own mean)
    loss = Σ_t w_t ℓ_t / num_items_in_batch         (the Trainer's count over the whole step)

so that gradient accumulation with ``num_items_in_batch`` gives the loss of one large batch.
``logits`` are ``None`` unless ``return_logits=True``. Without labels the original forward runs
(generation, evaluation without a loss).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from unlearn_kernels.hf import output_head
from unlearn_kernels.patching.families import Family

IGNORE_INDEX = -100


def _check_token_weight(token_weight: Tensor | None, labels: Tensor) -> Tensor | None:
    if token_weight is None:
        return None
    token_weight = torch.as_tensor(token_weight, device=labels.device)
    if token_weight.shape != labels.shape:
        raise ValueError(
            f"token_weight must have the shape of labels {list(labels.shape)}, "
            f"got {list(token_weight.shape)}"
        )
    return token_weight if token_weight.is_floating_point() else token_weight.float()


def _keep_last(hidden: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """The rows ``transformers`` builds logits for (``0``: all)."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    return hidden[:, logits_to_keep]


def fused_loss_forward(
    model: nn.Module,
    family: Family,
    arguments: dict[str, Any],
    *,
    chunk_size: int | None,
    backend: str | None,
) -> Any:
    """The family's causal-LM output with the fused loss, from bound forward ``arguments``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = arguments.pop("labels", None)
    shift_labels = arguments.pop("shift_labels", None)
    token_weight = arguments.pop("token_weight", None)
    num_items = arguments.pop("num_items_in_batch", None)
    return_logits = arguments.pop("return_logits", False)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    return_dict = arguments.pop("return_dict", None)
    ignore_index = arguments.pop("ignore_index", IGNORE_INDEX)
    arguments.pop("vocab_size", None)

    outputs = model.get_decoder()(**arguments, return_dict=True)
    hidden = outputs.last_hidden_state
    shift = shift_labels is None  # labels= are shifted by the op (shift_labels= already are)
    targets = (labels if shift else shift_labels).to(hidden.device)
    token_weight = _check_token_weight(token_weight, targets)
    head = output_head(model)
    if not family.softcap:  # the family's forward ignores any softcap key in its config
        head = replace(head, softcap=None)
    loss = head.cross_entropy(
        hidden,
        targets,
        token_weight=token_weight,
        ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum",
        shift=shift,
        chunk_size=chunk_size,
        backend=backend,
    )
    if num_items is not None:
        loss = loss / torch.as_tensor(num_items, device=loss.device)
    logits = head.logits(_keep_last(hidden, logits_to_keep)) if return_logits else None
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    out = CausalLMOutputWithPast(loss=loss, logits=logits, **rest)
    return out.to_tuple() if return_dict is False else out


def make_forward(
    original: Callable[..., Any],
    family: Family,
    *,
    bound: bool,
    chunk_size: int | None,
    backend: str | None,
) -> Callable[..., Any]:
    """A ``forward(self, ...)`` that runs :func:`fused_loss_forward` when labels are given and
    ``original`` otherwise. ``original`` is the previous forward: bound to the instance
    (``bound``) or the class's function. Its signature, plus ``token_weight`` and
    ``return_logits``, is the new forward's (so the Trainer keeps those dataset columns)."""
    signature = inspect.signature(original)
    params = list(signature.parameters.values())
    if not bound:
        params = params[1:]  # self
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ValueError(f"{family.name}'s forward takes no **kwargs; it cannot be patched")
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in (("token_weight", None), ("return_logits", False))
        if name not in signature.parameters
    ]
    params = params[:-1] + extra + params[-1:]
    call_signature = signature.replace(parameters=params)
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run_original = original if bound else functools.partial(original, self)
        if len(args) > len(positional):
            raise TypeError(
                f"forward takes {len(positional)} positional arguments, got {len(args)}"
            )
        arguments = {**dict(zip(positional, args, strict=False)), **kwargs}  # compile: no inspect
        if arguments.get("labels") is None and arguments.get("shift_labels") is None:
            if arguments.get("token_weight") is not None:
                raise ValueError("token_weight needs labels (it weighs the shifted labels)")
            arguments.pop("token_weight", None)
            arguments.pop("return_logits", None)
            return run_original(**arguments)
        return fused_loss_forward(self, family, arguments, chunk_size=chunk_size, backend=backend)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = call_signature.replace(parameters=[self_param, *params])
    forward.__doc__ = __doc__
    forward.unlearn_kernels_original = original
    return forward
