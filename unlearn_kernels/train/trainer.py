"""``UnlearningTrainer``: the unlearning step of :mod:`.steps` inside ``transformers.Trainer``.

Give it a model (plain, PEFT/LoRA or QLoRA), ``TrainingArguments``, a forget and a retain set and
any method of :mod:`unlearn_kernels.methods` by name::

    trainer = UnlearningTrainer(
        model=peft_model,
        args=TrainingArguments(output_dir="out", max_steps=100, per_device_train_batch_size=4,
                               learning_rate=1e-4, lr_scheduler_type="constant"),
        method="ngdiff",                       # or {"name": "npo", "beta": 0.1}, MethodParams
        forget_dataset=forget, retain_dataset=retain,   # TokenizedPairs (data.unlearn.read_split)
    )
    trainer.train()
    trainer.save_model()

What the Trainer keeps: its optimizer and schedule (or ``optimizers=``), gradient accumulation
(``gradient_accumulation_steps`` micro-batches per step), mixed precision (``bf16``; the
forwards run under the accelerator's autocast), gradient checkpointing, checkpoints with
``save_steps`` and ``train(resume_from_checkpoint=...)``, ``save_model``, logging (the method's
terms by name in ``log_history``) and ``accelerate launch`` / ``torchrun`` data parallelism.

What it does differently: step ``s`` of ``max_steps`` is the run loop's step ``s`` (the same
:class:`~unlearn_kernels.data.unlearn.StepSampler` over both sets, seeded by ``args.seed``; each
process takes its share of every micro-batch of ``per_device_train_batch_size × world size``
examples per set); every term is normalised by the step's totals and backpropagated in
``training_step``; NGDiff's two backward passes, its combine and its optimizer step (with GeN
probes) run in the step's last ``training_step``, which then leaves no gradient for the
Trainer's own (no-op) optimizer step. The gradients are averaged over the processes once per
step by :mod:`.distributed` (the forwards call the decoder directly, past any DDP wrapper).
With GeN the schedule is one that keeps the learning rate GeN sets. Reference caches (KL, Yao,
NPO) are built on first use under ``reference.path`` (default ``output_dir/reference``) from the
model with its adapters disabled.

:meth:`UnlearningTrainer.from_config` builds all of this from a run config, so that it trains
exactly as ``unlearn-kernels run`` does, step for step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainingArguments

from unlearn_kernels.data.formats import TokenizedPairs
from unlearn_kernels.data.unlearn import MicroBatch, StepTotals
from unlearn_kernels.hf import output_head
from unlearn_kernels.methods import Method, MethodParams, ResponseLosses, get_method
from unlearn_kernels.train import distributed
from unlearn_kernels.train.config import ReferenceConfig, RunConfig
from unlearn_kernels.train.model import run_device
from unlearn_kernels.train.ngdiff import TASKS
from unlearn_kernels.train.steps import UnlearningData, UnlearningStep, build_run

__all__ = ["UnlearningTrainer", "keep_lr_scheduler"]


def keep_lr_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """A schedule that leaves the learning rate as it is (GeN sets it)."""
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class _Slots(Dataset):
    """Micro-batch ``k`` of the run: micro-batch ``k % grad_accum`` of step ``k // grad_accum``
    (the batches themselves are built when the Trainer asks for a step)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> int:
        return k


def _first(items: list[int]) -> int:
    return items[0]


@dataclass
class _Step:
    index: int
    batches: list[MicroBatch]
    totals: StepTotals
    logs: dict[str, Any] = field(default_factory=dict)


def _method_params(method: str | Mapping[str, Any] | MethodParams) -> MethodParams:
    if isinstance(method, MethodParams):
        return method
    tree = {"name": method} if isinstance(method, str) else dict(method)
    if "name" not in tree:
        raise ValueError("method must name the method: a name, or a mapping with 'name'")
    return get_method(tree["name"]).Params.model_validate(tree)


