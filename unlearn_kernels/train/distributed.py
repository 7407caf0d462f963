"""Data parallelism for the run loop and the Trainer: who this process is, and the few
collectives a step needs.

Every process builds the same micro-batches and takes its share of each one's examples
(:func:`share`); terms are normalised by the whole step's totals over the number of processes,
so the *mean* over processes of a term (or of its gradient: :func:`all_reduce_mean`, what
``DistributedDataParallel`` computes) is the term of the whole step. One process writes files
(:func:`is_main`). Without an initialised ``torch.distributed`` process group everything here
is the single-process identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """The process that writes outputs (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def share(items: Sequence[T], process: int, world: int) -> list[T]:
    """Process ``process``'s contiguous part of ``items`` (sizes differ by at most one)."""
    n = len(items)
    return list(items[process * n // world : (process + 1) * n // world])


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` in place over the processes (asynchronous all-reduces, then wait)."""
    if not active() or not tensors:
        return
    works = [dist.all_reduce(t, async_op=True) for t in tensors]
    for work in works:
        work.wait()
    torch._foreach_div_(list(tensors), world_size())


def broadcast_from_main(tensors: Sequence[Tensor]) -> None:
    """Give every process rank 0's values (the same start, as ``DistributedDataParallel`` does)."""
    if not active():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def launched_world_size() -> int:
    """The number of processes a launcher (``torchrun``, ``accelerate launch``) started, from
    the environment (``WORLD_SIZE``), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_environment(device: torch.device) -> bool:
    """Join the process group the launcher describes in the environment (when it started more
    than one process): NCCL for CUDA devices, gloo otherwise. Returns whether this call created
    it (so the caller destroys it)."""
    if active() or launched_world_size() <= 1:
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def local_device(device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA run under a launcher; ``device`` otherwise."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
