"""Shared benchmark machinery: one configuration per process, timed and measured alike.

Each measured method runs in its own Python process (``python -m benchmarks.harness``
re-entered through :func:`run_isolated`) so that its peak resident memory (``VmHWM``) is its
own. Inside it, inputs are built first, the peak is reset (``/proc/self/clear_refs``), then the
method runs ``repeats`` times after one warm-up; the report is the peak above the resident
size right before the first call, and every timing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def reset_peak() -> int:
    """:func:`unlearn_kernels._memory.reset_peak`, imported when first called, so that a worker
    can point ``sys.path`` at another tree's package before anything imports it."""
    from unlearn_kernels import _memory

    return _memory.reset_peak()


def peak_bytes() -> int:
    """:func:`unlearn_kernels._memory.peak_bytes`, imported when first called."""
    from unlearn_kernels import _memory

    return _memory.peak_bytes()


def time_calls(step: Callable[[], object], repeats: int) -> list[float]:
    """Wall time of ``repeats`` calls of ``step`` (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def measure(step: Callable[[], object], repeats: int) -> dict:
    """Warm up once, then time ``repeats`` calls; peak memory above the pre-call resident size."""
    base = reset_peak()
    result = step()
    times = time_calls(step, repeats)
    return {
        "times": times,
        "median": statistics.median(times),
        "peak_above_inputs": peak_bytes() - base,
        "value": float(result) if result is not None else None,
    }


def run_isolated(
    module: str, args: list[str], timeout: float = 7200, env: dict[str, str] | None = None
) -> dict:
    """Run ``python -m module *args`` (which prints one JSON line last) and parse its report;
    ``env`` adds to this process's environment."""
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, **(env or {}), "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"