class UnlearningTrainer(Trainer):
    """A ``transformers.Trainer`` that unlearns (see the module docstring).

    Args:
        model: the model to train (its trainable parameters are what unlearning changes).
        args: ``TrainingArguments``; ``max_steps`` must be set (the sets are cycled).
        method: a method name of :data:`unlearn_kernels.methods.METHODS`, a mapping of its
            parameters (with ``name``), its ``MethodParams``, or a configured ``Method``.
        forget_dataset, retain_dataset: tokenised sets (``retain_dataset`` when the method
            reads one).
        reference: where and how reference caches are kept (a mapping or ``ReferenceConfig``;
            default: ``output_dir/reference``).
        max_length: the cut of Yao's random-mismatch examples (default: none).
        backend, chunk_size: of the fused ops (ignored when ``method`` is a ``Method``).
        trainer_kwargs: the rest of ``Trainer``'s arguments (``optimizers``, ``callbacks``,
            ``processing_class``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        *,
        method: str | Mapping[str, Any] | MethodParams | Method,
        forget_dataset: TokenizedPairs,
        retain_dataset: TokenizedPairs | None = None,
        reference: ReferenceConfig | Mapping[str, Any] | None = None,
        max_length: int | None = None,
        backend: str | None = None,
        chunk_size: int | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if args.max_steps is None or args.max_steps <= 0:
            raise ValueError("args.max_steps must be set: the optimizer steps to take")
        params = method.params if isinstance(method, Method) else _method_params(method)
        gen = params.name == "ngdiff" and params.gen
        if gen and (args.lr_scheduler_type != "constant" or args.get_warmup_steps(1)):
            raise ValueError(
                "args.lr_scheduler_type: NGDiff's GeN sets the learning rate itself; use "
                "lr_scheduler_type='constant' without warmup, or the method's gen: false"
            )
        if params.name == "ngdiff" and args.fp16:
            raise ValueError(
                "args.fp16: NGDiff normalises each task gradient itself, which fp16 loss "
                "scaling would undo at the optimizer step; use bf16"
            )
        for key in ("train_dataset", "data_collator"):
            if key in trainer_kwargs:
                raise ValueError(f"{key}: UnlearningTrainer draws the batches from the sets")
        steps = _Slots(args.max_steps * args.gradient_accumulation_steps)
        super().__init__(
            model=model, args=args, train_dataset=steps, data_collator=_first, **trainer_kwargs
        )
        needs = get_method(params.name)(params).needs()
        self.data = UnlearningData(
            forget_dataset,
            retain_dataset,
            needs,
            batch_size=args.per_device_train_batch_size * distributed.world_size(),
            grad_accum=args.gradient_accumulation_steps,
            seed=args.seed,
            max_length=max_length,
            device=args.device,
        )
        reference = ReferenceConfig.model_validate(
            reference if isinstance(reference, ReferenceConfig) else dict(reference or {})
        )
        directory = Path(reference.path or Path(args.output_dir) / "reference")
        self.data.open_references(self.model, reference, directory, self.processing_class)
        if not isinstance(method, Method):
            head = output_head(self.model)
            ref_head = None
            if needs.retain_reference and head.weight.requires_grad:
                ref_head = head.frozen_copy()  # the reference's, before training
            losses = ResponseLosses(backend=backend, chunk_size=chunk_size, ref_head=ref_head)
            method = get_method(params.name)(params, losses)
        self.method = method
        self.unlearning: UnlearningStep | None = None
        self._step: _Step | None = None
        self._logged: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, config: RunConfig, **overrides: Any) -> UnlearningTrainer:
        """The Trainer that trains as ``unlearn-kernels run`` on ``config`` does: the same
        sets, model, adapter, reference caches, method, optimizer and schedule.

        ``overrides`` are ``TrainingArguments`` keywords (``logging_steps``, ``bf16``, ...).
        """
        train = config.train
        world = distributed.launched_world_size()
        if train.batch_size % world:
            raise ValueError(
                f"train.batch_size ({train.batch_size}) must be a multiple of the number of "
                f"processes ({world}) for per_device_train_batch_size"
            )
        every = train.checkpoint_every
        options = {
            "output_dir": config.output_dir,
            "max_steps": train.steps,
            "per_device_train_batch_size": train.batch_size // world,
            "gradient_accumulation_steps": train.grad_accum,
            "learning_rate": train.lr,
            "weight_decay": train.weight_decay,
            "max_grad_norm": train.max_grad_norm or 0.0,
            "lr_scheduler_type": "constant",
            "seed": train.seed,
            "logging_steps": 1,
            "save_strategy": "steps" if every else "no",
            "save_steps": every or 500,
            "save_total_limit": train.keep_checkpoints,
            "report_to": "none",
            "use_cpu": run_device(train).type == "cpu",
            **overrides,
        }
        args = TrainingArguments(**options)
        parts = build_run(config, args.device)
        reference = config.reference.model_copy(update={"path": str(config.reference_dir)})
        return cls(
            parts.model,
            args,
            method=parts.method,
            forget_dataset=parts.data.forget,
            retain_dataset=parts.data.retain,
            reference=reference,
            max_length=config.data.max_length,
            optimizers=(parts.optimizer, parts.scheduler),
            processing_class=parts.tokenizer,
        )

    # -- the Trainer's hooks -----------------------------------------------------------------

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        gen = self.method.tasks == TASKS and self.method.gen() is not None
        if gen and self.lr_scheduler is None:
            self.lr_scheduler = keep_lr_scheduler(optimizer or self.optimizer)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def get_train_dataloader(self) -> DataLoader:
        """Every process walks all micro-batch slots (it takes its share of each itself); the
        loader's own generator keeps the global RNG (dropout's) untouched."""
        return DataLoader(
            self.train_dataset, batch_size=1, collate_fn=_first, generator=torch.Generator()
        )

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list[MicroBatch], None]:
        """The next step's micro-batches (this process's share) and its totals."""
        slots = []
        for _ in range(num_batches):
            try:
                slots.append(next(epoch_iterator))
            except StopIteration:
                break
        if not slots:
            return [], None
        index = slots[0] // self.args.gradient_accumulation_steps
        batches, totals = self.data.step(index)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self._step = _Step(index, batches, totals, {"lr": lr})
        return batches, None

    def training_step(
        self, model: nn.Module, inputs: MicroBatch, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Backpropagate one micro-batch's terms; after the step's last one, average the
        gradients over the processes and (NGDiff) combine and step."""
        if self.unlearning is None:
            self.unlearning = UnlearningStep(
                self.method,
                self.model,
                self.optimizer,
                max_grad_norm=self.args.max_grad_norm or None,
                backend=self.method.losses.backend,
                backward=self.accelerator.backward,
                autocast=self.accelerator.autocast,
            )
        step = self._step
        j = next(i for i, batch in enumerate(step.batches) if batch is inputs)
        self.model.train()
        loss = self.unlearning.backward(inputs, step.totals, step.logs, first=j == 0)
        if j == len(step.batches) - 1:
            self.unlearning.finish(step.batches, step.totals, step.logs, step.index)
            self._logged.append(step.logs)
        return torch.tensor(loss, device=self.args.device)

    def floating_point_ops(self, inputs: MicroBatch) -> int:
        """``6 · tokens · parameters`` (forward and backward) over the micro-batch's sets."""
        sets = (inputs.forget, inputs.retain, inputs.mismatch)
        tokens = sum(s.input_ids.numel() for s in sets if s is not None)
        if not hasattr(self.model, "num_parameters"):
            return 0
        return 6 * tokens * self.model.num_parameters(exclude_embeddings=True)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs also carry the method's terms by name (their mean over the steps since
        the last log) and, for NGDiff, the task-gradient norms, cosine and GeN learning rate."""
        if "loss" in logs and self._logged:
            names = {k for step in self._logged for k in step if k not in ("loss", "lr")}
            for name in sorted(names):
                values = [step[name] for step in self._logged if name in step]
                logs[name] = math.fsum(values) / len(values)
            self._logged = []
        super().log(logs, start_time)
