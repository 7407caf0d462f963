"""The double buffer of streamed KL (:class:`StreamedRows`), its order of operations run on CPU
(no pinned memory, no streams), and the CUDA path marked."""

from __future__ import annotations

import pytest
import torch

import unlearn_kernels as uk
from unlearn_kernels.ops.streaming import StreamedRows


def _bounds(n: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def test_chunks_arrive_in_order_through_two_alternating_buffers():
    torch.manual_seed(0)
    source = torch.randn(50, 7).bfloat16()
    index = torch.randperm(50)[:23]
    bounds = _bounds(23, 5)  # five chunks, the last one shorter
    streamed = StreamedRows(source, index, bounds, torch.device("cpu"))
    out = torch.empty(5, 7)
    buffers = set()
    for i, (start, end) in enumerate(bounds):
        # chunk i + 1 is already staged before chunk i is taken
        taken = streamed.take(start, end, out[: end - start])
        assert torch.equal(taken, source[index[start:end]].float())
        if i + 1 < len(bounds):
            nxt_start, nxt_end = bounds[i + 1]
            staged = streamed.device_buffers[(i + 1) % 2][: nxt_end - nxt_start]
            assert torch.equal(staged, source[index[nxt_start:nxt_end]])
        buffers.add(streamed.device_buffers[i % 2].data_ptr())
    assert len(buffers) == 2


def test_out_of_order_chunk_raises():
    streamed = StreamedRows(torch.zeros(8, 3), torch.arange(8), _bounds(8, 4), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="out of order"):
        streamed.take(4, 8, torch.empty(4, 3))


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_streamed_kl_from_host_memory_matches_resident_cache(reduction):
    """Cached logits in CPU memory, student on CUDA, several chunks: the double-buffered stream
    gives the loss and gradient of the same cache already on the GPU."""
    torch.manual_seed(0)
    n, d, vocab = 1500, 256, 32000
    hidden = torch.randn(n, d, device="cuda", requires_grad=True)
    weight = torch.randn(vocab, d, device="cuda") * d**-0.5
    cache = (torch.randn(n, vocab) * 2).bfloat16()
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[::4] = -100
    results = []
    for ref in (cache, cache.cuda()):
        loss = uk.fused_linear_kl(
            hidden, weight, ref_logits=ref, labels=labels, reduction=reduction, chunk_size=256
        )
        (grad,) = torch.autograd.grad(loss.sum(), hidden)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
