"""What every unlearning method is made of: its parameters, its loss terms, and the response-only
losses it builds them from.

A method turns one micro-batch (:class:`~unlearn_kernels.data.unlearn.MicroBatch`) into named
:class:`Term` s. Each term is already normalised by the step's totals
(:class:`~unlearn_kernels.data.unlearn.StepTotals`), so the terms of a step's micro-batches add
up to the step's objective ``Σ_k c_k·term_k``; the loop runs ``backward`` on each term as it
comes (one decoder pass alive at a time). A method with ``tasks = ("forget", "retain")`` is
stepped by NGDiff instead: each task's terms are accumulated into its own gradient.

The per-token losses come from :class:`ResponseLosses`, over the fused ops (no ``[N, V]``
logits), or :class:`LogitLosses`, the same quantities through the model's own logits (the
``labels=`` loss of Hugging Face models), kept for measuring what the fused ops save.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from unlearn_kernels.data.unlearn import IGNORE_INDEX, MicroBatch, StepTotals, TokenBatch
from unlearn_kernels.hf import OutputHead, causal_lm_loss, final_hidden_states, output_head
from unlearn_kernels.ops.kl import fused_linear_kl, fused_linear_kl_topk

OBJECTIVE = "objective"


class MethodParams(BaseModel):
    """A method's keys in the run config's ``method:`` section (``name`` selects the method)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Needs:
    """What a method reads besides the forget set."""

    retain: bool = True  # retain examples each step
    mismatch: bool = False  # forget prompts with random retain responses (Yao et al.)
    retain_reference: bool = False  # the reference's distribution on retain rows (forward KL)
    forget_logprob: bool = False  # the reference's log-likelihood of each forget response (NPO)


@dataclass(frozen=True)
class Term:
    """``loss = coef · value`` for one micro-batch: ``loss`` is what backward runs on, ``value``
    (``loss / coef``) what is logged under ``name``; ``task`` routes NGDiff's two gradients."""

    name: str
    loss: Tensor
    coef: float
    task: str = OBJECTIVE

    @property
    def value(self) -> float:
        return float(self.loss.detach()) / self.coef


