"""The NGDiff step: task-gradient buffers, accumulation, data parallelism, GeN learning rate."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from oracle import available_backends, generator, rel_err
from torch import Tensor, nn

from unlearn_kernels.ops.ngdiff import _plan
from unlearn_kernels.train.ngdiff import (
    GeN,
    NGDiffStep,
    TaskGradients,
    fit_parabola,
    flat_like,
    probe_losses,
)

BACKENDS = available_backends()


class Toy(nn.Module):
    """Linear → tanh → linear classifier with odd shapes and a frozen tensor; ``mixed`` makes
    the hidden scale bf16 (its ``.grad`` is bf16 and accumulates with bf16 rounding)."""

    def __init__(self, mixed: bool = False) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(13, 7) * 0.3)
        self.b = nn.Parameter(torch.randn(5, 13) * 0.3)
        dtype = torch.bfloat16 if mixed else torch.float32
        self.scale = nn.Parameter(torch.rand(13, dtype=dtype) + 0.5)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.a.t() * self.scale.float()) @ self.b.t() + self.frozen


def nll(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_data(g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 7, generator=g), torch.randint(0, 5, (n,), generator=g)


def split(batch: tuple[Tensor, Tensor], k: int) -> list[tuple[Tensor, Tensor]]:
    return list(zip(batch[0].chunk(k), batch[1].chunk(k), strict=True))


def ngdiff_reference(model: nn.Module, forget, retain) -> tuple[list[Tensor], float, float]:
    """``R/‖R‖ − F/‖F‖`` in float64 from full-batch autograd gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    gf = torch.autograd.grad(nll(model, forget), params)
    gr = torch.autograd.grad(nll(model, retain), params)
    nf = torch.cat([g.double().flatten() for g in gf]).norm()
    nr = torch.cat([g.double().flatten() for g in gr]).norm()
    direction = [r.double() / nr - f.double() / nf for f, r in zip(gf, gr, strict=True)]
    return direction, float(nf), float(nr)


def accumulate(grads: TaskGradients, model, forget, retain, k: int) -> None:
    """Each task's gradient over ``k`` micro-batches of its batch (mean loss / k each)."""
    for task, batch in (("forget", forget), ("retain", retain)):
        grads.accumulate(task)
        for mb in split(batch, k):
            (nll(model, mb) / k).backward()


def assert_direction(params: list[Tensor], reference: dict[int, Tensor], tol: float = 2e-5):
    for p in params:
        ref = reference[id(p)]
        tol_p = tol if p.dtype == torch.float32 else 8e-3  # bf16 storage of the direction
        err = float((p.grad.double() - ref).norm() / ref.norm())
        assert err < tol_p, (tuple(p.shape), err)


def test_flat_like_carves_back_to_back_views_per_dtype():
    tensors = [torch.randn(3, 4), torch.randn(5).bfloat16(), torch.randn(7, 2), torch.randn(1)]
    views, buffers = flat_like(tensors)
    assert [v.shape for v in views] == [t.shape for t in tensors]
    assert [v.dtype for v in views] == [t.dtype for t in tensors]
    assert len(buffers) == 2 and all((b == 0).all() for b in buffers)
    assert sum(b.numel() for b in buffers) == sum(t.numel() for t in tensors)
    fp32 = [v for v in views if v.dtype == torch.float32]
    assert len(_plan(fp32, fp32, fp32).forget) == 1  # one pass over the fp32 buffer


def test_task_gradients_groups_parameters_once():
    model = Toy(mixed=True)
    grads = TaskGradients([model.a, model.scale, model.b, model.a, model.frozen])
    # tied parameters once, grouped by dtype
    assert [id(p) for p in grads.params] == [id(model.a), id(model.b), id(model.scale)]
    assert len(_plan(*[grads.grads["forget"]] * 3).forget) == 2  # one segment per dtype
    with pytest.raises(ValueError, match="requires grad"):
        TaskGradients([model.frozen])
    with pytest.raises(ValueError, match="task must be one of"):
        grads.accumulate("retrain")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "list"])
