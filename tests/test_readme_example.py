"""The README's library example runs as written (and meta-learns: the post-adaptation loss drops)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [b for b in blocks if b.startswith("import math")]
    namespace: dict = {}
    torch.set_num_threads(1)
    exec(compile(example, "README.md example", "exec"), namespace)
    assert namespace["opt"].tasks_in_meta_batch == 0
    assert all(torch.isfinite(p).all() for p in namespace["model"].parameters())
