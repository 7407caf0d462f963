"""Test setup: Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before triton is imported, so it is set here, before any
test module loads.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are collected everywhere and skipped without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
