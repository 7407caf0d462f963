"""Peak memory of this process: resident set on CPU (``VmHWM``), the allocator on CUDA."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _release_free_heap() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``), so that the resident set
    counts live memory rather than what earlier work freed; a no-op without glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def rss_bytes() -> int:
    """This process's resident set now, after freed heap memory went back to the system."""
    _release_free_heap()
    return _status_kib("VmRSS") * 1024


def reset_peak(device: torch.device | str = "cpu") -> int:
    """Reset the peak to the current usage; return that usage in bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    current = rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    return current


def peak_bytes(device: torch.device | str = "cpu") -> int:
    """The highest usage since the last :func:`reset_peak` (process start on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024