@pytest.mark.parametrize(
    ("k", "mixed"), [(1, False), (3, False), (1, True)], ids=["batch", "3_micro", "bf16_batch"]
)
def test_accumulated_direction_equals_one_big_batch(backend, flat, k, mixed):
    g, seed = generator()
    model = Toy(mixed)
    forget, retain = make_data(g, 24), make_data(g, 24)
    direction, nf, nr = ngdiff_reference(model, forget, retain)
    reference = {id(p): d for p, d in zip(model.parameters(), direction, strict=False)}
    grads = TaskGradients(model.parameters(), flat=flat)
    accumulate(grads, model, forget, retain, k)
    norms = grads.combine(backend=backend)
    assert math.isclose(float(norms.forget_norm), nf, rel_tol=1e-5), seed
    assert math.isclose(float(norms.retain_norm), nr, rel_tol=1e-5), seed
    assert_direction(grads.params, reference)
    assert model.frozen.grad is None


def test_forget_gradient_survives_replaced_or_cleared_grads():
    """``.grad`` replaced (set_to_none, create_graph, DDP bucket views) is copied back."""
    g, _ = generator()
    model = Toy(mixed=True)
    forget, retain = make_data(g, 16), make_data(g, 16)
    direction, _, _ = ngdiff_reference(model, forget, retain)
    reference = {id(p): d for p, d in zip(model.parameters(), direction, strict=False)}
    grads = TaskGradients(model.parameters())
    grads.accumulate("forget")
    nll(model, forget).backward()
    model.a.grad = model.a.grad.clone()  # replaced by a tensor outside the buffer
    grads.accumulate("retain")
    model.b.grad = None  # cleared: autograd allocates a fresh one
    nll(model, retain).backward()
    grads.combine()
    assert_direction(grads.params, reference)


