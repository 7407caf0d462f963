"""Test setup: Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before triton is imported, so it is set here, before any
test module loads.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
