"""Build: the C++/OpenMP extension ``unlearn_kernels._C`` from ``csrc/`` (docs/building.md).

The extension is optional: without torch or a C++ compiler at build time, with
``UNLEARN_KERNELS_BUILD_CPU=0``, or when compiling fails, the package installs without it
(a warning says so) and CPU tensors run on the pure PyTorch backend.

Portable by default: ``bindings.cpp`` is compiled for the baseline target, and each kernel file
three times on x86-64 (``CPU_CAPABILITY`` DEFAULT, AVX2, AVX512, each with its own ``-m``
flags); the module picks the widest copy the CPU runs when it is imported. Release flags:
``-O3``, no debug information, debug sections stripped at link time.

Environment:
  ``UNLEARN_KERNELS_BUILD_CPU=0``   skip the extension (a pure-Python wheel).
  ``UNLEARN_KERNELS_CXXFLAGS``      extra flags appended to every compile, e.g. ``-march=native``
                                    for a build that never leaves this machine.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import warnings
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
KERNELS = ("cross_entropy", "kl", "ngdiff")  # csrc/<name>.cpp, compiled once per ISA
BUILD_INFO = "_C_build.json"  # written next to the extension: torch version, ISAs, flags
RELEASE_FLAGS = ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast", "-Wno-unknown-pragmas"]
RELEASE_LINK_FLAGS = ["-fopenmp", "-Wl,--strip-debug"]
# Per-ISA flags; the runtime checks in bindings.cpp (cpu_runs) must cover each list.
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def isas() -> list[str]:
    """The instruction sets the kernels are compiled for on this build machine's architecture."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return list(ISA_FLAGS)
    return ["DEFAULT"]


def warn(message: str) -> None:
    warnings.warn(
        f"unlearn_kernels._C: {message}; CPU tensors will use the torch backend", stacklevel=2
    )


def extension_build() -> dict:
    if os.environ.get("UNLEARN_KERNELS_BUILD_CPU", "1") == "0":
        print("UNLEARN_KERNELS_BUILD_CPU=0: unlearn_kernels._C is not built")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warn("torch is not importable at build time, the extension is skipped")
        return {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warn("no C++ compiler found, the extension is skipped")
        return {}

    class BuildByIsa(BuildExtension):
        """BuildExtension that compiles each kernel file once per ISA with that ISA's flags
        (generated wrapper sources under build_temp) and turns a failed build into a warning.

        Objects link baseline first (bindings, DEFAULT, AVX2, AVX512): when the ISA copies emit
        the same inline function from a header, the linker keeps the first, baseline one.
        """

        def build_extension(self, ext: Extension) -> None:
            extra = os.environ.get("UNLEARN_KERNELS_CXXFLAGS", "").split()
            groups = self._isa_sources(extra)
            ext.sources = [src for _, srcs in groups for src in srcs]
            flags_of = {src: flags for flags, srcs in groups for src in srcs}
            compile_all = self.compiler.compile

            def compile_by_isa(sources, *args, extra_postargs=None, **kwargs):
                objects = []
                for flags, _ in groups:
                    chosen = [s for s in sources if flags_of.get(s) is flags]
                    if chosen:
                        post = [*(extra_postargs or []), *flags]
                        objects += compile_all(chosen, *args, extra_postargs=post, **kwargs)
                return objects

            self.compiler.compile = compile_by_isa
            try:
                super().build_extension(ext)
            except Exception as err:  # a compile or link error: install without the extension
                warn(f"the build failed ({type(err).__name__}: {err})")
                self.failed.append(ext)
                return
            finally:
                self.compiler.compile = compile_all
            info = {
                "torch": torch.__version__,
                "isas": [i.lower() for i in isas()],
                "cxxflags": extra,
            }
            out = Path(self.get_ext_fullpath(ext.name)).parent / BUILD_INFO
            out.write_text(json.dumps(info, indent=1) + "\n")

        def copy_extensions_to_source(self) -> None:
            """--inplace and editable installs: the build record goes beside the extension."""
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                package = ext.name.rpartition(".")[0]
                built = Path(self.build_lib, *package.split("."), BUILD_INFO)
                if built.exists():
                    shutil.copyfile(built, Path(build_py.get_package_dir(package), BUILD_INFO))

        def _isa_sources(self, extra: list[str]) -> list[tuple[list[str], list[str]]]:
            """(flags, sources) groups in link order: bindings.cpp, then each ISA's wrappers."""
            built = isas()
            have = [f"-DUK_HAVE_{isa}" for isa in built if isa != "DEFAULT"]
            groups = [([*have, *extra], ["csrc/bindings.cpp"])]
            for isa in built:
                folder = Path(self.build_temp) / "uk_isa" / isa.lower()
                folder.mkdir(parents=True, exist_ok=True)
                sources = []
                for kernel in KERNELS:
                    wrapper = folder / f"{kernel}.cpp"
                    text = f'#include "{ROOT / "csrc" / kernel}.cpp"\n'
                    if not wrapper.exists() or wrapper.read_text() != text:
                        wrapper.write_text(text)
                    sources.append(str(wrapper))
                defines = [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]
                groups.append(([*defines, *ISA_FLAGS[isa], *extra], sources))
            return groups

        def build_extensions(self) -> None:
            self.failed: list[Extension] = []
            super().build_extensions()
            # Later steps (copies for --inplace / editable installs) skip what did not build.
            self.extensions = [e for e in self.extensions if e not in self.failed]

    extension = CppExtension(
        "unlearn_kernels._C",
        ["csrc/bindings.cpp", *(f"csrc/{k}.cpp" for k in KERNELS)],
        extra_compile_args=list(RELEASE_FLAGS),
        extra_link_args=list(RELEASE_LINK_FLAGS),
        depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h")),
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildByIsa}}


setup(**extension_build())
