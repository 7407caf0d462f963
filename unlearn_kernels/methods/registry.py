"""The method registry: each method module registers its class under its config name."""

from __future__ import annotations

from unlearn_kernels.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``method.name: <cls.name>``."""
    if cls.name in METHODS:
        raise ValueError(f"an unlearning method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"method.name must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
