"""One unlearning step, written once for the run loop (:mod:`.loop`) and the Trainer
(:mod:`.trainer`).

:class:`UnlearningData` says what step ``s`` is: its ``grad_accum`` micro-batches
(:class:`~unlearn_kernels.data.unlearn.StepSampler`), this process's share of each
(:mod:`.distributed`), the reference rows they need, and the step's totals that normalise every
term. :class:`UnlearningStep` turns them into gradients: each micro-batch's terms are
backpropagated as they come (NGDiff's two tasks into their own buffers); after the last one the
gradients are averaged over the processes and, for NGDiff, combined and stepped
(:class:`~unlearn_kernels.train.ngdiff.NGDiffStep`). The run loop then clips and steps a
single-objective method itself; the Trainer leaves that to ``transformers.Trainer``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unlearn_kernels.data.formats import TokenizedPairs
from unlearn_kernels.data.unlearn import (
    IGNORE_INDEX,
    MicroBatch,
    StepSampler,
    StepTotals,
    TokenBatch,
    read_split,
    with_responses,
)
from unlearn_kernels.hf import frozen_forward
from unlearn_kernels.methods import Method, Needs
from unlearn_kernels.methods.base import Term
from unlearn_kernels.train import distributed
from unlearn_kernels.train.config import ReferenceConfig, RunConfig
from unlearn_kernels.train.model import special_token_ids
from unlearn_kernels.train.ngdiff import TASKS, NGDiffStep, TaskGradients
from unlearn_kernels.train.reference_cache import (
    CacheSettings,
    ReferenceCache,
    build_reference_cache,
)

log = logging.getLogger("unlearn_kernels")


def read_sets(
    config: RunConfig, tokenizer: Any, needs: Needs
) -> tuple[TokenizedPairs, TokenizedPairs | None]:
    """The forget set and (if the method needs one) the retain set, tokenised as ``data:`` says."""
    data = config.data
    bos, eos = special_token_ids(tokenizer, config.model)
    options = {
        "bos_token_id": bos if data.add_bos else None,
        "eos_token_id": eos if data.add_eos else None,
        "max_length": data.max_length,
        "chat_template": data.chat_template,
    }
    forget = read_split(data.forget, tokenizer, **options)
    retain = read_split(data.retain, tokenizer, **options) if needs.retain else None
    return forget, retain


def _response_tokens(data: TokenizedPairs | None) -> Tensor | None:
    return None if data is None else (data.labels(IGNORE_INDEX) != IGNORE_INDEX).sum(1)


class UnlearningData:
    """Step ``s``'s micro-batches for this process and the step's totals (module docstring).

    Args:
        forget, retain: the tokenised sets (``retain`` may be ``None`` if ``needs.retain`` is
            false).
        needs: what the method reads (:meth:`~unlearn_kernels.methods.Method.needs`).
        batch_size: examples per set per micro-batch, over all processes together.
        grad_accum, seed, shuffle: of the :class:`~unlearn_kernels.data.unlearn.StepSampler`.
        max_length: the cut of Yao's random-mismatch examples.
        device: where the batches go.
    """

    def __init__(
        self,
        forget: TokenizedPairs,
        retain: TokenizedPairs | None,
        needs: Needs,
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        shuffle: bool = True,
        max_length: int | None = None,
        device: torch.device,
    ) -> None:
        if needs.retain and retain is None:
            raise ValueError("data.retain: the method needs a retain set")
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if batch_size < self.world:
            raise ValueError(
                f"train.batch_size ({batch_size}) must be at least the number of processes "
                f"({self.world}): each one takes a share of every micro-batch"
            )
        self.forget, self.retain, self.needs = forget, retain, needs
        self.max_length, self.device = max_length, device
        self.grad_accum = grad_accum
        self.sampler = StepSampler(
            len(forget),
            len(retain) if retain is not None else 1,
            batch_size=batch_size,
            grad_accum=grad_accum,
            seed=seed,
            shuffle=shuffle,
        )
        self._tokens = {"forget": _response_tokens(forget), "retain": _response_tokens(retain)}
        self.caches: dict[str, ReferenceCache] = {}

    # -- reference caches ------------------------------------------------------------------

    def open_references(
        self, model: nn.Module, reference: ReferenceConfig, directory: Path, tokenizer: Any
    ) -> None:
        """The reference caches the method needs, built from ``model`` (adapters disabled) on
        first use and reused after. Under data parallelism rank 0 builds them."""
        if self.needs.retain_reference:
            settings = CacheSettings(
                topk=reference.topk if reference.kind == "topk" else 0,
                store_hidden=reference.kind == "hidden",
                store_label_logprob=False,
                hidden_dtype=reference.hidden_dtype,
            )
            self.caches["retain"] = self._cache(
                model, "retain", self.retain, settings, reference, directory, tokenizer
            )
        if self.needs.forget_logprob:
            settings = CacheSettings(topk=0, store_hidden=False, store_label_logprob=True)
            self.caches["forget"] = self._cache(
                model, "forget", self.forget, settings, reference, directory, tokenizer
            )

    def _cache(
        self,
        model: nn.Module,
        split: str,
        data: TokenizedPairs,
        settings: CacheSettings,
        reference: ReferenceConfig,
        directory: Path,
        tokenizer: Any,
    ) -> ReferenceCache:
        path = directory / split
        checks = {"data": data, "tokenizer": tokenizer, "settings": settings}
        if distributed.is_main():
            self._build_unless_usable(model, path, data, settings, reference, tokenizer)
        distributed.barrier()
        return ReferenceCache(path, model=None, **checks)

    def _build_unless_usable(
        self,
        model: nn.Module,
        path: Path,
        data: TokenizedPairs,
        settings: CacheSettings,
        reference: ReferenceConfig,
        tokenizer: Any,
    ) -> None:
        if (path / "manifest.json").is_file():
            try:
                ReferenceCache(path, model=model, data=data, tokenizer=tokenizer, settings=settings)
                log.info("reference cache %s reused (fingerprint matches)", path)
                return
            except ValueError as err:
                log.warning("reference cache %s is not usable (%s): rebuilding it", path, err)
        log.info("building the reference cache %s (%d examples)", path, len(data))
        build_reference_cache(
            model,
            data,
            path,
            settings,
            tokenizer=tokenizer,
            batch_size=reference.batch_size,
            full_weight_hash=reference.full_weight_hash,
            overwrite=True,
        )

    # -- batches -------------------------------------------------------------------------

    def _batch(self, split: str, index: list[int]) -> TokenBatch:
        batch = TokenBatch.of(self.forget if split == "forget" else self.retain, index)
        if split in self.caches:
            batch = replace(batch, reference=self.caches[split].batch(index))
        return batch.to(self.device)

    def step(self, step: int) -> tuple[list[MicroBatch], StepTotals]:
        """Step ``step``'s micro-batches (this process's share of each) and the totals that
        normalise this process's terms: the step's, over the number of processes."""
        tokens = {"forget": 0, "retain": 0, "mismatch": 0}
        batches = []
        for j in range(self.grad_accum):
            f_index = self.sampler.indices("forget", step, j)
            tokens["forget"] += int(self._tokens["forget"][f_index].sum())
            mine = distributed.share(range(len(f_index)), self.rank, self.world)
            retain = mismatch = None
            if self.needs.retain:
                r_index = self.sampler.indices("retain", step, j)
                tokens["retain"] += int(self._tokens["retain"][r_index].sum())
                retain = self._batch("retain", [r_index[i] for i in mine])
            if self.needs.mismatch:
                m_index = self.sampler.mismatch(step, j)
                pairs = with_responses(self.forget, f_index, self.retain, m_index, self.max_length)
                labels = pairs.labels(IGNORE_INDEX)
                tokens["mismatch"] += int((labels != IGNORE_INDEX).sum())
                shared = pairs.select(mine)
                mismatch = TokenBatch(
                    shared.input_ids,
                    shared.attention_mask,
                    shared.labels(IGNORE_INDEX),
                    [f_index[i] for i in mine],
                ).to(self.device)
            forget = self._batch("forget", [f_index[i] for i in mine])
            batches.append(MicroBatch(forget, retain, mismatch))
        totals = StepTotals(
            forget_tokens=tokens["forget"],
            retain_tokens=tokens["retain"],
            mismatch_tokens=tokens["mismatch"],
            forget_sequences=self.sampler.batch_size * self.grad_accum,
        )
        return batches, totals.per_process(self.world)


#: ``backward(loss)``: ``Tensor.backward``, or the Trainer's ``accelerator.backward``.
Backward = Callable[[Tensor], None]


class UnlearningStep:
    """The gradients of one optimizer step over a method's terms (module docstring).

    Args:
        method: the unlearning method (its losses already configured).
        model: the trained model (PEFT or plain; not a ``DistributedDataParallel`` wrapper: the
            gradients are averaged here, once per step).
        optimizer: steps NGDiff's combined direction (single-objective methods are stepped by
            the caller).
        max_grad_norm: NGDiff clips its direction to this norm (``None``: no clipping).
        backend: of NGDiff's combine.
        backward: how a term's loss is backpropagated.
        autocast: a context for the forward passes (the Trainer's mixed precision).
    """

    def __init__(
        self,
        method: Method,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float | None,
        backend: str | None = None,
        backward: Backward = Tensor.backward,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.method, self.model, self.optimizer = method, model, optimizer
        self.backward_fn, self.autocast = backward, autocast
        self.world = distributed.world_size()
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("model has no trainable parameter (requires_grad) to unlearn with")
        self.ngdiff: NGDiffStep | None = None
        if method.tasks == TASKS:
            self.ngdiff = NGDiffStep(
                TaskGradients(self.trainable.values(), all_reduce=self.world > 1),
                optimizer,
                gen=method.gen(),
                eps=method.params.eps,
                max_grad_norm=max_grad_norm,
                backend=backend,
            )
        self._logged: set[str] = set()

    def _terms(self, task: str, batch: MicroBatch, totals: StepTotals) -> Iterator[Term]:
        """The method's terms, each forward under ``autocast`` (its backward outside it)."""
        terms = self.method.terms(self.model, task, batch, totals)
        while True:
            with self.autocast():
                term = next(terms, None)
            if term is None:
                return
            yield term

    def backward(
        self, batch: MicroBatch, totals: StepTotals, logs: dict[str, Any], *, first: bool
    ) -> float:
        """Backpropagate every term of one micro-batch (NGDiff: each task into its own gradient,
        zeroed on the step's ``first`` micro-batch) and add their values to ``logs``. Returns the
        micro-batch's part of the logged ``loss``: the objective, or for NGDiff
        ``NLL(retain) − NLL(forget)``."""
        loss = 0.0
        for task in self.method.tasks:
            if self.ngdiff is not None:
                self.ngdiff.grads.accumulate(task, fresh=first)
            for term in self._terms(task, batch, totals):
                self.backward_fn(term.loss)
                logs[term.name] = logs.get(term.name, 0.0) + term.value
                loss += float(term.loss.detach()) * (-1.0 if task == "forget" else 1.0)
                self._logged.add(term.name)
        logs["loss"] = logs.get("loss", 0.0) + loss
        self._logged.add("loss")
        return loss

    def _task_loss(self, task: str, batches: list[MicroBatch], totals: StepTotals) -> float:
        """The task's loss on the step's batches, dropout off and no gradient (GeN probes)."""
        with frozen_forward(self.model), self.autocast():
            return sum(
                float(term.loss)
                for batch in batches
                for term in self.method.terms(self.model, task, batch, totals)
            )

    def finish(
        self, batches: list[MicroBatch], totals: StepTotals, logs: dict[str, Any], step: int
    ) -> None:
        """After the step's last micro-batch: average the logged terms and the gradients over
        the processes; NGDiff also combines, clips, steps the optimizer and probes GeN, leaving
        no ``.grad`` behind. ``step`` is 0-based (the first step checks that gradients came)."""
        if self.world > 1:
            names = sorted(self._logged)
            values = torch.tensor([logs[k] for k in names], dtype=torch.float64)
            distributed.all_reduce_mean([values.to(self._device)])
            logs.update(zip(names, values.tolist(), strict=True))
        if self.ngdiff is None:
            if step == 0:
                self._check_gradients()
            if self.world > 1:
                for p in self.trainable.values():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                distributed.all_reduce_mean([p.grad for p in self.trainable.values()])
            return
        report = self.ngdiff.step(
            forget_loss=lambda: self._task_loss("forget", batches, totals),
            retain_loss=lambda: self._task_loss("retain", batches, totals),
        )
        if step == 0 and any(flag.endswith("zero") for flag in report.flags):
            self._no_gradient_error(report.flags)
        logs.update(
            forget_grad_norm=report.forget_norm,
            retain_grad_norm=report.retain_norm,
            cosine=report.cosine,
        )
        if report.grad_norm is not None:
            logs["grad_norm"] = report.grad_norm
        if report.probe is not None:
            logs["gen_lr"] = report.probe.lr
        for p in self.trainable.values():
            p.grad = None

    @property
    def _device(self) -> torch.device:
        return next(iter(self.trainable.values())).device

    def clip_and_step(self, max_grad_norm: float | None, logs: dict[str, Any]) -> None:
        """A single-objective step as the run loop takes it: clip, step, clear the gradients."""
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable.values(), max_grad_norm)
            logs["grad_norm"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _check_gradients(self) -> None:
        missing = [name for name, p in self.trainable.items() if p.grad is None]
        if missing:
            self._no_gradient_error(missing[:3])

    def _no_gradient_error(self, where: list[str] | tuple[str, ...]) -> None:
        raise RuntimeError(
            f"no gradient reached the trainable tensors ({', '.join(where)}) after the first "
            "backward. With bitsandbytes 4-bit layers on CPU this happens once a layer ran in "
            "eval mode under no_grad (it repacks its weight): keep them in train mode."
        )


@dataclass
class RunParts:
    """What a run config builds: the data, the model with its adapter, the method, the
    optimizer and its schedule (``None`` when GeN sets the learning rate)."""

    tokenizer: Any
    data: UnlearningData
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None


def build_run(config: RunConfig, device: torch.device) -> RunParts:
    """Load the sets, the base model and its reference caches (before any adapter exists: the
    reference is the base model), attach the adapter and build the method and optimizer."""
    from unlearn_kernels.hf import output_head
    from unlearn_kernels.methods import LogitLosses, ResponseLosses, get_method
    from unlearn_kernels.train.model import (
        attach_adapter,
        build_optimizer,
        build_scheduler,
        load_base_model,
        load_run_tokenizer,
    )

    tokenizer = load_run_tokenizer(config)
    method_cls = get_method(config.method.name)
    needs = method_cls(config.method).needs()
    forget, retain = read_sets(config, tokenizer, needs)
    train = config.train
    data = UnlearningData(
        forget,
        retain,
        needs,
        batch_size=train.batch_size,
        grad_accum=train.grad_accum,
        seed=train.seed,
        shuffle=train.shuffle,
        max_length=config.data.max_length,
        device=device,
    )
    model = load_base_model(config, device)
    data.open_references(model, config.reference, config.reference_dir, tokenizer)
    ref_head = None
    if needs.retain_reference and config.adapter.kind == "full":
        ref_head = output_head(model).frozen_copy()  # its weight will train: keep the reference's
    torch.manual_seed(train.seed)
    model = attach_adapter(model, config.adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_from_main(trainable)
    losses_cls = LogitLosses if train.loss == "unfused" else ResponseLosses
    losses = losses_cls(backend=train.backend, chunk_size=train.chunk_size, ref_head=ref_head)
    method = method_cls(config.method, losses)
    optimizer = build_optimizer(trainable, train)
    gen = method.tasks == TASKS and method.gen() is not None
    scheduler = None if gen else build_scheduler(optimizer, train)
    torch.manual_seed(train.seed)  # dropout's stream starts at the seed, as in Trainer
    return RunParts(tokenizer, data, model, method, optimizer, scheduler)
