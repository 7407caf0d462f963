"""What the fused losses need from a Hugging Face causal LM, without building its logits.

Works on plain transformers models, PEFT-wrapped ones (the LoRA layers live inside the base
model, so running its decoder keeps them active) and bitsandbytes-quantised ones.

- :func:`final_hidden_states` runs the decoder only (``model.get_decoder()``): ``[B, T, d]``
  states after the final norm, the input of ``lm_head``. Row ``t`` predicts token ``t + 1``.
- :func:`output_head` returns ``lm_head``'s weight, its bias and the config's final logit
  softcap (Gemma-2/3 ``final_logit_softcapping``), so logits are ``c·tanh((W h + b)/c)``.
  The raw weight must *be* the output layer: a quantised ``lm_head`` (bitsandbytes keeps it
  unquantised by default) or one with an active unmerged adapter (LoRA on ``lm_head``) is a
  ``ValueError`` rather than a silently different loss; merge the adapter or leave ``lm_head``
  out of ``target_modules``. A ``modules_to_save`` copy of ``lm_head`` is used as is.
- :func:`check_output_head` verifies the above against the model's own logits, for heads that
  transform the logits further (e.g. Cohere/Granite logit scaling), which are not supported.
- :func:`causal_lm_loss` wires them into :func:`~unlearn_kernels.fused_linear_cross_entropy`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from unlearn_kernels.data.formats import causal_lm_labels
from unlearn_kernels.ops.cross_entropy import fused_linear_cross_entropy

try:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError:  # peft is optional; isinstance(x, ()) is always False
    PeftModel = BaseTunerLayer = ()

__all__ = [
    "OutputHead",
    "causal_lm_labels",
    "causal_lm_loss",
    "check_output_head",
    "final_hidden_states",
    "frozen_forward",
    "output_head",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (its adapter layers stay in it)."""
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            raise ValueError(
                "model uses a prompt-learning PEFT method, whose virtual tokens exist only in "
                "PeftModel.forward; only adapter methods such as LoRA are supported"
            )
        model = model.get_base_model()
    if not callable(getattr(model, "get_decoder", None)) or not callable(
        getattr(model, "get_output_embeddings", None)
    ):
        raise ValueError(
            f"model must be a transformers causal LM (or a PEFT model of one), got "
            f"{type(model).__name__}"
        )
    return model


def final_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **model_kwargs: Any
) -> Tensor:
    """``[B, T, d]`` hidden states after the final norm, from the decoder alone (no logits).

    ``model_kwargs`` (e.g. ``position_ids``) go to the decoder's forward.
    """
    base = unwrap_model(model)
    decoder = base.get_decoder()
    if decoder is None or decoder is base:
        raise ValueError(f"model {type(base).__name__} exposes no separate decoder module")
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        return_dict=True,
        **model_kwargs,
    )
    return out.last_hidden_state


@dataclass(frozen=True, eq=False)
class OutputHead:
    """Logits ``z = c·tanh((W h + b)/c)``: ``weight`` ``W [V, d]``, ``bias`` ``b``,
    ``softcap`` ``c`` (``None``: ``z = W h + b``)."""

    weight: Tensor
    bias: Tensor | None
    softcap: float | None

    def frozen_copy(self) -> OutputHead:
        """A detached copy: the reference's head when the model's own will train."""
        bias = None if self.bias is None else self.bias.detach().clone()
        return OutputHead(self.weight.detach().clone(), bias, self.softcap)

    def logits(self, hidden: Tensor) -> Tensor:
        """Materialised logits of ``hidden`` (for checks and small slices only)."""
        z = nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap

    def cross_entropy(self, hidden: Tensor, labels: Tensor, **options: Any) -> Tensor:
        """:func:`~unlearn_kernels.fused_linear_cross_entropy` of these logits (never built) on
        ``hidden`` cast to the weight's dtype; ``options`` are the op's keywords."""
        return fused_linear_cross_entropy(
            hidden.to(self.weight.dtype),
            self.weight,
            labels,
            bias=self.bias,
            softcap=self.softcap,
            **options,
        )


def output_head(model: nn.Module) -> OutputHead:
    """``lm_head``'s weight and bias and the final logit softcap, as the model uses them now."""
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"model {type(base).__name__} has no output layer (lm_head)")
    if isinstance(head, BaseTunerLayer):
        active = not head.disable_adapters and any(
            adapter in getattr(head, name, ())
            for name in head.adapter_layer_names
            for adapter in head.active_adapters
        )
        if active != head.merged:
            raise ValueError(
                "lm_head carries an adapter that is active but not merged (or merged but "
                "disabled), so lm_head.weight is not the output layer; merge it "
                "(merge_and_unload) or leave lm_head out of target_modules"
            )
        head = head.get_base_layer()
    weight, bias = head.weight, getattr(head, "bias", None)
    if not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError(
            f"lm_head.weight is {weight.dtype} of shape {tuple(weight.shape)}: a quantised output "
            "layer cannot feed the fused losses; keep lm_head unquantised (bitsandbytes' default, "
            "llm_int8_skip_modules=['lm_head'])"
        )
    config = base.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(weight, bias, None if softcap is None else float(softcap))


