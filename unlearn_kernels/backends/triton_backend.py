"""Triton backend: GPU epilogues (also runnable on CPU tensors under ``TRITON_INTERPRET=1``).

Same functions and contracts as :mod:`unlearn_kernels.backends.torch_backend`; each family of
kernels lives in its own ``triton_*.py`` module and is re-exported here for the dispatcher.
A new family adds its import and its names below (and ``PTXAS_CASES`` in its module, which
benchmarks/triton_ptxas.py discovers).
"""

from __future__ import annotations

from .triton_cross_entropy import ce_backward, ce_forward
from .triton_kl import kl_backward, kl_forward, kl_topk_backward, kl_topk_forward
from .triton_ngdiff import ngdiff_sums, ngdiff_write

__all__ = [
    "ce_backward",
    "ce_forward",
    "kl_backward",
    "kl_forward",
    "kl_topk_backward",
    "kl_topk_forward",
    "ngdiff_sums",
    "ngdiff_write",
]
