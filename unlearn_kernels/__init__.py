"""unlearn-kernels: fused loss kernels for LLM unlearning.

The losses take final hidden states and the output weight and never hold the ``[N, V]``
logits: see :mod:`unlearn_kernels.ops.chunking`.
"""

import torch  # noqa: F401  (the C++ extension needs torch loaded first)

from unlearn_kernels.backends import BACKENDS, backend_name
from unlearn_kernels.losses import (
    FusedLinearCrossEntropyLoss,
    FusedLinearKLLoss,
    FusedLinearKLTopkLoss,
)
from unlearn_kernels.ops.cross_entropy import CrossEntropyOutput, fused_linear_cross_entropy
from unlearn_kernels.ops.kl import fused_linear_kl, fused_linear_kl_topk
from unlearn_kernels.ops.ngdiff import NGDiffNorms, ngdiff_combine

#: Exported here, imported on first use (the cache's module pulls in the optional HF stack).
_REFERENCE_CACHE_NAMES = (
    "CacheSettings",
    "ReferenceBatch",
    "ReferenceCache",
    "build_reference_cache",
)


def __getattr__(name: str):
    if name in _REFERENCE_CACHE_NAMES:
        from unlearn_kernels.train import reference_cache

        return getattr(reference_cache, name)
    raise AttributeError(f"module 'unlearn_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_REFERENCE_CACHE_NAMES})


__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "CacheSettings",
    "CrossEntropyOutput",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearKLLoss",
    "FusedLinearKLTopkLoss",
    "NGDiffNorms",
    "ReferenceBatch",
    "ReferenceCache",
    "__version__",
    "backend_name",
    "build_reference_cache",
    "fused_linear_cross_entropy",
    "fused_linear_kl",
    "fused_linear_kl_topk",
    "ngdiff_combine",
]
