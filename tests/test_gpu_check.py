"""benchmarks/gpu_check.sh on a machine without a GPU: one line saying so, exit 0, at once."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from benchmarks.harness import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run")
def test_gpu_check_exits_at_once_without_a_gpu(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out.csv")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no GPU found" in proc.stdout
    assert not (tmp_path / "out.csv").exists()
    assert time.perf_counter() - start < 30
