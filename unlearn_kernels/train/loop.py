"""The unlearning loop: a config in, an adapter that has forgotten out.

``run(config)`` validates the config's files, tokenises the forget/retain sets, loads the base
model (plain, or nf4 for QLoRA), builds or reuses the reference caches the method needs (before
any adapter exists: the reference is the base model), attaches the adapter and trains for
``train.steps`` optimizer steps. Each step draws ``grad_accum`` micro-batches per set
(:class:`~unlearn_kernels.data.unlearn.StepSampler`); every term is normalised by the step's
totals and backpropagated as it is computed (:mod:`.steps`, shared with the Trainer drop-in).
Single-objective methods then clip and step; NGDiff accumulates its two tasks into separate
gradients and steps with :class:`~unlearn_kernels.train.ngdiff.NGDiffStep` (GeN probes run with
dropout off, without putting bitsandbytes layers in eval mode:
:func:`~unlearn_kernels.hf.frozen_forward`). Under ``torchrun`` / ``accelerate launch`` the
processes train data-parallel, each on its share of every micro-batch (:mod:`.distributed`);
rank 0 writes the outputs.

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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from unlearn_kernels._io import write_dir_atomically, write_text_atomically
from unlearn_kernels._memory import peak_bytes, reset_peak
from unlearn_kernels.data.formats import TokenizedPairs
from unlearn_kernels.eval.scoring import mean_nll, response_nll
from unlearn_kernels.eval.tofu import probability
from unlearn_kernels.hf import frozen_forward
from unlearn_kernels.train import distributed
from unlearn_kernels.train.checkpoints import (
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from unlearn_kernels.train.config import RunConfig, check_paths, config_yaml, validate_config
from unlearn_kernels.train.model import run_device
from unlearn_kernels.train.steps import UnlearningStep, build_run

log = logging.getLogger("unlearn_kernels")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"

#: ``on_eval(step, model) -> {name: value}``: called every ``train.eval_every`` steps (and at
#: step 0) with dropout off and gradients disabled; values are logged as ``eval/<name>``.
#: Without one, :class:`AnswerProbe` on the run's own sets is used.
EvalHook = Callable[[int, nn.Module], dict[str, float]]


class AnswerProbe:
    """The built-in ``on_eval``: ``forget_prob`` and ``retain_prob``, each
    ``mean_i exp(−ℓ̄_i)`` (TOFU's length-normalised answer probability,
    :func:`unlearn_kernels.eval.tofu.probability`) over the first ``examples`` examples of the
    run's forget and retain sets, scored by the fused per-token cross-entropy."""

    def __init__(
        self, forget: TokenizedPairs, retain: TokenizedPairs | None, examples: int
    ) -> None:
        sets = {"forget_prob": forget, "retain_prob": retain}
        self.sets = {
            name: data.select(range(min(examples, len(data))))
            for name, data in sets.items()
            if data is not None
        }

    def __call__(self, step: int, model: nn.Module) -> dict[str, float]:
        return {
            name: probability(mean_nll(response_nll(model, data)))
            for name, data in self.sets.items()
        }


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
    """Run the unlearning described by ``config`` (see the module docstring).

    Under a launcher (``torchrun``, ``accelerate launch``: ``WORLD_SIZE`` > 1) every process
    runs this; they join one process group and train data-parallel (:mod:`.distributed`).
    """
    check_paths(config)
    out = Path(config.output_dir)
    device = distributed.local_device(run_device(config.train))
    joined = distributed.init_from_environment(device)
    try:
        fresh = _prepare_output_dir(out, config, resume)
        try:
            return UnlearningRun(config, out, progress, on_eval).execute(resume)
        except BaseException as err:
            if distributed.is_main():
                _keep_what_resumes(out, fresh, err)
            raise
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _keep_what_resumes(out: Path, fresh: bool, err: BaseException) -> None:
    """After a failure: keep the last good checkpoint (and its metrics), else remove the run."""
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


