"""Build: the C++/OpenMP extension ``unlearn_kernels._C`` from ``csrc/``.

Without a C++ compiler (or without torch at build time) the package installs anyway and runs
on its pure PyTorch backend; a warning says so. ``UNLEARN_KERNELS_CXXFLAGS`` replaces the
architecture flags (default ``-march=native``: the extension is built on the machine it runs on).
"""

import glob
import os
import shutil
import warnings

from setuptools import setup


def extension_build() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn(
            "torch is not importable at build time: unlearn_kernels._C is skipped", stacklevel=2
        )
        return {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn(
            "no C++ compiler found: unlearn_kernels._C is skipped, CPU runs on torch", stacklevel=2
        )
        return {}
    arch = os.environ.get("UNLEARN_KERNELS_CXXFLAGS", "-march=native").split()
    extension = CppExtension(
        "unlearn_kernels._C",
        sorted(glob.glob("csrc/*.cpp")),
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-unknown-pragmas", *arch],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_build())