def test_task_without_backward_counts_as_zero():
    g, _ = generator()
    model = Toy(mixed=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = TaskGradients(model.parameters())
    step = NGDiffStep(grads, optimizer)
    accumulate(grads, model, make_data(g, 8), make_data(g, 8), 1)
    step.step()
    grads.accumulate("retain")  # no forget pass this time (an empty forget batch)
    nll(model, make_data(g, 8)).backward()
    retain_grad = [p.grad.clone() for p in grads.params]
    report = step.step()
    assert report.flags == ("forget_zero",) and report.stepped
    assert report.forget_norm == 0.0 and report.cosine == 0.0
    unit = torch.cat([r.double().flatten() for r in retain_grad])
    unit = unit / unit.norm()
    got = torch.cat([p.grad.double().flatten() for p in grads.params])
    assert float((got - unit).norm()) < 4e-3  # bf16 entries round


@pytest.mark.parametrize("which", ["forget", "both"])
def test_non_finite_gradient_is_reported_and_parameters_stay_finite(which):
    g, _ = generator()
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    grads = TaskGradients(model.parameters())
    step = NGDiffStep(grads, optimizer)
    before = copy.deepcopy(model.state_dict())
    grads.accumulate("forget")
    (nll(model, make_data(g, 8)) * float("inf")).backward()
    grads.accumulate("retain")
    scale = float("nan") if which == "both" else 1.0
    (nll(model, make_data(g, 8)) * scale).backward()
    with pytest.warns(RuntimeWarning, match="non-finite gradient norm"):
        report = step.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if which == "both":
        assert report.flags == ("forget_nonfinite", "retain_nonfinite") and not report.stepped
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert optimizer.state_dict()["state"] == {}
    else:
        assert report.flags == ("forget_nonfinite",) and report.stepped
        assert math.isnan(report.cosine)


def test_fit_parabola_is_exact_and_acceptance_rule():
    g0, h, c, lr = 1.7, 0.37, 2.0, 0.9

    def loss(t: float) -> float:  # L(θ₀ − t·u)
        return c - g0 * t + 0.5 * h * t * t

    fit = fit_parabola(loss(-lr), loss(0.0), loss(lr), lr)
    assert fit.accepted
    assert math.isclose(fit.gu, g0, rel_tol=1e-12) and math.isclose(fit.uhu, h, rel_tol=1e-12)
    assert math.isclose(fit.lr, g0 / h, rel_tol=1e-12)
    assert not fit_parabola(loss(lr), loss(0.0), loss(-lr), lr).accepted  # Gg < 0
    assert not fit_parabola(1.0, 2.0, 1.5, lr).accepted  # gHg < 0
    assert not fit_parabola(float("nan"), 2.0, 1.5, lr).accepted
    assert not fit_parabola(1.0, 1.0, 1.0, lr).accepted  # flat: no curvature
    gen = GeN(smoothing=0.9, max_ratio=2.0)
    assert math.isclose(gen.next_lr(1.0, fit), 0.9 + 0.1 * 2.0)  # η* = 4.6 clipped to 2η
    far = fit_parabola(loss(-20.0), loss(0.0), loss(20.0), 20.0)  # probes far past η*
    assert math.isclose(far.lr, g0 / h, rel_tol=1e-12)
    assert math.isclose(gen.next_lr(20.0, far), 0.9 * 20 + 0.1 * 10)  # clipped to η/2
    assert gen.next_lr(1.0, fit_parabola(1.0, 2.0, 1.5, lr)) == 1.0  # rejected: unchanged
    for bad in (dict(every=0), dict(smoothing=1.0), dict(max_ratio=0.5)):
        with pytest.raises(ValueError):
            GeN(**bad)
    for lr in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lr must be a positive finite float"):
            fit_parabola(1.0, 1.0, 1.0, lr)


def test_gen_rejects_a_zero_learning_rate():
    g, _ = generator()
    model = Quadratic(g)
    for lr in (0.0, float("nan")):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be a positive"):
            NGDiffStep(TaskGradients(model.parameters()), optimizer, gen=GeN())
        NGDiffStep(TaskGradients(model.parameters()), optimizer)  # no GeN: no probe, no check


class Quadratic(nn.Module):
    """Retain loss ½(θ−c)ᵀA(θ−c) (A SPD), forget loss wᵀθ: the probe loss is quadratic."""

    def __init__(self, g: torch.Generator, n: int = 9) -> None:
        super().__init__()
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.A = m @ m.t() / n + torch.eye(n, dtype=torch.float64)
        self.c = torch.randn(n, generator=g, dtype=torch.float64)
        self.w = torch.randn(n, generator=g, dtype=torch.float64)
        self.theta = nn.Parameter(torch.randn(n, generator=g))

    def retain(self) -> Tensor:
        e = self.theta.double() - self.c
        return 0.5 * e @ self.A @ e

    def forget(self) -> Tensor:
        return self.w @ self.theta.double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gen_step_recovers_exact_line_minimiser(backend):
    """With SGD the update is d = ∇P (norms frozen), so η* must be ‖d‖²/(dᵀ∇²P d)."""
    g, seed = generator()
    model = Quadratic(g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    step = NGDiffStep(
        TaskGradients(model.parameters()), optimizer, gen=GeN(every=1), backend=backend
    )
    step.grads.accumulate("forget")
    model.forget().backward()
    step.grads.accumulate("retain")
    model.retain().backward()
    theta0 = model.theta.detach().double().clone()
    e = theta0 - model.c
    g_r, g_f = model.A @ e, model.w
    d = g_r / g_r.norm() - g_f / g_f.norm()
    exact = float(d @ d / (d @ (model.A / g_r.norm()) @ d))
    report = step.step(forget_loss=model.forget, retain_loss=model.retain)
    assert report.probe is not None and report.probe.fit.accepted, seed
    assert math.isclose(report.probe.fit.lr, exact, rel_tol=1e-4), (report.probe, exact, seed)
    expected_lr = GeN().next_lr(0.3, report.probe.fit)
    assert math.isclose(optimizer.param_groups[0]["lr"], expected_lr, rel_tol=1e-12)


def _state_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not _state_equal(x, y):
                return False
        elif isinstance(x, Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_probe_leaves_parameters_and_optimizer_state_untouched():
    g, _ = generator()
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    grads = TaskGradients(model.parameters())
    step = NGDiffStep(grads, optimizer)
    for _ in range(2):
        accumulate(grads, model, make_data(g, 8), make_data(g, 8), 1)
        step.step()
    params = grads.params
    start = [p.detach() + 0.01 * torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    snapshot = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    batch = make_data(g, 8)
    losses = probe_losses(params, start, lambda: nll(model, batch))
    assert all(math.isfinite(x) for x in losses)
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot, strict=True))
    assert _state_equal(optimizer.state_dict(), state)
    assert all(p.grad is not None for p in params)  # grads untouched as well


def test_gen_probing_changes_only_the_learning_rate():
    """Same data, with and without GeN: bit-identical parameters and optimizer state after the
    step (the learning rate aside, which GeN sets for the next step)."""
    g, _ = generator()
    forget, retain = make_data(g, 12), make_data(g, 12)
    runs = []
    for gen in (None, GeN(every=1)):
        torch.manual_seed(0)
        model = Toy()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        step = NGDiffStep(TaskGradients(model.parameters()), optimizer, gen=gen)
        accumulate(step.grads, model, forget, retain, 2)
        report = step.step(
            forget_loss=lambda m=model: nll(m, forget), retain_loss=lambda m=model: nll(m, retain)
        )
        runs.append((model, optimizer, report))
    (m0, o0, r0), (m1, o1, r1) = runs
    assert r0.probe is None and r1.probe is not None
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters(), strict=True))
    s0, s1 = o0.state_dict(), o1.state_dict()
    assert _state_equal(s0["state"], s1["state"])
    assert o1.param_groups[0]["lr"] == r1.probe.lr


