"""The README's usage examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    scope: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), scope)
    assert scope["hidden"].grad is not None and scope["hidden"].grad.abs().sum() > 0
    assert float(scope["kl"]) > 0
    assert -1.0 <= float(scope["norms"].cosine) <= 1.0
