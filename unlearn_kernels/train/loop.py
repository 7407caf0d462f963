"""The unlearning loop: a config in, an adapter that has forgotten out.

``run(config)`` validates the config's files, tokenises the forget/retain sets, loads the base
model (plain, or nf4 for QLoRA), builds or reuses the reference caches the method needs (before
any adapter exists: the reference is the base model), attaches the adapter and trains for
``train.steps`` optimizer steps. Each step draws ``grad_accum`` micro-batches per set
(:class:`~unlearn_kernels.data.unlearn.StepSampler`); every term is normalised by the step's
totals and backpropagated as it is computed. Single-objective methods then clip and step;
NGDiff accumulates its two tasks into separate gradients and steps with
:class:`~unlearn_kernels.train.ngdiff.NGDiffStep` (GeN probes run with dropout off, without
putting bitsandbytes layers in eval mode: :func:`~unlearn_kernels.hf.frozen_forward`).

``output_dir`` receives ``config.yaml``, ``metrics.jsonl`` (one object per step: ``step``, the
method's terms by name, ``lr``, ...), ``checkpoints/`` (:mod:`.checkpoints`), ``reference/``
(unless ``reference.path``) and finally ``adapter/`` (``save_pretrained``; for full fine-tuning
the whole model), plus ``merged/`` with ``adapter.merge``. A run that fails keeps its last good
checkpoint (resume with ``resume=True``), or, with none, removes what it wrote.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from unlearn_kernels._io import write_dir_atomically, write_text_atomically
from unlearn_kernels._memory import peak_bytes, reset_peak
from unlearn_kernels.data.formats import TokenizedPairs
from unlearn_kernels.data.unlearn import (
    MicroBatch,
    StepSampler,
    StepTotals,
    TokenBatch,
    read_split,
    with_responses,
)
from unlearn_kernels.hf import OutputHead, frozen_forward, output_head
from unlearn_kernels.methods import LogitLosses, Method, ResponseLosses, get_method
from unlearn_kernels.methods.base import OBJECTIVE, Needs
from unlearn_kernels.train.checkpoints import (
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from unlearn_kernels.train.config import RunConfig, check_paths, config_yaml, validate_config
from unlearn_kernels.train.model import (
    attach_adapter,
    build_optimizer,
    build_scheduler,
    load_base_model,
    load_run_tokenizer,
    run_device,
    special_token_ids,
)
from unlearn_kernels.train.ngdiff import NGDiffStep, TaskGradients
from unlearn_kernels.train.reference_cache import (
    CacheSettings,
    ReferenceCache,
    build_reference_cache,
)

log = logging.getLogger("unlearn_kernels")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"

#: ``on_eval(step, model) -> {name: value}``: called every ``train.eval_every`` steps (and at
#: step 0) with dropout off and gradients disabled; values are logged as ``eval/<name>``.
EvalHook = Callable[[int, nn.Module], dict[str, float]]


@dataclass
class RunSummary:
    """What :func:`run` made: where, how long the steps took, their peak memory, the metrics."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    seconds: float  # wall time of the training steps (model loading and caching excluded)
    peak_bytes: int  # peak memory during the steps (CPU: resident set; CUDA: allocated)
    peak_extra_bytes: int  # the same above the usage when the steps began
    metrics: list[dict[str, Any]] = field(default_factory=list)


def run(
    config: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_eval: EvalHook | None = None,
) -> RunSummary:
    """Run the unlearning described by ``config`` (see the module docstring)."""
    check_paths(config)
    out = Path(config.output_dir)
    fresh = _prepare_output_dir(out, config, resume)
    try:
        return UnlearningRun(config, out, progress, on_eval).execute(resume)
    except BaseException as err:
        kept = list_checkpoints(out)
        if kept:
            step = checkpoint_step(kept[-1])
            _truncate_metrics(out, step)
            err.add_note(
                f"output_dir {str(out)!r} keeps its last good checkpoint (step {step}); "
                "run again with --resume to continue from it"
            )
        elif fresh:
            shutil.rmtree(out, ignore_errors=True)
            err.add_note(f"output_dir {str(out)!r} was removed: no step had been checkpointed")
        else:
            (out / METRICS_FILE).unlink(missing_ok=True)
        raise