def _bnb_4bit_layers() -> tuple[type, ...]:
    """bitsandbytes' 4-bit linear class if bitsandbytes is imported (else no such layer exists)."""
    bnb = sys.modules.get("bitsandbytes")
    return (bnb.nn.Linear4bit,) if bnb is not None else ()


@contextmanager
def frozen_forward(model: nn.Module, *, disable_adapters: bool = False) -> Iterator[None]:
    """Deterministic, gradient-free forwards: eval mode (no dropout) under ``torch.no_grad``.

    With ``disable_adapters`` a PEFT model runs with its adapters off (``disable_adapter()``):
    the frozen base model, the unlearning reference, without a second copy.

    bitsandbytes 4-bit layers keep ``training=True`` (their only use of the flag): on CPUs with
    AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time it runs in eval mode without
    grad, after which LoRA gradients through it come back ``None``. All flags are restored on
    exit.
    """
    if (
        disable_adapters
        and not isinstance(model, PeftModel)
        and any(isinstance(m, BaseTunerLayer) for m in model.modules())
    ):
        raise ValueError(
            "model holds PEFT adapter layers but is not the PeftModel: pass the PeftModel "
            "so its adapters can be disabled for the reference"
        )
    modules = list(model.modules())
    flags = [m.training for m in modules]
    model.eval()
    bnb_4bit = _bnb_4bit_layers()
    for module in modules:
        if isinstance(module, bnb_4bit):
            module.training = True
    adapters_off = (
        model.disable_adapter()
        if disable_adapters and isinstance(model, PeftModel)
        else nullcontext()
    )
    try:
        with adapters_off, torch.no_grad():
            yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            module.training = flag


def check_output_head(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, rtol: float = 1e-4
) -> None:
    """Raise ``ValueError`` unless :func:`output_head` applied to :func:`final_hidden_states`
    reproduces the model's own logits at the last position (``‖z − z_model‖/‖z_model‖ ≤ rtol``).

    Runs under :func:`frozen_forward` with the adapters as they are.
    """
    base = unwrap_model(model)
    head = output_head(model)
    keep = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(base.forward).parameters
        else {}
    )
    with frozen_forward(model):
        expected = (
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep)
            .logits[:, -1]
            .double()
        )
        got = head.logits(final_hidden_states(model, input_ids, attention_mask)[:, -1]).double()
    err = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    if not err <= rtol:
        raise ValueError(
            f"{type(base).__name__}'s logits are not softcap(lm_head(final hidden states)) "
            f"(relative error {err:.2e} > {rtol:.0e}): its output layer transforms the logits "
            "further (e.g. a logit scale), which the fused losses do not model"
        )


def _expand_token_weight(
    token_weight: Tensor | Sequence[float] | None, labels: Tensor
) -> Tensor | None:
    """``[B]`` per-sequence weights broadcast over positions, or ``[B, T]`` per-row weights."""
    if token_weight is None:
        return None
    token_weight = torch.as_tensor(token_weight, device=labels.device)
    if not token_weight.is_floating_point():
        token_weight = token_weight.float()
    if token_weight.shape == labels.shape[:1]:
        return token_weight[:, None].expand(labels.shape)
    if token_weight.shape == labels.shape:
        return token_weight
    raise ValueError(
        f"token_weight must be [B]={list(labels.shape[:1])} (per sequence) or "
        f"[B, T]={list(labels.shape)} (per row, row t predicting token t+1), "
        f"got {list(token_weight.shape)}"
    )


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    prompt_lengths: Tensor | Sequence[int] | None = None,
    *,
    labels: Tensor | None = None,
    token_weight: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """Fused response-only causal-LM loss of ``model``; its logits are never materialised.

    ``ℓ_t = −log p(x_{t+1} | x_≤t)`` over response targets (see :func:`causal_lm_labels`);
    returns ``Σ w_t ℓ_t`` (``"sum"``), that over the number of response targets (``"mean"``, the
    same as ``model(input_ids, labels=...)``'s loss when unweighted) or per row (``"none"``).

    Args:
        labels: ``[B, T]`` shifted labels to use instead of deriving them from
            ``prompt_lengths`` (row ``t`` predicts token ``t + 1``, ``ignore_index`` elsewhere).
        token_weight: ``[B]`` (per sequence, e.g. ``+1`` retain / ``−1`` forget) or ``[B, T]``.
        model_kwargs: passed to the decoder (e.g. ``position_ids``).
    """
    if labels is None:
        labels = causal_lm_labels(input_ids, attention_mask, prompt_lengths, ignore_index)
    weights = _expand_token_weight(token_weight, labels)
    head = output_head(model)
    hidden = final_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    return head.cross_entropy(
        hidden,
        labels,
        token_weight=weights,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        backend=backend,
    )
