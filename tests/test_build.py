"""Packaging (setup.py, MANIFEST.in): the sdist carries what the build needs, a failed compile
or ``UNLEARN_KERNELS_BUILD_CPU=0`` installs without the extension instead of failing, and the
import-time check of the torch version the extension was built against.

The full round trip (sdist → wheel → fresh environment → one op per backend) runs in CI
(``.ci/package``); these tests run setup.py in a copy of the project and compile nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from unlearn_kernels.backends import build_mismatch

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = (
    "setup.py",
    "pyproject.toml",
    "MANIFEST.in",
    "README.md",
    "CHANGELOG.md",
    "LICENSE",
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's build inputs (no built extension, no caches)."""
    dest = tmp_path / "project"
    dest.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("*.so", "__pycache__", "_C_build.json")
    for folder in ("csrc", "docs", "unlearn_kernels"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=skip)
    return dest


def setup_py(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARN_KERNELS_")}
    return subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=project,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def built_extensions(project: Path) -> list[Path]:
    return sorted(project.rglob("_C*.so"))


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_failed_compile_installs_without_the_extension(project: Path) -> None:
    """A compiler error (an unknown flag injected through UNLEARN_KERNELS_CXXFLAGS) is a
    warning and a successful build without ``_C``, not a failed install."""
    run = setup_py(project, "build_ext", "--inplace", UNLEARN_KERNELS_CXXFLAGS="-fuk-no-such-flag")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "unlearn_kernels._C: the build failed" in run.stderr
    assert "torch backend" in run.stderr
    assert built_extensions(project) == []


def test_build_cpu_off_skips_the_extension(project: Path) -> None:
    run = setup_py(project, "build_ext", "--inplace", UNLEARN_KERNELS_BUILD_CPU="0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "UNLEARN_KERNELS_BUILD_CPU=0" in run.stdout
    assert built_extensions(project) == []


def test_sdist_holds_every_build_input(project: Path) -> None:
    """Without the extension configured (no torch needed) the sdist still ships csrc/ whole
    (headers included), the license and the typing marker: MANIFEST.in, not setuptools'
    guess from ext_modules."""
    run = setup_py(project, "sdist", "--formats=gztar", UNLEARN_KERNELS_BUILD_CPU="0")
    assert run.returncode == 0, run.stderr[-2000:]
    (archive,) = (project / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = {f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir()}
    expected |= {"LICENSE", "MANIFEST.in", "setup.py", "unlearn_kernels/py.typed"}
    assert expected <= names, sorted(expected - names)
    assert not any(name.endswith((".so", ".o")) for name in names)


def test_torch_version_mismatch_names_both_versions(tmp_path: Path) -> None:
    info = tmp_path / "_C_build.json"
    info.write_text(json.dumps({"torch": "2.12.1+cpu", "isas": ["default"]}))
    message = build_mismatch(info, "2.13.0+cpu")
    assert message is not None
    assert "2.12.1+cpu" in message and "2.13.0+cpu" in message and "'torch'" in message
    # The same release with another local label (a CUDA wheel of it) is the same ABI.
    assert build_mismatch(info, "2.12.1+cu126") is None
    assert build_mismatch(tmp_path / "missing.json", "2.13.0") is None
