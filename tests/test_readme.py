"""Every code block of the README runs as written, each on its own, and prints what the README
shows after it.

Blocks are fenced with a language: ``python`` blocks are executed (in a fresh namespace, in an
empty directory); a ``text`` block right after one is its expected output (numbers compared to
1e-3 relative, 2e-4 absolute, to allow for another backend's rounding); ``bash``/``console``/
``shell`` blocks are commands for a shell and are skipped. Any other block fails the test.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
SHELL = {"bash", "console", "shell", "sh"}
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def blocks() -> list[tuple[str, str, str | None]]:
    """``(language, code, expected output or None)`` for every python block."""
    found = [
        (m.group(1), m.group(2), README.read_text()[: m.start()].count("\n") + 1)
        for m in FENCE.finditer(README.read_text())
    ]
    out = []
    for i, (lang, code, line) in enumerate(found):
        if lang in SHELL or lang == "text":
            continue
        assert lang == "python", f"README line {line}: a code block needs a language, got {lang!r}"
        after = found[i + 1] if i + 1 < len(found) else None
        expected = after[1] if after is not None and after[0] == "text" else None
        out.append((f"line {line}", code, expected))
    return out


def same_output(actual: str, expected: str) -> bool:
    """Equal text, with numbers equal to within rounding."""
    if NUMBER.split(actual) != NUMBER.split(expected):
        return False
    pairs = zip(NUMBER.findall(actual), NUMBER.findall(expected), strict=False)
    counts = len(NUMBER.findall(actual)) == len(NUMBER.findall(expected))
    return counts and all(abs(float(a) - float(e)) <= 2e-4 + 1e-3 * abs(float(e)) for a, e in pairs)


BLOCKS = blocks()


def test_readme_has_examples_with_outputs():
    assert len(BLOCKS) >= 5
    assert sum(expected is not None for _, _, expected in BLOCKS) >= 5
    assert "DESIGN.md" not in README.read_text()


@pytest.mark.parametrize(("where", "code", "expected"), BLOCKS, ids=[w for w, _, _ in BLOCKS])
def test_readme_block_runs_alone(where, code, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md ({where})", "exec"), {"__name__": "__readme__"})
    if expected is not None:
        assert same_output(printed.getvalue(), expected), printed.getvalue()


def test_output_comparison_can_fail():
    assert same_output("loss 0.1234\n", "loss 0.1235\n")
    assert not same_output("loss 0.1300\n", "loss 0.1235\n")
    assert not same_output("loss 0.1235 more\n", "loss 0.1235\n")
    assert not same_output("None 1.0\n", "None 1.0 2.0\n")
