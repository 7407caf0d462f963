"""unlearn-kernels: fused loss kernels for LLM unlearning.

The losses take final hidden states and the output weight and never hold the ``[N, V]``
logits: see :mod:`unlearn_kernels.ops.chunking`.
"""

import torch  # noqa: F401  (the C++ extension needs torch loaded first)

from unlearn_kernels.backends import BACKENDS, backend_name
from unlearn_kernels.ops.cross_entropy import fused_linear_cross_entropy
from unlearn_kernels.ops.kl import fused_linear_kl, fused_linear_kl_topk
from unlearn_kernels.ops.ngdiff import NGDiffNorms, ngdiff_combine

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "NGDiffNorms",
    "__version__",
    "backend_name",
    "fused_linear_cross_entropy",
    "fused_linear_kl",
    "fused_linear_kl_topk",
    "ngdiff_combine",
]
