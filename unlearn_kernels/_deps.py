"""Optional dependencies, imported where they are needed.

``import unlearn_kernels`` needs only torch and numpy. Each other package is checked by
:func:`require` at the point of use; a missing or too old one is a
:class:`MissingDependencyError` whose message is one line naming the extra that installs it
(``pip install 'unlearn-kernels[hf]'``). The floors below are those of ``pyproject.toml``'s
extras (a test holds the two equal).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re

#: import name → (distribution, extra, oldest version the package's code works with).
OPTIONAL: dict[str, tuple[str, str, str]] = {
    "transformers": ("transformers", "hf", "4.57"),
    "peft": ("peft", "hf", "0.12"),
    "accelerate": ("accelerate", "hf", "1.3"),
    "tokenizers": ("tokenizers", "hf", "0.22"),
    "bitsandbytes": ("bitsandbytes", "qlora", "0.46.1"),
    "safetensors": ("safetensors", "train", "0.4"),
    "pydantic": ("pydantic", "train", "2.6"),
    "yaml": ("pyyaml", "train", "6"),
    "tqdm": ("tqdm", "train", "4.66"),
    "scipy": ("scipy", "eval", "1.9"),
    "rouge_score": ("rouge-score", "eval", "0.1.2"),
    "matplotlib": ("matplotlib", "eval", "3.7"),
}


class MissingDependencyError(ImportError):
    """An optional dependency is missing or older than the package supports."""


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"2.13.0+cpu"`` → ``(2, 13, 0)``."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def require(*modules: str, purpose: str) -> None:
    """Import each of ``modules`` (keys of :data:`OPTIONAL`) or raise a one-line
    :class:`MissingDependencyError`: ``"<purpose> needs <dist>: pip install
    'unlearn-kernels[<extra>]'"`` (with the version found when it is older than the floor)."""
    for module in modules:
        dist, extra, floor = OPTIONAL[module]
        install = f"pip install 'unlearn-kernels[{extra}]'"
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise MissingDependencyError(f"{purpose} needs {dist}: {install}") from err
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue  # importable without metadata (e.g. a source checkout): trust it
        if _release(found) < _release(floor):
            raise MissingDependencyError(
                f"{purpose} needs {dist}>={floor} (found {found}): pip install -U "
                f"'unlearn-kernels[{extra}]'"
            )
