"""Cached logits streamed from host memory to the device, chunk after chunk, double-buffered.

Streamed KL (:func:`~unlearn_kernels.fused_linear_kl` with ``ref_logits`` in CPU memory and the
student on CUDA) reads the selected rows of an ``[N, V]`` cache one chunk at a time.
:class:`StreamedRows` gathers chunk ``i + 1``'s rows into one of two pinned host buffers and
copies them asynchronously, on a side stream, into one of two device buffers while the compute
stream works on chunk ``i``; events order the four hand-offs (host buffer free again, device
buffer free again, copy done, contents read). On CPU the same object runs with unpinned
buffers and no streams, which is how its order of operations is tested without a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor


class StreamedRows:
    """``source[index[start:end]]`` for the chunks ``bounds``, taken in order by :meth:`take`.

    ``source`` is a host tensor ``[N, V]`` (any dtype, e.g. a memory-mapped bf16 cache),
    ``index`` the selected rows (any device), ``bounds`` the ``(start, end)`` of each chunk.
    """

    def __init__(
        self, source: Tensor, index: Tensor, bounds: list[tuple[int, int]], device: torch.device
    ) -> None:
        self.source, self.index, self.bounds = source, index.cpu(), bounds
        self.cuda = device.type == "cuda"
        rows = max((end - start for start, end in bounds), default=0)
        shape, dtype = (rows, source.shape[1]), source.dtype
        self.host = [torch.empty(shape, dtype=dtype, pin_memory=self.cuda) for _ in range(2)]
        self.device_buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.consumed: list[torch.cuda.Event | None] = [None, None]
        self.taken = 0
        self._schedule(0)

    def _event(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _schedule(self, i: int) -> None:
        """Gather chunk ``i`` into host buffer ``i % 2`` and start its copy to the device."""
        if i >= len(self.bounds):
            return
        slot, (start, end) = i % 2, self.bounds[i]
        host = self.host[slot][: end - start]
        if self.copied[slot] is not None:  # chunk i − 2's copy still reads this host buffer
            self.copied[slot].synchronize()
        torch.index_select(self.source, 0, self.index[start:end], out=host)
        with torch.cuda.stream(self.stream) if self.cuda else nullcontext():
            if self.consumed[slot] is not None:  # chunk i − 2 still in the device buffer
                self.stream.wait_event(self.consumed[slot])
            self.device_buffers[slot][: end - start].copy_(host, non_blocking=self.cuda)
            self.copied[slot] = self._event(self.stream)

    def take(self, start: int, end: int, out: Tensor) -> Tensor:
        """Chunk ``[start, end)`` (the next one in ``bounds``) into ``out`` (cast to its dtype),
        then start the next chunk's copy."""
        i = self.taken
        if i >= len(self.bounds) or self.bounds[i] != (start, end):
            raise RuntimeError(f"chunk {(start, end)} asked out of order (expected chunk {i})")
        slot = i % 2
        if self.copied[slot] is not None:
            torch.cuda.current_stream().wait_event(self.copied[slot])
        out.copy_(self.device_buffers[slot][: end - start])
        if self.cuda:
            self.consumed[slot] = self._event(torch.cuda.current_stream())
        self.taken += 1
        self._schedule(i + 1)
        return out
