#!/usr/bin/env bash
# The first run on a CUDA machine, from a fresh clone, in one command (a few minutes):
#
#     bash benchmarks/gpu_check.sh [OUT.csv]
#
# 1. installs the package and its test extras into the current Python (pip install -e .[dev]);
# 2. runs the test suite's CUDA-marked tests (real shapes against the torch backend and the
#    float64 oracle), with the Triton kernels compiled, not interpreted;
# 3. times CE and KL at V = 128256 (CUDA events) and records their peak memory
#    (torch.cuda.max_memory_allocated) for the fused ops and unfused PyTorch, torch.compile,
#    Liger-Kernel and cut-cross-entropy when installed, into one CSV (default
#    benchmarks/results/gpu_check.csv).
# Without a CUDA GPU it says so and exits 0 at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-benchmarks/results/gpu_check.csv}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no GPU found (nvidia-smi lists none); nothing to check"
  exit 0
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
  # torch missing or built without CUDA: install first, then ask again
  "$PYTHON" -m pip install -q -e ".[dev]"
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no GPU found (torch.cuda.is_available() is False); nothing to check"
    exit 0
  fi
else
  "$PYTHON" -m pip install -q -e ".[dev]"
fi
nvidia-smi -L

echo "== CUDA-marked tests"
TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -m cuda tests

echo "== timings and peak memory at V = 128256 -> $OUT"
TRITON_INTERPRET=0 "$PYTHON" -m benchmarks.gpu_bench --out "$OUT"
echo "gpu_check: done ($OUT)"