def test_gen_probes_every_k_steps():
    g, _ = generator()
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step = NGDiffStep(TaskGradients(model.parameters()), optimizer, gen=GeN(every=3))
    forget, retain = make_data(g, 8), make_data(g, 8)
    probed = []
    for _ in range(7):
        accumulate(step.grads, model, forget, retain, 1)
        report = step.step(
            forget_loss=lambda: nll(model, forget), retain_loss=lambda: nll(model, retain)
        )
        probed.append(report.probe is not None)
    assert probed == [True, False, False, True, False, False, True]
    for _ in range(2):
        accumulate(step.grads, model, forget, retain, 1)
        step.step()  # steps 7 and 8 do not probe: no closures needed
    snapshot = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="GeN probing needs"):
        step.step(forget_loss=lambda: nll(model, forget))  # step 9 probes
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot, strict=True))


def _dp_worker(rank: int, world: int, init_file: str, out_file: str, data: dict) -> None:
    """One rank: its half of each batch, two micro-batches per task, plain all-reduce
    (``TaskGradients(all_reduce=True)``) and DistributedDataParallel with ``no_sync``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = {task: tuple(t.chunk(world)[rank] for t in data[task]) for task in data}
        results = {}
        for mode in ("all_reduce", "ddp"):
            torch.manual_seed(0)
            model = Toy()
            runner = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
            grads = TaskGradients(model.parameters(), all_reduce=mode == "all_reduce")
            for task in ("forget", "retain"):
                grads.accumulate(task)
                first, last = split(shard[task], 2)
                if mode == "ddp":
                    with runner.no_sync():
                        (nll(runner, first) / 2).backward()
                else:
                    (nll(runner, first) / 2).backward()
                (nll(runner, last) / 2).backward()
            norms = grads.combine()
            results[mode] = ([p.grad.clone() for p in grads.params], [float(n) for n in norms])
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # All work is done and saved. Leave without gloo's C++ teardown, which sometimes aborts
    # the process at exit ("terminate called without an active exception") on this machine.
    os._exit(0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_data_parallel_combines_after_the_all_reduce(tmp_path):
    g, _ = generator()
    data = {"forget": make_data(g, 16), "retain": make_data(g, 16)}
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), out_file, data), nprocs=2)
    results = torch.load(out_file, weights_only=True)
    torch.manual_seed(0)
    model = Toy()
    grads = TaskGradients(model.parameters())
    accumulate(grads, model, data["forget"], data["retain"], 1)
    norms = grads.combine()
    for mode in ("all_reduce", "ddp"):
        directions, got_norms = results[mode]
        assert all(
            math.isclose(a, float(b), rel_tol=1e-5, abs_tol=1e-6)
            for a, b in zip(got_norms, norms, strict=True)
        ), mode
        for p, d in zip(grads.params, directions, strict=True):
            tol = 1e-5 if p.dtype == torch.float32 else 8e-3
            assert float((d.double() - p.grad.double()).norm() / p.grad.double().norm()) < tol


@pytest.mark.hf
def test_peft_lora_training_loop():
    pytest.importorskip("peft")
    from hf_helpers import lora, random_pairs, tiny_llama

    g, _ = generator()
    model = lora(tiny_llama(0)).eval()  # eval: deterministic probes
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = [p.detach().clone() for p in params]
    grads = TaskGradients(params)
    assert len(_plan(*[grads.grads["forget"]] * 3).forget) == 1  # LoRA grads: one flat buffer
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    step = NGDiffStep(grads, optimizer, gen=GeN(every=1))

    def loss(batch) -> Tensor:
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
        return out.loss

    forget, retain = random_pairs(g, 4), random_pairs(g, 4)
    for _ in range(2):
        grads.accumulate("forget")
        loss(forget).backward()
        grads.accumulate("retain")
        loss(retain).backward()
        report = step.step(forget_loss=lambda: loss(forget), retain_loss=lambda: loss(retain))
        assert report.stepped and report.flags == () and report.probe is not None
        assert all(math.isfinite(x) for x in report.probe.losses)
    assert all(not torch.equal(p, b) for p, b in zip(params, lora_before, strict=True))
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], p) for n, p in frozen.items())


def _fsdp_worker(rank: int, world: int, init_file: str, out_file: str, data: dict) -> None:
    """One rank of a ``fully_shard`` model: its half of each batch, two micro-batches per task,
    the gradients reduce-scattered by FSDP into the task buffers, the norms all-reduced by the
    combine; then an SGD step with GeN (probe losses averaged over the ranks)."""
    import warnings

    warnings.simplefilter("error", RuntimeWarning)  # stale probes fail instead of warning
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = Toy()
        fully_shard(model, mesh=mesh, reshard_after_forward=True)  # the probes move the shards
        grads = TaskGradients(model.parameters())
        assert grads.shard_group is not None
        local = sum(g.numel() for g in grads.grads["forget"])
        assert local < sum(p.numel() for p in grads.params)  # a shard, not the whole gradient
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = NGDiffStep(grads, optimizer, gen=GeN(every=1))
        shard = {task: tuple(t.chunk(world)[rank] for t in data[task]) for task in data}
        accumulate(grads, model, shard["forget"], shard["retain"], 2)
        report = step.step(
            forget_loss=lambda: nll(model, shard["forget"]),
            retain_loss=lambda: nll(model, shard["retain"]),
        )
        full = [p.full_tensor() for p in grads.params]
        if rank == 0:
            torch.save({"params": full, "report": [report.forget_norm, report.retain_norm,
                        report.cosine, report.probe.lr]}, out_file)  # fmt: skip
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # as in _dp_worker: skip gloo's C++ teardown once the results are saved


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp_shards_take_the_ngdiff_step_of_one_process(tmp_path):
    g, _ = generator()
    data = {"forget": make_data(g, 16), "retain": make_data(g, 16)}
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), out_file, data), nprocs=2)
    results = torch.load(out_file, weights_only=True)
    torch.manual_seed(0)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = NGDiffStep(TaskGradients(model.parameters()), optimizer, gen=GeN(every=1))
    accumulate(step.grads, model, data["forget"], data["retain"], 1)
    report = step.step(
        forget_loss=lambda: nll(model, data["forget"]),
        retain_loss=lambda: nll(model, data["retain"]),
    )
    expected = [report.forget_norm, report.retain_norm, report.cosine, report.probe.lr]
    for got, want in zip(results["report"], expected, strict=True):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7), (results["report"], expected)
    for got, want in zip(results["params"], step.grads.params, strict=True):
        assert rel_err(got, want) < 1e-6


def test_probes_that_do_not_see_the_parameters_warn():
    g, _ = generator()
    model = Toy()
    step = NGDiffStep(
        TaskGradients(model.parameters()),
        torch.optim.SGD(model.parameters(), lr=0.1),
        gen=GeN(every=1),
    )
    accumulate(step.grads, model, make_data(g, 8), make_data(g, 8), 1)
    frozen = float(nll(model, make_data(g, 8)).detach())  # a loss fixed before the probes
    with pytest.warns(RuntimeWarning, match="probe losses are identical"):
        report = step.step(forget_loss=lambda: frozen, retain_loss=lambda: frozen)
    assert not report.probe.fit.accepted
