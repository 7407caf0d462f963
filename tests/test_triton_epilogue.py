"""Triton CE and KL epilogues under the interpreter, against a float64 oracle, in every
autotuned configuration.

``TRITON_INTERPRET`` is read when ``@triton.jit`` runs, and Triton's own library (``tl.sum``,
``tl.max``, ``tl.zeros``) is decorated when ``triton`` is first imported; Triton also reads
the variable lazily later on (e.g. when it first imports its gluon package during a launch).
So this module sets it *before* importing triton and, when that put triton in interpreter
mode, leaves it set: the process is then in interpreter mode for good and the variable says
so truthfully (exactly as under ``TRITON_INTERPRET=1 pytest``, which is how CI runs Triton
tests). Tests that need it unset should use ``monkeypatch.delenv``. If triton was already
imported in compiled mode by an earlier module, the variable is put back as it was, the
in-process tests skip, and one test re-runs this file in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_CHILD_FLAG = "UNLEARN_KERNELS_TRITON_CHILD"
_saved_interpret = os.environ.get("TRITON_INTERPRET")
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from unlearn_kernels._options import CERowMath, KLRowMath  # noqa: E402
from unlearn_kernels.backends import torch_backend, triton_backend  # noqa: E402
from unlearn_kernels.backends import triton_cross_entropy as tce  # noqa: E402
from unlearn_kernels.backends import triton_kl as tkl  # noqa: E402
from unlearn_kernels.backends.triton_cross_entropy import triton_interpreter_active  # noqa: E402

if not triton_interpreter_active():  # too late for this process: leave the environment alone
    if _saved_interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved_interpret

# tl.where evaluates both branches: the interpreter's numpy warns on the discarded one
pytestmark = [
    pytest.mark.triton,
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

IN_PROCESS = triton_interpreter_active()
IN_CHILD = os.environ.get(_CHILD_FLAG) == "1"
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS and not IN_CHILD,
    reason="triton was imported in compiled mode before this module; see test_in_child_process",
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ce_forward(backend, x, target, grad_scale, softcap):
    """``backend``'s epilogue for the plain cross-entropy (only softcap set): ``(loss, lse)``."""
    return tuple(backend.ce_forward(x, target, grad_scale, CERowMath(softcap=softcap))[:2])


def ce_backward(backend, x, target, lse, grad_scale, softcap):
    return backend.ce_backward(x, target, lse, grad_scale, CERowMath(softcap=softcap))


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere fails."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def oracle(
    x: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | None,
    cap: float | None,
):
    """float64 loss, lse and gradient of Σ_i scale_i·ℓ_i on the upcast input."""
    xd = x.double()
    z = xd if cap is None else cap * torch.tanh(xd / cap)
    lse = torch.logsumexp(z, dim=1)
    loss = lse - z.gather(1, target[:, None]).squeeze(1)
    grad = None
    if scale is not None:
        grad = torch.exp(z - lse[:, None])
        grad[torch.arange(x.shape[0]), target] -= 1.0
        grad *= scale.double()[:, None]
        if cap is not None:
            # sech² = 1/cosh², not 1 − tanh²: in float64 the latter has absolute error 1e-16,
            # i.e. it is wrong (or 0) for |x/c| ≳ 15, where the kernel is still exact
            grad *= torch.cosh(xd / cap) ** -2
    return loss, lse, grad


def torch_lowp_grad(x, target, scale, cap) -> torch.Tensor:
    """PyTorch's own low-precision way: autograd through F.cross_entropy in x's dtype."""
    xl = x.detach().clone().requires_grad_(True)
    z = xl if cap is None else cap * torch.tanh(xl / cap)
    loss = F.cross_entropy(z, target, reduction="none")
    (loss * scale.to(x.dtype)).sum().backward()
    return xl.grad


