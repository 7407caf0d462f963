"""benchmarks/gpu_model.py: its chunk plan is the code's, its peak memory matches the allocator's
on CPU, and the Llama-3-8B statements of the results page hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_model
from benchmarks.harness import ROOT
from unlearn_kernels.ops.chunking import plan_chunks

MiB = 2**20

# One process per measurement: the resident-set peak is the process's own.
_MEASURE = """
import json, sys, torch
import unlearn_kernels as uk
from unlearn_kernels._memory import peak_bytes, reset_peak
n_total, n, d, vocab, chunk, trainable = map(int, sys.argv[1:])
torch.manual_seed(0)
hidden = torch.randn(n_total, d, requires_grad=True)
weight = (torch.randn(vocab, d) * d**-0.5).requires_grad_(bool(trainable))
labels = torch.randint(0, vocab, (n_total,))
labels[n:] = -100
uk.fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, backend="cpu").backward()
hidden.grad = weight.grad = None
base = reset_peak()
uk.fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, backend="cpu").backward()
print(json.dumps({"peak": peak_bytes() - base}))
"""


@pytest.mark.parametrize("trainable", [False, True])
def test_model_peak_matches_the_allocator_on_cpu(trainable):
    """The model's peak (its buffers from the code's plan + returned gradients) against the
    resident-set peak of one fused step at a small shape, four chunks of rows."""
    n_total, n, d, vocab, chunk = 3072, 2048, 256, 16384, 512
    shape = gpu_model.Shape(n, d, vocab, torch.float32, trainable, 1 - n / n_total)
    plan = plan_chunks(n, vocab, d, torch.float32, "cpu", chunk_size=chunk)
    assert plan.n_chunks == 4 and plan.rows == chunk
    model = gpu_model.ours(shape, plan)
    args = [str(v) for v in (n_total, n, d, vocab, chunk, int(trainable))]
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    expected = model.peak_extra_bytes + model.returned_grad_bytes
    assert abs(measured - expected) <= 0.1 * expected + 4 * MiB, (measured, expected)


def test_model_uses_the_codes_plan():
    shape = gpu_model.Shape(32768, 4096, 128256, torch.bfloat16, False)
    by_design = {e.design: e for e in gpu_model.estimates(shape, "H100")}
    plan = plan_chunks(32768, 128256, 4096, torch.bfloat16, "cuda")
    assert (by_design["ours"].rows_per_chunk, by_design["ours"].n_chunks) == (
        plan.rows,
        plan.n_chunks,
    )
    assert plan.rows % 128 == 0 and plan.logits_dtype == torch.float32
    assert by_design["ours_before"].rows_per_chunk == 521  # the figure


def test_llama3_8b_json():
    """Llama-3-8B on an H100 (the defaults): one object per design; ours within 420 MB above
    the inputs and returned gradients; input-dtype logits at most 0.7× the previous traffic."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_model", "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    rows = {r["design"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    assert set(rows) == set(gpu_model.DESIGNS)
    for row in rows.values():
        assert {"peak_extra_bytes", "hbm_bytes", "flops", "roofline_ms"} <= set(row)
    assert rows["ours"]["peak_extra_bytes"] <= 420e6
    assert rows["ours_input"]["peak_extra_bytes"] <= 420e6
    assert rows["ours_input"]["hbm_bytes"] <= 0.7 * rows["ours_before"]["hbm_bytes"]
    assert 170e9 < rows["ours_before"]["hbm_bytes"] < 182e9  # the 176 GB


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="prompt-fraction"):
        gpu_model.main(["--prompt-fraction", "1.0"])
