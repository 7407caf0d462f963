"""unlearn-kernels: fused loss kernels for LLM unlearning.

The losses take final hidden states and the output weight and never hold the ``[N, V]``
logits: see :mod:`unlearn_kernels.ops.chunking` and ``docs/design.md``; every public function
is in ``docs/api.md``. :func:`patch` (from :mod:`unlearn_kernels.patching`) makes a Hugging
Face model's own ``labels=`` loss the fused one; :class:`ReferenceCache` reads a reference cache
(``docs/cache.md``). Both are imported on first use: ``import unlearn_kernels`` needs torch and
numpy only, and a missing optional dependency is one line naming the extra to install.
"""

import importlib

import torch  # noqa: F401  (the C++ extension needs torch loaded first)

from unlearn_kernels._deps import require
from unlearn_kernels.backends import BACKENDS, backend_name
from unlearn_kernels.losses import (
    FusedLinearCrossEntropyLoss,
    FusedLinearKLLoss,
    FusedLinearKLTopkLoss,
)
from unlearn_kernels.ops.cross_entropy import CrossEntropyOutput, fused_linear_cross_entropy
from unlearn_kernels.ops.kl import fused_linear_kl, fused_linear_kl_topk
from unlearn_kernels.ops.ngdiff import NGDiffNorms, ngdiff_combine

#: Exported here, imported on first use (their modules pull in optional dependencies).
_LAZY = {
    **dict.fromkeys(
        ("CacheSettings", "ReferenceBatch", "ReferenceCache", "build_reference_cache"),
        "unlearn_kernels.train.reference_cache",
    ),
    **dict.fromkeys(("PatchHandle", "patch"), "unlearn_kernels.patching"),
}
#: What each lazily imported module needs (beyond torch and numpy).
_NEEDS = {
    "unlearn_kernels.train.reference_cache": ("safetensors", "tqdm", "pydantic"),
    "unlearn_kernels.patching": ("transformers",),
}


def __getattr__(name: str):
    if name in _LAZY:
        module = _LAZY[name]
        require(*_NEEDS[module], purpose=f"unlearn_kernels.{name}")
        return getattr(importlib.import_module(module), name)
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
