"""unlearn-kernels: fused loss kernels for LLM unlearning.

The losses take final hidden states and the output weight and never hold the ``[N, V]``
logits: see :mod:`unlearn_kernels.ops.chunking`. :func:`patch` (from
:mod:`unlearn_kernels.patching`, imported on first use with transformers and peft) makes a
Hugging Face model's own ``labels=`` loss the fused one.
"""

import importlib

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

#: Exported here, imported on first use (their modules pull in the optional HF stack).
_LAZY = {
    **dict.fromkeys(
        ("CacheSettings", "ReferenceBatch", "ReferenceCache", "build_reference_cache"),
        "unlearn_kernels.train.reference_cache",
    ),
    **dict.fromkeys(("PatchHandle", "patch"), "unlearn_kernels.patching"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unlearn_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "CacheSettings",
    "CrossEntropyOutput",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearKLLoss",
    "FusedLinearKLTopkLoss",
    "NGDiffNorms",
    "PatchHandle",
    "ReferenceBatch",
    "ReferenceCache",
    "__version__",
    "backend_name",
    "build_reference_cache",
    "fused_linear_cross_entropy",
    "fused_linear_kl",
    "fused_linear_kl_topk",
    "ngdiff_combine",
    "patch",
]