def _prepare_output_dir(out: Path, config: RunConfig, resume: bool) -> bool:
    """Check ``out`` for a new or resumed run and write ``config.yaml``; True if it is new."""
    saved = out / CONFIG_FILE
    if resume:
        if not saved.is_file():
            raise ValueError(f"output_dir {str(out)!r} holds no run to resume ({CONFIG_FILE})")
        before = validate_config(yaml.safe_load(saved.read_text(encoding="utf-8")))
        changed = _changed_keys(before.model_dump(), config.model_dump())
        if changed:
            raise ValueError(
                f"--resume: the config differs from the run in {str(out)!r} at "
                f"{', '.join(changed)}; a resumed run must use the same config"
            )
        if (out / ADAPTER_DIR).exists():
            raise ValueError(f"output_dir {str(out)!r} holds a finished run (adapter/ exists)")
        return False
    if out.exists() and any(out.iterdir()):
        raise ValueError(
            f"output_dir {str(out)!r} is not empty: pass --resume to continue its run, or "
            "choose another directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(saved, config_yaml(config))
    return True


def _changed_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _changed_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys


def _truncate_metrics(out: Path, step: int) -> None:
    """Keep the metrics of steps ``<= step`` (what the checkpoint at ``step`` has seen); a line
    torn by a killed process is dropped."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text_atomically(path, "".join(f"{line}\n" for line in kept))


class UnlearningRun:
    """The state of one run, from the loaded sets to the final adapter: :meth:`execute` is
    :func:`run` after its output directory checks; :meth:`build` (sets, model, caches, adapter,
    optimizer) and :meth:`step` (one optimizer step, returning its logged values) also serve
    callers that drive the steps themselves (the benchmarks)."""

    def __init__(
        self, config: RunConfig, out: Path, progress: bool, on_eval: EvalHook | None
    ) -> None:
        self.config, self.out, self.progress, self.on_eval = config, out, progress, on_eval
        self.device = run_device(config.train)

    # -- setup ---------------------------------------------------------------------------

    def _load_sets(self) -> None:
        config = self.config
        self.tokenizer = load_run_tokenizer(config)
        bos, eos = special_token_ids(self.tokenizer, config.model)
        options = {
            "bos_token_id": bos if config.data.add_bos else None,
            "eos_token_id": eos if config.data.add_eos else None,
            "max_length": config.data.max_length,
            "chat_template": config.data.chat_template,
        }
        self.needs: Needs = get_method(config.method.name)(config.method).needs()
        self.forget = read_split(config.data.forget, self.tokenizer, **options)
        self.retain: TokenizedPairs | None = None
        if self.needs.retain:
            self.retain = read_split(config.data.retain, self.tokenizer, **options)
        train = config.train
        self.sampler = StepSampler(
            len(self.forget),
            len(self.retain) if self.retain is not None else 1,
            batch_size=train.batch_size,
            grad_accum=train.grad_accum,
            seed=train.seed,
            shuffle=train.shuffle,
        )

    def _open_references(self, model: nn.Module) -> None:
        """The reference caches the method needs, built on first use and reused after."""
        ref = self.config.reference
        self.caches: dict[str, ReferenceCache] = {}
        if self.needs.retain_reference:
            settings = CacheSettings(
                topk=ref.topk if ref.kind == "topk" else 0,
                store_hidden=ref.kind == "hidden",
                store_label_logprob=False,
                hidden_dtype=ref.hidden_dtype,
            )
            self.caches["retain"] = self._cache(model, "retain", self.retain, settings)
        if self.needs.forget_logprob:
            settings = CacheSettings(topk=0, store_hidden=False, store_label_logprob=True)
            self.caches["forget"] = self._cache(model, "forget", self.forget, settings)

    def _cache(
        self, model: nn.Module, split: str, data: TokenizedPairs, settings: CacheSettings
    ) -> ReferenceCache:
        path = self.config.reference_dir / split
        checks = {"data": data, "tokenizer": self.tokenizer, "settings": settings}
        if (path / "manifest.json").is_file():
            try:
                cache = ReferenceCache(path, model=model, **checks)
                log.info("reference cache %s reused (fingerprint matches)", path)
                return cache
            except ValueError as err:
                log.warning("reference cache %s is not usable (%s): rebuilding it", path, err)
        log.info("building the reference cache %s (%d examples)", path, len(data))
        build_reference_cache(
            model,
            data,
            path,
            settings,
            tokenizer=self.tokenizer,
            batch_size=self.config.reference.batch_size,
            full_weight_hash=self.config.reference.full_weight_hash,
            overwrite=True,
        )
        return ReferenceCache(path, model=None, **checks)

    def build(self) -> None:
        """Load everything a step needs (writes only the reference caches)."""
        config = self.config
        self._load_sets()
        model = load_base_model(config, self.device)
        self._open_references(model)
        ref_head = None
        if self.needs.retain_reference and config.adapter.kind == "full":
            head = output_head(model)  # its weight will train: keep the reference's
            bias = None if head.bias is None else head.bias.detach().clone()
            ref_head = OutputHead(head.weight.detach().clone(), bias, head.softcap)
        torch.manual_seed(config.train.seed)
        self.model = attach_adapter(model, config.adapter)
        losses_cls = LogitLosses if config.train.loss == "unfused" else ResponseLosses
        losses = losses_cls(
            backend=config.train.backend,
            chunk_size=config.train.chunk_size,
            ref_head=ref_head,
        )
        self.method: Method = get_method(config.method.name)(config.method, losses)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        params = list(self.trainable.values())
        self.optimizer = build_optimizer(params, config.train)
        self.ngdiff: NGDiffStep | None = None
        self.scheduler = None
        if self.method.tasks == ("forget", "retain"):
            self.ngdiff = NGDiffStep(
                TaskGradients(params),
                self.optimizer,
                gen=self.method.gen(),
                eps=self.method.params.eps,
                max_grad_norm=config.train.max_grad_norm,
                backend=config.train.backend,
            )
        if self.ngdiff is None or self.ngdiff.gen is None:
            self.scheduler = build_scheduler(self.optimizer, config.train)

    # -- data ----------------------------------------------------------------------------

    def _batch(self, data: TokenizedPairs, index: list[int], split: str) -> TokenBatch:
        batch = TokenBatch.of(data, index)
        if split in self.caches:
            batch = replace(batch, reference=self.caches[split].batch(index))
        return batch.to(self.device)

    def micro_batches(self, step: int) -> list[MicroBatch]:
        out = []
        for j in range(self.config.train.grad_accum):
            f_index = self.sampler.indices("forget", step, j)
            retain = mismatch = None
            if self.needs.retain:
                r_index = self.sampler.indices("retain", step, j)
                retain = self._batch(self.retain, r_index, "retain")
            if self.needs.mismatch:
                pairs = with_responses(
                    self.forget,
                    f_index,
                    self.retain,
                    self.sampler.mismatch(step, j),
                    self.config.data.max_length,
                )
                mismatch = TokenBatch(
                    pairs.input_ids, pairs.attention_mask, pairs.labels(), f_index
                ).to(self.device)
            out.append(MicroBatch(self._batch(self.forget, f_index, "forget"), retain, mismatch))
        return out

    # -- one step ------------------------------------------------------------------------

    def _backward_task(
        self, task: str, batches: list[MicroBatch], totals: StepTotals, logs: dict[str, float]
    ) -> None:
        for batch in batches:
            for term in self.method.terms(self.model, task, batch, totals):
                term.loss.backward()
                logs[term.name] += term.value
                if task == OBJECTIVE:
                    logs["loss"] += float(term.loss.detach())

    def _task_loss(self, task: str, batches: list[MicroBatch], totals: StepTotals) -> float:
        """The task's loss on the step's batches, dropout off and no gradient (GeN probes)."""
        with frozen_forward(self.model):
            return sum(
                float(term.loss)
                for batch in batches
                for term in self.method.terms(self.model, task, batch, totals)
            )

    def step(self, step: int) -> dict[str, Any]:
        """Optimizer step ``step`` (0-based) on its micro-batches; returns the logged values."""
        batches = self.micro_batches(step)
        totals = StepTotals.of(batches)
        logs: dict[str, Any] = defaultdict(float)
        logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self.ngdiff is None:
            self._backward_task(OBJECTIVE, batches, totals, logs)
            if step == 0:
                self._check_gradients()
            if self.config.train.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(
                    self.trainable.values(), self.config.train.max_grad_norm
                )
                logs["grad_norm"] = float(norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for task in ("forget", "retain"):
                self.ngdiff.grads.accumulate(task)
                self._backward_task(task, batches, totals, logs)
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
            if report.probe is not None:
                logs["gen_lr"] = report.probe.lr
        if self.scheduler is not None:
            self.scheduler.step()
        return dict(logs)

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

    # -- the run -------------------------------------------------------------------------

    def _evaluate(self, step: int) -> dict[str, float]:
        """``on_eval``'s values as ``eval/<name>``; the RNG state is left as it was."""
        rng = torch.get_rng_state()
        with frozen_forward(self.model):
            values = self.on_eval(step, self.model)
        torch.set_rng_state(rng)
        return {f"eval/{k}": float(v) for k, v in values.items()}

    def _state(self) -> dict[str, Any]:
        return {
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "ngdiff_steps": None if self.ngdiff is None else self.ngdiff.steps,
        }

    def _restore(self) -> int:
        kept = list_checkpoints(self.out)
        if not kept:
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            return 0
        state = load_checkpoint(kept[-1], self.trainable, self.optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ngdiff is not None:
            self.ngdiff.steps = state["ngdiff_steps"]
        _truncate_metrics(self.out, state["step"])
        log.info("resumed from %s", kept[-1])
        return state["step"]

    def execute(self, resume: bool) -> RunSummary:
        self.build()
        train = self.config.train
        start = self._restore() if resume else 0
        history: list[dict[str, Any]] = []
        base = reset_peak(self.device)
        started = time.perf_counter()
        with (
            open(self.out / METRICS_FILE, "a", encoding="utf-8") as metrics_file,
            tqdm(
                total=train.steps,
                initial=start,
                desc=f"unlearn {self.config.method.name}",
                disable=not self.progress,
                dynamic_ncols=True,
            ) as bar,
        ):

            def record(metrics: dict[str, Any]) -> None:
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                history.append(metrics)

            if self.on_eval is not None and start == 0:
                record({"step": 0, **self._evaluate(0)})
            for step in range(start, train.steps):
                tick = time.perf_counter()
                metrics = {"step": step + 1, **self.step(step)}
                metrics["seconds"] = time.perf_counter() - tick
                done = step + 1
                if self.on_eval is not None and train.eval_every and done % train.eval_every == 0:
                    metrics.update(self._evaluate(done))
                record(metrics)
                if not all(math.isfinite(v) for v in metrics.values()):
                    log.warning("step %d: a non-finite value in %s", done, metrics)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if _shown(k)})
                bar.update()
                every = train.checkpoint_every
                if every and done % every == 0 and done < train.steps:
                    save_checkpoint(
                        self.out,
                        done,
                        self.trainable,
                        self.optimizer,
                        self._state(),
                        keep=train.keep_checkpoints,
                    )
        seconds = time.perf_counter() - started
        peak = peak_bytes(self.device)
        adapter_dir = self._save_adapter()
        return RunSummary(self.out, adapter_dir, train.steps, seconds, peak, peak - base, history)

    def _save_adapter(self) -> Path:
        def save(tmp: Path) -> None:
            self.model.save_pretrained(tmp)

        adapter_dir = write_dir_atomically(self.out / ADAPTER_DIR, save)
        if self.config.adapter.merge:
            merged = self.model.merge_and_unload()
            write_dir_atomically(self.out / MERGED_DIR, merged.save_pretrained)
        return adapter_dir


def _shown(key: str) -> bool:
    return key not in ("step", "seconds") and not key.startswith("eval/")