class ResponseLosses:
    """Response-only losses of a causal LM through the fused ops (logits never materialised).

    Args:
        backend, chunk_size: passed to the fused ops.
        ref_head: the reference's output layer for exact KL; ``None`` uses the model's own
            (frozen under LoRA). Full fine-tuning passes a frozen copy of the original.
    """

    def __init__(
        self,
        *,
        backend: str | None = None,
        chunk_size: int | None = None,
        ref_head: OutputHead | None = None,
    ) -> None:
        self.backend, self.chunk_size, self.ref_head = backend, chunk_size, ref_head

    def nll(self, model: nn.Module, batch: TokenBatch, weight: float) -> Tensor:
        """``weight · Σ_t ℓ_t`` over the batch's response tokens (``weight`` carries the sign)."""
        return causal_lm_loss(
            model,
            batch.input_ids,
            batch.attention_mask,
            labels=batch.labels,
            token_weight=torch.full(batch.labels.shape[:1], float(weight)),
            reduction="sum",
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def sequence_nll(self, model: nn.Module, batch: TokenBatch) -> Tensor:
        """``[B]``: ``−log π(y_b | x_b) = Σ_{t∈y_b} ℓ_t`` per example (per-token fused output,
        recomputed in backward)."""
        per_token = causal_lm_loss(
            model,
            batch.input_ids,
            batch.attention_mask,
            labels=batch.labels,
            reduction="none",
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        return per_token.sum(1)

    def kl(self, model: nn.Module, batch: TokenBatch, weight: float) -> Tensor:
        """``weight · Σ_t KL(p_ref,t ‖ p_θ,t)`` over the response rows, the reference read from
        ``batch.reference`` (cached hidden states: exact; cached top-k: compressed)."""
        ref = reference_rows(batch)
        head = output_head(model)
        valid = batch.labels != IGNORE_INDEX
        hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)[valid]
        hidden = hidden.to(head.weight.dtype)
        options = {
            "token_weight": torch.full(hidden.shape[:1], float(weight), device=hidden.device),
            "bias": head.bias,
            "softcap": head.softcap,
            "reduction": "sum",
            "chunk_size": self.chunk_size,
            "backend": self.backend,
        }
        if ref.hidden is not None:
            ref_head = self.ref_head or head
            return fused_linear_kl(
                hidden,
                head.weight,
                ref.hidden.to(hidden.device),
                ref_head.weight,
                ref_bias=ref_head.bias,
                **options,
            )
        return fused_linear_kl_topk(
            hidden,
            head.weight,
            ref.topk_index.to(hidden.device),
            ref.topk_logprob.to(hidden.device),
            ref.tail_logprob.to(hidden.device),
            **options,
        )


def reference_rows(batch: TokenBatch):
    """``batch.reference``, checked to hold this batch's response tokens in order."""
    ref = batch.reference
    if ref is None:
        raise ValueError("the KL term needs cached reference rows for this batch")
    if not torch.equal(batch.labels[batch.labels != IGNORE_INDEX].cpu(), ref.label):
        raise ValueError(
            "the cached reference rows do not match this batch's response tokens: the cache "
            "was built from other data or tokenisation; rebuild it"
        )
    return ref


class LogitLosses(ResponseLosses):
    """The same losses through the model's own materialised logits: ``model(..., labels=)`` for
    the NLL, ``F.cross_entropy`` / ``F.kl_div`` on ``[B, T, V]`` logits otherwise."""

    def nll(self, model: nn.Module, batch: TokenBatch, weight: float) -> Tensor:
        unshifted = torch.full_like(batch.labels, IGNORE_INDEX)
        unshifted[:, 1:] = batch.labels[:, :-1]
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=unshifted
        )
        return out.loss * (batch.n_tokens * float(weight))

    def sequence_nll(self, model: nn.Module, batch: TokenBatch) -> Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        per_token = F.cross_entropy(
            logits.float().transpose(1, 2),
            batch.labels,
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        return per_token.sum(1)

    def kl(self, model: nn.Module, batch: TokenBatch, weight: float) -> Tensor:
        ref = reference_rows(batch)
        valid = batch.labels != IGNORE_INDEX
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        log_q = torch.log_softmax(logits[valid].float(), dim=-1)
        if ref.hidden is not None:
            ref_head = self.ref_head or output_head(model)
            ref_logits = ref_head.logits(ref.hidden.to(log_q.device))
            log_p = torch.log_softmax(ref_logits.float(), dim=-1)
            per_row = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        else:
            index = ref.topk_index.to(log_q.device)
            log_pk, log_pt = ref.topk_logprob.to(log_q.device), ref.tail_logprob.to(log_q.device)
            log_qt = torch.logsumexp(log_q.scatter(1, index, float("-inf")), dim=-1)
            top = torch.xlogy(log_pk.exp(), log_pk.exp()) - log_pk.exp() * log_q.gather(1, index)
            tail = torch.xlogy(log_pt.exp(), log_pt.exp()) - log_pt.exp() * log_qt
            per_row = top.sum(-1) + tail
        return per_row.sum() * float(weight)


class Method:
    """An unlearning objective over the response-only losses (see the module docstring)."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    tasks: ClassVar[tuple[str, ...]] = (OBJECTIVE,)

    def __init__(self, params: MethodParams, losses: ResponseLosses | None = None) -> None:
        self.params = params
        self.losses = losses or ResponseLosses()

    def needs(self) -> Needs:
        return Needs()

    def terms(
        self, model: nn.Module, task: str, batch: MicroBatch, totals: StepTotals
    ) -> Iterator[Term]:
        """The terms of ``task`` on one micro-batch, one decoder pass each."""
        raise NotImplementedError

    # -- the terms methods share ------------------------------------------------------------

    def forget_ascent(self, model: nn.Module, batch: MicroBatch, totals: StepTotals, coef: float):
        """``coef · (−NLL(forget))``, logged as ``forget_nll`` (the NLL itself)."""
        loss = self.losses.nll(model, batch.forget, -coef / totals.forget_tokens)
        return Term("forget_nll", loss, -coef)

    def retain_nll(self, model: nn.Module, batch: MicroBatch, totals: StepTotals, coef: float):
        """``coef · NLL(retain)``."""
        return Term(
            "retain_nll", self.losses.nll(model, batch.retain, coef / totals.retain_tokens), coef
        )

    def retain_kl(self, model: nn.Module, batch: MicroBatch, totals: StepTotals, coef: float):
        """``coef · KL(ref ‖ θ)`` averaged over the retain response tokens."""
        return Term(
            "retain_kl", self.losses.kl(model, batch.retain, coef / totals.retain_tokens), coef
        )
