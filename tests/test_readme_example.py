"""The README's notebook example runs as written (on synthetic cells, in a temporary folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("leukedge._native", reason="the Rust extension is not built (pip install -e .)")
pytest.importorskip("torch")

README = Path(__file__).resolve().parents[1] / "README.md"


def notebook_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- notebook-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its notebook example"
    return m.group(1)


def test_readme_notebook_example_runs(tmp_path):
    code = notebook_example()
    assert len(code.strip().splitlines()) <= 12  # "a ten-line example"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("val weighted F1 ")
    assert 0.0 <= float(lines[0].split()[-1]) <= 1.0
    preds = [ln.split() for ln in lines[1:]]
    assert len(preds) == 3 and all(p[1] in ("hem", "all") and 0.0 <= float(p[2]) <= 1.0 for p in preds)
    assert (tmp_path / "run" / "bundle" / "bundle.json").is_file()
