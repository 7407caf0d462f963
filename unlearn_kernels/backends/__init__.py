"""Backend dispatch.

Every backend module exposes the same epilogues (``ce_forward``, ``ce_backward``, ...); they
differ only in how they sweep a chunk of logits. ``torch`` is the readable reference,
``cpu`` the C++/OpenMP extension ``unlearn_kernels._C``, ``triton`` the GPU kernels (which
also run on CPU tensors under ``TRITON_INTERPRET=1``).

Choice: ``backend=`` argument, else the ``UNLEARN_KERNELS_BACKEND`` environment variable,
else CUDA tensors → ``triton`` and CPU tensors → ``cpu`` when built, ``torch`` otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("torch", "cpu", "triton")
_MODULES = {
    "torch": "unlearn_kernels.backends.torch_backend",
    "cpu": "unlearn_kernels.backends.cpu_backend",
    "triton": "unlearn_kernels.backends.triton_backend",
}


BUILD_INFO = Path(__file__).resolve().parent.parent / "_C_build.json"


def build_mismatch(info_path: Path, torch_version: str) -> str | None:
    """Why the extension described by ``info_path`` (written by setup.py next to it) must not
    run under ``torch_version``, or ``None``. The extension is ABI-tied to the torch release it
    was compiled against (local labels such as ``+cpu`` aside)."""
    try:
        built = json.loads(info_path.read_text())["torch"]
    except (OSError, ValueError, KeyError):
        return None  # no record (an older build): the import below is the only check
    if built.split("+")[0] == torch_version.split("+")[0]:
        return None
    return (
        f"unlearn_kernels._C was built against torch {built} but torch {torch_version} is "
        "installed; CPU tensors use the slower pure PyTorch backend ('torch'). Rebuild it "
        "against this torch: pip install --no-build-isolation --force-reinstall unlearn-kernels"
    )


@cache
def cpu_extension_available() -> bool:
    """Whether the C++ extension ``unlearn_kernels._C`` was built for this torch and imports."""
    reason = build_mismatch(BUILD_INFO, str(torch.__version__))
    if reason is None:
        try:
            importlib.import_module("unlearn_kernels._C")
        except ImportError as err:
            reason = (
                f"unlearn_kernels._C is not built ({err}); CPU tensors use the slower pure "
                "PyTorch backend ('torch'). Reinstall with a C++ compiler to build it."
            )
    if reason is not None:
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_name(backend: str | None, device: torch.device) -> str:
    """The backend that will run for tensors on ``device``; raises ``ValueError`` if unusable."""
    name = backend if backend is not None else os.environ.get("UNLEARN_KERNELS_BACKEND") or None
    if name is None:
        if device.type == "cuda":
            return "triton"
        return "cpu" if cpu_extension_available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {device}")
        if not cpu_extension_available():
            raise ValueError("backend='cpu' requested but unlearn_kernels._C is not built")
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
        )
    return name


def get_backend(backend: str | None, device: torch.device) -> ModuleType:
    """The epilogue module for ``backend`` (see :func:`backend_name`)."""
    return importlib.import_module(_MODULES[backend_name(backend, device)])