def make_inputs(n: int, V: int, dtype: torch.dtype, scale: float):
    """Fresh random logits (N(0, scale²)), targets and grad scales; the seed is printed so a
    failure can be replayed (pytest shows it with the failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"make_inputs(n={n}, V={V}, {dtype}, scale={scale:g}): seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, V, (n,), generator=gen)
    grad_scale = torch.randn(n, generator=gen) * 2.0  # mixed signs ...
    grad_scale[::5] = 0.0  # ... and zeros
    return x, target, grad_scale


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make every torch.empty float buffer NaN while the test runs: unwritten outputs fail."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", empty)


# (n, V, logit scale): odd, round, several V blocks (interpreter BLOCK_V = 8192), overflow.
SHAPES = [(37, 1013, 4.0), (64, 4096, 4.0), (6, 20000, 4.0), (37, 1013, 1e4), (5, 16411, 1e4)]


@needs_interpreter
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("cap", [None, 30.0], ids=["nocap", "cap30"])
@pytest.mark.parametrize("n,V,scale", SHAPES, ids=[f"{n}x{V}@{s:g}" for n, V, s in SHAPES])
def test_forward_backward_fp32(n, V, scale, cap):
    x, target, grad_scale = make_inputs(n, V, torch.float32, scale)
    loss_ref, lse_ref, grad_ref = oracle(x, target, grad_scale, cap)

    # forward without gradient leaves x untouched
    x_nograd = x.clone()
    loss0, lse0 = ce_forward(triton_backend, x_nograd, target, None, cap)
    assert torch.equal(x_nograd, x)
    assert rel(loss0, loss_ref) < 1e-5 and rel(lse0, lse_ref) < 1e-5

    # forward with gradient written over x
    xg = x.clone()
    loss, lse = ce_forward(triton_backend, xg, target, grad_scale, cap)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float64
    assert rel(loss, loss_ref) < 1e-5
    assert rel(lse, lse_ref) < 1e-5
    assert rel(xg, grad_ref) < 1e-5
    assert (xg[grad_scale == 0] == 0).all()

    # recompute-mode backward from the saved lse: kept as fp64 (an fp32 hi + lo pair), so
    # even at logits of 1e4 the rebuilt softmax is exact to fp32 (an fp32 lse alone would
    # be off by its rounding, ulp/2 = 1e-3 there).
    xb = x.clone()
    ce_backward(triton_backend, xb, target, lse, grad_scale, cap)
    assert rel(xb, grad_ref) < 1e-5


@needs_interpreter
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("cap", [None, 30.0], ids=["nocap", "cap30"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("n,V,scale", [(37, 1013, 4.0), (6, 20000, 1e4)], ids=["odd", "big"])
def test_low_precision(n, V, scale, dtype, cap):
    dt = DTYPES[dtype]
    x, target, grad_scale = make_inputs(n, V, dt, scale)
    loss_ref, lse_ref, grad_ref = oracle(x, target, grad_scale, cap)

    xg = x.clone()
    loss, lse = ce_forward(triton_backend, xg, target, grad_scale, cap)
    assert xg.dtype == dt
    # loss and lse are fp32 reductions of the exact upcast inputs: fp32 accuracy
    assert rel(loss, loss_ref) < 1e-5
    assert rel(lse, lse_ref) < 1e-5
    # the gradient is rounded once, at the store: no worse than PyTorch's low-precision autograd
    err = rel(xg, grad_ref)
    err_torch = rel(torch_lowp_grad(x, target, grad_scale, cap), grad_ref)
    assert err <= 1.05 * err_torch + 1e-7, (err, err_torch)
    # stored values are the correctly rounded (nearest-even) oracle, but for near-ties that
    # the fp32 computation may put on the other side
    assert (xg != grad_ref.to(dt)).double().mean().item() < 1e-3

    xb = x.clone()
    ce_backward(triton_backend, xb, target, lse, grad_scale, cap)
    assert rel(xb, grad_ref) <= 1.05 * err_torch + 1e-7


@needs_interpreter
def test_rejects_bad_input():
    x = torch.randn(4, 10)
    target = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="unit column stride"):
        ce_forward(triton_backend, x.t().contiguous().t(), target, None, None)
    with pytest.raises(ValueError, match="target"):
        ce_forward(triton_backend, x, target[:3], None, None)
    loss, lse = ce_forward(triton_backend, x[:0], target[:0], None, None)
    assert loss.shape == lse.shape == (0,)


# ---- every configuration the autotuner may pick, under the interpreter ------------------------
# The interpreter runs interpreter_config's pick (the first fitting one); these tests force each
# entry of each table in turn. 70 rows: three row groups of INTERP_ROWS over two programs, so
# the persistent striding runs; V = 3001 (not a multiple of 16): several steps of the narrow
# configurations, one partial step of the wide ones.
CONFIG_V = [3001]
TABLES = {
    "ce": tce.CE_SHAPES,
    "ce_heavy": tce.CE_HEAVY_SHAPES,
    "kl": tkl.KL_SHAPES,
    "kl_heavy": tkl.KL_HEAVY_SHAPES,
    "topk": tkl.TOPK_SHAPES,
    "topk_heavy": tkl.TOPK_HEAVY_SHAPES,
}


def config_params(tables: list[str]):
    """``(table, dtype, index)`` for every configuration of ``tables`` in fp32 and bf16."""
    out = []
    for table in tables:
        for dtype in ("fp32", "bf16"):
            for i, cfg in enumerate(tce.configs_for(DTYPES[dtype], TABLES[table])):
                out.append(
                    pytest.param(table, dtype, i, id=f"{table}-{dtype}-{tce.config_tag(cfg)}")
                )
    return out


@pytest.fixture
def force_config(monkeypatch):
    """``force(table, dtype, i)``: launches with that table run its ``i``-th configuration (and
    fail if another table is launched)."""

    def force(table: str, dtype: str, i: int) -> None:
        want = tce.configs_for(DTYPES[dtype], TABLES[table])

        def pick(configs, V):
            assert configs == want, "the launch used another configuration table"
            return configs[i]

        monkeypatch.setattr(tce, "interpreter_config", pick)

    return force


def test_interpreter_config_is_deterministic_and_fits():
    for table in TABLES.values():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            configs = tce.configs_for(dtype, table)
            for V in (7, 1013, 4500, 128256):
                cfg = tce.interpreter_config(configs, V)
                assert cfg is tce.interpreter_config(configs, V)
                narrowest = min(tce.step_width(c) for c in configs)
                assert tce.step_width(cfg) <= max(V, narrowest)


@needs_interpreter
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("V", CONFIG_V)
@pytest.mark.parametrize("table,dtype,index", config_params(["ce", "ce_heavy"]))
def test_ce_every_configuration(force_config, table, dtype, index, V):
    force_config(table, dtype, index)
    heavy = table == "ce_heavy"  # the argmax flavour, at logits of 1e4; softcap otherwise
    cap = None if heavy else 30.0
    x, target, grad_scale = make_inputs(70, V, DTYPES[dtype], 1e4 if heavy else 4.0)
    math = CERowMath(softcap=cap, argmax=heavy)
    loss_ref, lse_ref, grad_ref = oracle(x, target, grad_scale, cap)
    xg = x.clone()
    rows = triton_backend.ce_forward(xg, target, grad_scale, math)
    assert rel(rows.loss, loss_ref) < 1e-5 and rel(rows.lse, lse_ref) < 1e-5
    if heavy:  # torch's argmax is the first maximal column too
        assert torch.equal(rows.argmax, x.argmax(1))
    tol = (
        1e-5
        if dtype == "fp32"
        else 1.05 * rel(torch_lowp_grad(x, target, grad_scale, cap), grad_ref) + 1e-7
    )
    assert rel(xg, grad_ref) <= tol
    xb = x.clone()
    triton_backend.ce_backward(xb, target, rows.lse, grad_scale, math)
    assert rel(xb, grad_ref) <= tol


KL_MATHS = {
    "kl": KLRowMath(temperature=1.5),
    "kl_heavy": KLRowMath(temperature=0.7, softcap=20.0, softcap_ref=True, beta=0.3),
}


@needs_interpreter
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("V", CONFIG_V)
@pytest.mark.parametrize("table,dtype,index", config_params(["kl", "kl_heavy"]))
def test_kl_every_configuration(force_config, table, dtype, index, V):
    """Exact KL (forward; JSD with softcap for the heavy table) against the torch backend in
    float64 on the same inputs."""
    force_config(table, dtype, index)
    math = KL_MATHS[table]
    x, _, grad_scale = make_inputs(70, V, DTYPES[dtype], 4.0)
    x_ref = (x.double() + torch.randn(x.shape, dtype=torch.float64)).to(x.dtype)
    xd = x.double()
    kl_ref, lse_ref, lse_r_ref, centre_ref = torch_backend.kl_forward(
        xd, x_ref.double(), grad_scale.double(), math
    )
    xg = x.clone()
    kl, lse, lse_r, centre = triton_backend.kl_forward(xg, x_ref, grad_scale, math)
    assert rel(kl, kl_ref) < 1e-5 and rel(lse, lse_ref) < 1e-6 and rel(lse_r, lse_r_ref) < 1e-6
    assert rel(centre, centre_ref) < 1e-5
    tol = 1e-5 if dtype == "fp32" else 4e-3  # bf16: rounded once, at the store
    assert rel(xg, xd) <= tol
    xb = x.clone()
    triton_backend.kl_backward(xb, x_ref, lse, lse_r, centre, grad_scale, math)
    assert rel(xb, xd) <= tol


@needs_interpreter
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("V", CONFIG_V)
@pytest.mark.parametrize("table,dtype,index", config_params(["topk", "topk_heavy"]))
def test_kl_topk_every_configuration(force_config, table, dtype, index, V):
    """Top-k KL (k = 37; softcap for the heavy table) against the torch backend in float64."""
    force_config(table, dtype, index)
    math = KLRowMath(temperature=1.3, softcap=20.0 if table == "topk_heavy" else None)
    x, _, grad_scale = make_inputs(70, V, DTYPES[dtype], 4.0)
    ref = torch.randn(x.shape, dtype=torch.float64) * 3.0
    logp = torch.log_softmax(ref, dim=1)
    top = logp.topk(37, dim=1)
    tail = torch.log1p(-top.values.exp().sum(1).clamp(max=1 - 1e-12))
    args = (top.indices, top.values.float(), tail.float())
    xd = x.double()
    kl_ref, lse_ref, lse_t_ref = torch_backend.kl_topk_forward(
        xd, top.indices, top.values, tail, grad_scale.double(), math
    )
    xg = x.clone()
    kl, lse, lse_t = triton_backend.kl_topk_forward(xg, *args, grad_scale, math)
    assert rel(kl, kl_ref) < 1e-5 and rel(lse, lse_ref) < 1e-6 and rel(lse_t, lse_t_ref) < 1e-6
    tol = 1e-5 if dtype == "fp32" else 4e-3  # bf16: rounded once, at the store
    assert rel(xg, xd) <= tol
    xb = x.clone()
    triton_backend.kl_topk_backward(xb, *args, lse, lse_t, grad_scale, math)
    assert rel(xb, xd) <= tol


@pytest.mark.skipif(IN_PROCESS or IN_CHILD, reason="the tests above ran in this process")
def test_in_child_process():
    """Triton was imported in compiled mode before this module: run the file in a child."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_FLAG: "1"})
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_interpreter_mode_in_child():
    """In the child the interpreter must be active: a silent all-skip would prove nothing."""
    if IN_CHILD:
        assert IN_PROCESS, "TRITON_INTERPRET=1 was set but triton is not in interpreter mode"