def _prepare_output_dir(out: Path, config: RunConfig, resume: bool) -> bool:
    """Check ``out`` for a new or resumed run and write ``config.yaml``; True if it is new.
    Every process checks; rank 0 writes once all have."""
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
    distributed.barrier()
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(saved, config_yaml(config))
    distributed.barrier()
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
        self.device = distributed.local_device(run_device(config.train))

    def build(self) -> None:
        """Load everything a step needs (writes only the reference caches)."""
        parts = build_run(self.config, self.device)
        self.tokenizer, self.data, self.model = parts.tokenizer, parts.data, parts.model
        self.method, self.optimizer, self.scheduler = parts.method, parts.optimizer, parts.scheduler
        self.steps = UnlearningStep(
            self.method,
            self.model,
            self.optimizer,
            max_grad_norm=self.config.train.max_grad_norm,
            backend=self.config.train.backend,
        )
        self.trainable = self.steps.trainable
        if self.on_eval is None and self.config.train.eval_every:
            examples = self.config.train.eval_examples
            self.on_eval = AnswerProbe(self.data.forget, self.data.retain, examples)

    def step(self, step: int) -> dict[str, Any]:
        """Optimizer step ``step`` (0-based) on its micro-batches; returns the logged values."""
        batches, totals = self.data.step(step)
        logs: dict[str, Any] = {"lr": float(self.optimizer.param_groups[0]["lr"])}
        for j, batch in enumerate(batches):
            self.steps.backward(batch, totals, logs, first=j == 0)
        self.steps.finish(batches, totals, logs, step)
        if self.steps.ngdiff is None:
            self.steps.clip_and_step(self.config.train.max_grad_norm, logs)
        if self.scheduler is not None:
            self.scheduler.step()
        return logs

    # -- the run -------------------------------------------------------------------------

    def _evaluate(self, step: int) -> dict[str, float]:
        """``on_eval``'s values as ``eval/<name>``; the RNG state is left as it was."""
        rng = torch.get_rng_state()
        with frozen_forward(self.model):
            values = self.on_eval(step, self.model)
        torch.set_rng_state(rng)
        return {f"eval/{k}": float(v) for k, v in values.items()}

    def _state(self) -> dict[str, Any]:
        return {"scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def _restore(self) -> int:
        kept = list_checkpoints(self.out)
        if not kept:
            if distributed.is_main():
                (self.out / METRICS_FILE).unlink(missing_ok=True)
            return 0
        state = load_checkpoint(kept[-1], self.trainable, self.optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if distributed.is_main():
            _truncate_metrics(self.out, state["step"])
        log.info("resumed from %s", kept[-1])
        return state["step"]

    def execute(self, resume: bool) -> RunSummary:
        self.build()
        train = self.config.train
        start = self._restore() if resume else 0
        history: list[dict[str, Any]] = []
        main = distributed.is_main()
        evaluate = self.on_eval is not None and main  # rank 0 evaluates; the others wait
        base = reset_peak(self.device)
        started = time.perf_counter()
        with (
            open(self.out / METRICS_FILE, "a", encoding="utf-8") if main else nullcontext() as f,
            tqdm(
                total=train.steps,
                initial=start,
                desc=f"unlearn {self.config.method.name}",
                disable=not (self.progress and main),
                dynamic_ncols=True,
            ) as bar,
        ):

            def record(metrics: dict[str, Any]) -> None:
                if f is not None:
                    f.write(json.dumps(metrics) + "\n")
                    f.flush()
                history.append(metrics)

            if evaluate and start == 0:
                record({"step": 0, **self._evaluate(0)})
            for step in range(start, train.steps):
                tick = time.perf_counter()
                metrics = {"step": step + 1, **self.step(step)}
                metrics["seconds"] = time.perf_counter() - tick
                done = step + 1
                if evaluate and train.eval_every and done % train.eval_every == 0:
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
        adapter_dir = self.out / ADAPTER_DIR
        if distributed.is_main():
            write_dir_atomically(adapter_dir, self.model.save_pretrained)
            if self.config.adapter.merge:
                merged = self.model.merge_and_unload()
                write_dir_atomically(self.out / MERGED_DIR, merged.save_pretrained)
        distributed.barrier()
        return adapter_dir


def _shown(key: str) -> bool:
    return key not in ("step", "seconds") and not key.startswith("eval/")
