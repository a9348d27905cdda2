"""benchmarks/gpu_check.py --dry-run: one JSON and one log, every GPU step skipped with its reason."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path, native):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--dry-run", "--out", str(tmp_path), "--batches", "1,8"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and report["failed"] == []
    steps = report["steps"]
    assert steps["environment"]["status"] == "ok" and steps["environment"]["result"]["dry_run"] is True
    assert steps["export"]["status"] == "ok"
    for name in ("plumbing:cuda-python", "plumbing:pycuda", "flavours", "torch", "tensorrt", "e2e"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"], name
    assert "NVIDIA H200" in steps["flavours"]["reason"] and "TensorRT-RTX targets only" in steps["flavours"]["reason"]
    assert "agrees with ONNX Runtime" in steps["torch"]["reason"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "skipped" in log and "done in" in log
