"""Atomic writes: a file or directory appears complete under its final name, or not at all."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, flush it, and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json_atomically(path: Path, payload: Any) -> None:
    write_text_atomically(path, json.dumps(payload, indent=1, sort_keys=True))


def write_dir_atomically(path: Path, fill: Callable[[Path], None]) -> Path:
    """Let ``fill(tmp)`` write a directory's files into a temporary sibling, flush them, and
    rename it to ``path`` (which must not exist). A failure leaves no ``path``."""
    if path.exists():
        raise ValueError(f"{path} already exists")
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)
    return path
