"""The NGDiff step (docs/design.md §1): task-gradient buffers, the normalised combine and the GeN
learning rate, around any ``torch.optim`` optimizer.

A loop over a PEFT (LoRA) model::

    params = [p for p in model.parameters() if p.requires_grad]
    grads = TaskGradients(params)          # LoRA .grad become views of two flat buffers
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ngdiff = NGDiffStep(grads, optimizer, gen=GeN(every=10))
    for forget_mbs, retain_mbs in loader:                 # micro-batches of one step
        grads.accumulate("forget")
        for mb in forget_mbs:
            (forget_nll(model, mb) / len(forget_mbs)).backward()
        grads.accumulate("retain")
        for mb in retain_mbs:
            (retain_nll(model, mb) / len(retain_mbs)).backward()
        report = ngdiff.step(
            forget_loss=lambda: sum(forget_nll(model, mb) for mb in forget_mbs) / len(forget_mbs),
            retain_loss=lambda: sum(retain_nll(model, mb) for mb in retain_mbs) / len(retain_mbs),
        )

The gradients of each task are accumulated over its micro-batches in its own buffer (the
forget gradient is kept while the retain backward runs, without a copy: ``.grad`` is simply
re-pointed), and the norms are taken once, on the accumulated gradient. Under data
parallelism the combine runs after the all-reduce: with ``DistributedDataParallel`` (use
``model.no_sync()`` on all but the last micro-batch of each task, as usual) the buffers
already hold the reduced gradients; without it, ``TaskGradients(all_reduce=True)`` averages
both buffers over the process group before combining. Under FSDP2 (``fully_shard``: the
parameters are ``DTensor`` shards) the buffers hold each process's shard of the reduced
gradients (FSDP accumulates into them) and the combine all-reduces its three sums over the
shards' process group, so the norms are global and the write stays one pass over the shard.

Zero and non-finite gradients follow :mod:`unlearn_kernels.ops.ngdiff`: a zero task gradient
(an empty forget batch, or a task with no backward this step) contributes nothing; a
non-finite one is dropped (with a ``RuntimeWarning``); when neither task contributes, the
optimizer step is skipped. :class:`StepReport` records which rule applied.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from unlearn_kernels.ops.ngdiff import (
    NGDiffNorms,
    combine_coefficients,
    local_tensor,
    ngdiff_combine,
)

TASKS = ("forget", "retain")


def flat_like(tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Zero tensors shaped like ``tensors``, carved in order out of one flat buffer per
    (device, dtype): returns ``(views, buffers)``. Views of one buffer are back to back, so
    :func:`~unlearn_kernels.ops.ngdiff.ngdiff_combine` sweeps each buffer in a single pass."""
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        sizes[key] = sizes.get(key, 0) + t.numel()
    buffers = {key: torch.zeros(n, dtype=key[1], device=key[0]) for key, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = []
    for t in tensors:
        key = (t.device, t.dtype)
        views.append(buffers[key][offsets[key] : offsets[key] + t.numel()].view(t.shape))
        offsets[key] += t.numel()
    return views, list(buffers.values())


class TaskGradients:
    """A forget and a retain gradient for the same parameters.

    :meth:`accumulate` routes the following backward passes into one task's gradient (it
    zeroes that task's buffer and points every parameter's ``.grad`` at it); the other task's
    gradient is left untouched. :meth:`combine` then writes the NGDiff direction into the
    parameters' ``.grad``. With ``flat=True`` each task's gradients are views of one flat
    buffer per (device, dtype) (the combine's fast path); parameters are kept grouped by
    (device, dtype) in :attr:`params`. If something replaces a ``.grad`` (``set_to_none``, a
    ``create_graph`` backward, DDP's bucket views), its value is copied back into the buffer.
    ``DTensor`` parameters (FSDP2) get buffers shaped like their local shards; their norms are
    global over ``process_group`` (default: the group of their 1-D device mesh).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        flat: bool = True,
        all_reduce: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        trainable = list({id(p): p for p in params if p.requires_grad}.values())  # tied: once
        if not trainable:
            raise ValueError("params must contain at least one tensor that requires grad")
        keys = list(dict.fromkeys((p.device, p.dtype) for p in trainable))
        self.params = sorted(trainable, key=lambda p: keys.index((p.device, p.dtype)))
        self.all_reduce = all_reduce
        self.process_group = process_group
        shards = [p for p in self.params if isinstance(p, DTensor)]
        self.shard_group = None
        if shards:
            self.shard_group = process_group or shards[0].device_mesh.get_group()
        local = [local_tensor(p) for p in self.params]
        self.grads: dict[str, list[Tensor]] = {}
        self._buffers: dict[str, list[Tensor]] = {}
        for task in TASKS:
            if flat:
                self.grads[task], self._buffers[task] = flat_like(local)
            else:
                self.grads[task] = [torch.zeros_like(t) for t in local]
                self._buffers[task] = self.grads[task]
        self.active: str | None = None
        self._fresh: set[str] = set()

    def accumulate(self, task: str, *, fresh: bool = True) -> None:
        """Make the following backward passes add into ``task``'s gradient, zeroed first when
        ``fresh`` (``fresh=False`` continues it: micro-batches that alternate the tasks)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self._capture()
        if fresh or task not in self._fresh:
            torch._foreach_zero_(self._buffers[task])
        self._attach(task)
        self.active = task
        self._fresh.add(task)

    def combine(
        self, *, eps: float = 1e-12, forget_sign: float = -1.0, backend: str | None = None
    ) -> NGDiffNorms:
        """All-reduce (if asked), then ``p.grad ← R/max(‖R‖,eps) + forget_sign·F/max(‖F‖,eps)``.

        A task not accumulated since the last combine counts as a zero gradient.
        """
        self._capture()
        for task in TASKS:
            if task not in self._fresh:
                torch._foreach_zero_(self._buffers[task])
        if self.all_reduce:
            self._all_reduce()
        norms = ngdiff_combine(
            self.grads["forget"],
            self.grads["retain"],
            eps=eps,
            forget_sign=forget_sign,
            backend=backend,
            process_group=self.shard_group,
        )
        self._attach("retain")
        self.active = None
        self._fresh.clear()
        return norms

    def _attach(self, task: str) -> None:
        for p, g in zip(self.params, self.grads[task], strict=True):
            if isinstance(p, DTensor):
                g = DTensor.from_local(
                    g,
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
            p.grad = g

    def _capture(self) -> None:
        """Make the active task's buffer hold what backward left in ``.grad``."""
        if self.active is None:
            return
        with torch.no_grad():
            for p, g in zip(self.params, self.grads[self.active], strict=True):
                if p.grad is None:
                    g.zero_()
                elif local_tensor(p.grad).data_ptr() != g.data_ptr():
                    g.copy_(local_tensor(p.grad))

    def _all_reduce(self) -> None:
        world = dist.get_world_size(self.process_group)
        buffers = [b for task in TASKS for b in self._buffers[task]]
        works = [dist.all_reduce(b, group=self.process_group, async_op=True) for b in buffers]
        for work in works:
            work.wait()
        torch._foreach_div_(buffers, world)


@dataclass(frozen=True)
class GeN:
    """GeN learning rate (generalised Newton, docs/design.md §1).

    Every ``every`` optimizer steps, right after the step ``θ ← θ₀ − δ`` (``δ = η·u``: ``u`` is
    the optimizer's actual update per unit of learning rate), the probe loss is evaluated at
    ``θ₀ + δ``, ``θ₀``, ``θ₀ − δ`` (:func:`probe_losses`) and the exact parabola through the
    three points gives ``η*`` (:func:`fit_parabola`). When accepted, every parameter group's
    learning rate is scaled, for the following steps, so that group 0's becomes
    ``smoothing·η + (1 − smoothing)·clip(η*, η/max_ratio, max_ratio·η)``.
    """

    every: int = 1
    smoothing: float = 0.9
    max_ratio: float = 2.0

    def __post_init__(self) -> None:
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"every must be a positive int, got {self.every!r}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing!r}")
        if not self.max_ratio >= 1.0:
            raise ValueError(f"max_ratio must be ≥ 1, got {self.max_ratio!r}")

    def next_lr(self, lr: float, fit: ParabolaFit) -> float:
        """The smoothed learning rate after ``fit`` (``lr`` unchanged when not accepted)."""
        if not fit.accepted:
            return lr
        clipped = min(max(fit.lr, lr / self.max_ratio), lr * self.max_ratio)
        return self.smoothing * lr + (1.0 - self.smoothing) * clipped


@dataclass(frozen=True)
class ParabolaFit:
    """Exact parabola through ``L(θ₀ − r·η·u)`` at ``r = −1, 0, +1``."""

    gu: float  # Gg  = (L₋ − L₊)/(2η): slope along −u
    uhu: float  # gHg = (L₊ + L₋ − 2L₀)/η²: curvature along u
    lr: float  # η*  = Gg/gHg (NaN when the curvature is 0)
    accepted: bool  # both positive (and every loss finite)


def _check_lr(name: str, lr: object) -> None:
    value = float(lr) if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite float for GeN, got {lr!r}")


def fit_parabola(loss_minus: float, loss_zero: float, loss_plus: float, lr: float) -> ParabolaFit:
    """Fit ``L(θ₀ − t·u) = L₀ − t·Gg + t²·gHg/2`` exactly through the probes at ``t = −η, 0, η``
    (``loss_minus`` at ``θ₀ + η·u``, ``loss_plus`` at ``θ₀ − η·u``); its minimiser is
    ``η* = Gg/gHg``. ``lr`` must be positive and finite (the probes are ``±lr`` apart)."""
    _check_lr("lr", lr)
    gu = (loss_minus - loss_plus) / (2.0 * lr)
    uhu = (loss_plus + loss_minus - 2.0 * loss_zero) / (lr * lr)
    finite = all(math.isfinite(x) for x in (loss_minus, loss_zero, loss_plus, gu, uhu))
    accepted = finite and gu > 0.0 and uhu > 0.0
    return ParabolaFit(gu, uhu, gu / uhu if finite and uhu != 0.0 else math.nan, accepted)


def probe_losses(
    params: Sequence[Tensor], start: Sequence[Tensor], loss_fn: Callable[[], Tensor | float]
) -> tuple[float, float, float]:
    """``(L(θ₀ + δ), L(θ₀), L(θ₀ − δ))`` with ``θ₀ = start`` and ``θ₀ − δ`` the current params.

    Runs ``loss_fn`` three times under ``torch.no_grad()``; the parameters are restored
    bit for bit afterwards, and nothing else (optimizer state included) is touched. Sharded
    (``DTensor``) parameters are moved through their local shards.
    """
    params = [local_tensor(p) for p in params]
    start = [local_tensor(t) for t in start]
    with torch.no_grad():
        current = [p.detach().clone() for p in params]
        try:
            loss_plus = float(loss_fn())
            torch._foreach_copy_(params, start)
            loss_zero = float(loss_fn())
            torch._foreach_mul_(params, 2.0)
            torch._foreach_sub_(params, current)  # θ₀ + δ = 2θ₀ − (θ₀ − δ)
            loss_minus = float(loss_fn())
        finally:
            torch._foreach_copy_(params, current)
    return loss_minus, loss_zero, loss_plus


@dataclass(frozen=True)
class ProbeReport:
    losses: tuple[float, float, float]  # probe loss at θ₀ + δ, θ₀, θ₀ − δ
    fit: ParabolaFit
    lr: float  # group 0's learning rate after the update


@dataclass(frozen=True)
class StepReport:
    forget_norm: float
    retain_norm: float
    cosine: float
    flags: tuple[str, ...]  # "forget_zero", "forget_nonfinite", "retain_zero", "retain_nonfinite"
    stepped: bool  # False when neither task contributed (the optimizer step was skipped)
    lr: float  # group 0's learning rate used by this step
    probe: ProbeReport | None
    grad_norm: float | None = None  # the direction's norm before clipping (when clipping)


class NGDiffStep:
    """``θ ← optimizer step along d = R/‖R‖ − F/‖F‖`` and, every ``gen.every`` steps, a GeN
    learning-rate update.

    The default probe loss is the normalised objective whose gradient is ``d`` (norms frozen
    at this step): ``P(θ) = L_R(θ)/max(‖R‖,eps) + forget_sign·L_F(θ)/max(‖F‖,eps)``, from the
    ``forget_loss`` / ``retain_loss`` closures given to :meth:`step`; ``probe_loss`` replaces
    it. The closures must recompute the step's losses on the same batch with the same scaling
    as the backward passes, deterministically (eval mode or no dropout). Under
    ``torch.distributed`` the probe losses are averaged over the process group so that every
    rank applies the same learning rate. GeN sets the optimizer's learning rates itself: do not
    combine it with another learning-rate scheduler. ``max_grad_norm`` clips the combined
    direction before the optimizer step.

    The probes move the parameters in place between forwards. FSDP2 keeps the root module's
    parameters gathered after a forward by default, so later forwards would not see the move:
    shard the root with ``fully_shard(model, reshard_after_forward=True)`` (or call
    ``model.reshard()`` in the closures). Three identical probe losses raise a warning.
    """

    def __init__(
        self,
        grads: TaskGradients,
        optimizer: torch.optim.Optimizer,
        *,
        gen: GeN | None = None,
        eps: float = 1e-12,
        forget_sign: float = -1.0,
        max_grad_norm: float | None = None,
        backend: str | None = None,
    ) -> None:
        if gen is not None:  # GeN's probes lie ±lr apart
            for j, group in enumerate(optimizer.param_groups):
                _check_lr(f"optimizer.param_groups[{j}]['lr']", group.get("lr"))
        self.grads = grads
        self.optimizer = optimizer
        self.gen = gen
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        self.forget_sign = forget_sign
        self.backend = backend

    @property
    def steps(self) -> int:
        """Optimizer steps taken (GeN probes when ``steps % gen.every == 0``). Kept in the
        optimizer's first parameter group (``ngdiff_steps``), beside the learning rate GeN sets,
        so that any checkpoint of the optimizer carries it."""
        return self.optimizer.param_groups[0].get("ngdiff_steps", 0)

    @steps.setter
    def steps(self, value: int) -> None:
        self.optimizer.param_groups[0]["ngdiff_steps"] = value

    def step(
        self,
        *,
        forget_loss: Callable[[], Tensor | float] | None = None,
        retain_loss: Callable[[], Tensor | float] | None = None,
        probe_loss: Callable[[], Tensor | float] | None = None,
    ) -> StepReport:
        """Combine the accumulated task gradients, step the optimizer, maybe probe."""
        due = self.gen is not None and self.steps % self.gen.every == 0
        if due and probe_loss is None and (forget_loss is None or retain_loss is None):
            raise ValueError("GeN probing needs forget_loss and retain_loss (or probe_loss)")
        norms = self.grads.combine(eps=self.eps, forget_sign=self.forget_sign, backend=self.backend)
        forget_norm, retain_norm = float(norms.forget_norm), float(norms.retain_norm)
        flags = tuple(
            f"{task}_{'zero' if norm == 0.0 else 'nonfinite'}"
            for task, norm in (("forget", forget_norm), ("retain", retain_norm))
            if not (math.isfinite(norm) and norm > 0.0)
        )
        if any(f.endswith("nonfinite") for f in flags):
            warnings.warn(
                f"NGDiff: non-finite gradient norm (forget {forget_norm}, retain {retain_norm}); "
                "that task is dropped from this step",
                RuntimeWarning,
                stacklevel=2,
            )
        lr = float(self.optimizer.param_groups[0]["lr"])
        stepped = len(flags) < 2
        probe = grad_norm = None
        if stepped:
            params = self.grads.params
            start = [local_tensor(p).detach().clone() for p in params] if due else []
            if self.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
            self.optimizer.step()
            if due:
                loss_fn = probe_loss or self._default_probe(norms, forget_loss, retain_loss)
                probe = self._probe(params, start, loss_fn, lr)
            self.steps += 1
        cosine = float(norms.cosine)
        return StepReport(forget_norm, retain_norm, cosine, flags, stepped, lr, probe, grad_norm)

    def _default_probe(
        self,
        norms: NGDiffNorms,
        forget_loss: Callable[[], Tensor | float],
        retain_loss: Callable[[], Tensor | float],
    ) -> Callable[[], float]:
        """``a·L_R + b·L_F`` with the combine's coefficients (a dropped task is not evaluated)."""
        a, b = combine_coefficients(
            norms.forget_norm, norms.retain_norm, eps=self.eps, forget_sign=self.forget_sign
        ).tolist()

        def loss() -> float:
            retain = a * float(retain_loss()) if a else 0.0
            return retain + (b * float(forget_loss()) if b else 0.0)

        return loss

    def _probe(
        self,
        params: list[Tensor],
        start: list[Tensor],
        loss_fn: Callable[[], Tensor | float],
        lr: float,
    ) -> ProbeReport:
        losses = probe_losses(params, start, loss_fn)
        if losses[0] == losses[1] == losses[2]:
            warnings.warn(
                "GeN: the three probe losses are identical; the forward did not see the probed "
                "parameters (an FSDP2 root keeps its gathered parameters after forward: use "
                "reshard_after_forward=True) or the step is below float resolution",
                RuntimeWarning,
                stacklevel=3,
            )
        if dist.is_available() and dist.is_initialized():
            group = self.grads.process_group
            mean = torch.tensor(losses, dtype=torch.float64, device=params[0].device)
            dist.all_reduce(mean, group=group)
            losses = tuple((mean / dist.get_world_size(group)).tolist())
        fit = fit_parabola(*losses, lr)
        new_lr = self.gen.next_lr(lr, fit)
        if new_lr != lr:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * (new_lr / lr)
        return ProbeReport(losses, fit, new_lr)
