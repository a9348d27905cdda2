"""`leukedge demo --quick` end to end, and `leukedge report` on its run directory."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from leukedge.cli import main
from leukedge.report import build_report


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("demo") / "run"
    res = CliRunner().invoke(main, ["demo", "--train", "--quick", "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


LEAN_DEMO = """
import sys
from leukedge.cli import main
try:
    # onnxruntime: `--backend auto` may import torch to ask it for a CUDA device where torch is installed
    main(["demo", "--quick", "--backend", "onnxruntime", "-o", sys.argv[1]])
except SystemExit as exc:
    if exc.code:
        raise
# the default demo must not need PyTorch: it never imports it (it may look whether it is installed)
print("TORCH IMPORTED" if "torch" in sys.modules else "torch not imported")
"""


@pytest.mark.timeout(900)
def test_lean_demo_runs_without_torch_and_scores_only_unseen_real_cells(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import leukedge

    out = tmp_path / "lean"
    env = {**os.environ, "PYTHONPATH": str(Path(leukedge.__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", LEAN_DEMO, str(out)], capture_output=True, text=True, env=env, timeout=850)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith("torch not imported"), r.stdout[-500:]
    summary = json.loads((out / "demo_summary.json").read_text())
    stages = {s["stage"].split(". ", 1)[1]: s for s in summary["stages"]}
    assert list(stages) == ["synth", "preprocess", "infer", "real cells", "station"]
    for name in ("synth", "preprocess", "infer", "station"):
        assert stages[name]["status"] == "ok", stages[name]
    # not a terminal: plain progress lines and one line per station batch
    assert re.search(r"^synth: 90/90 \(100 %\) \| [\d.]+/s", r.stdout + r.stderr, re.M)
    assert re.search(r"^batch #1: \d+ files? \(\w+\) \| \d+ ok", r.stdout + r.stderr, re.M)
    assert summary["station"]["processed"] > 0 and summary["station"]["samples"]
    html = (out / "report.html").read_text()
    assert "Not for clinical use" in html
    assert stages["real cells"]["status"] != "failed", stages["real cells"]
    rs = summary.get("real_sample")
    if rs is None:  # no real sample cells on this machine
        assert stages["real cells"]["status"] == "skipped"
        return
    from leukedge.artifacts import default_model_path, read_trained_on
    from leukedge.data import pixel_digest

    seen = read_trained_on(default_model_path())
    assert seen is not None
    metrics = json.loads((out / "real" / "metrics.json").read_text())
    excluded = set(metrics["excluded_training_cells"])
    assert len(excluded) == rs["in_training_set"] and rs["scored"] + rs["in_training_set"] == rs["labelled"]
    sample = Path(rs["dir"])
    for p in sorted(sample.rglob("*.bmp")):
        assert (pixel_digest(p) in seen) == (p.name in excluded), p.name
    assert metrics["n"] == rs["scored"] > 0
    assert "never saw" in metrics["title"] and "Shipped default model" in html


@pytest.mark.timeout(900)
def test_demo_quick_runs_every_stage(demo_dir: Path) -> None:
    summary = json.loads((demo_dir / "demo_summary.json").read_text())
    stages = {s["stage"].split(". ", 1)[1]: s for s in summary["stages"]}
    assert list(stages) == ["synth", "preprocess", "train", "evaluate", "export", "build-engine", "infer", "real cells",
                            "station"]
    for name in ("synth", "preprocess", "train", "evaluate", "export", "infer"):
        assert stages[name]["status"] == "ok", stages[name]
    # the engine stage either built an engine or says why it was skipped
    eng = stages["build-engine"]
    assert eng["status"] in ("ok", "skipped"), eng
    if eng["status"] == "ok":
        assert (demo_dir / "engine" / "model.engine").stat().st_size > 0
        assert json.loads((demo_dir / "engine" / "model.engine.json").read_text())
        # infer was offered that engine: it ran on it, or says why it could not
        inf = summary["infer"]
        assert inf["backend"].startswith("tensorrt") or "model.engine not usable" in inf["backend_reason"], inf
    else:
        assert eng["note"].startswith("skipped:") and len(eng["note"]) > 12
    assert summary["synthetic"] is True
    assert (demo_dir / "infer" / "predictions.csv").read_text().count("\n") > 1
    assert 0.0 <= summary["metrics"]["weighted_f1"] <= 1.0


@pytest.mark.timeout(900)
def test_demo_report_has_sections_and_embedded_images(demo_dir: Path) -> None:
    html = (demo_dir / "report.html").read_text()
    for section in ('id="metrics"', 'id="plots"', 'id="training"', 'id="latency"', 'id="cells"', 'id="stages"'):
        assert section in html, section
    assert "SYNTHETIC" in html and "Not for clinical use" in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 4
    for b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch


def test_report_rebuilds_from_a_subdirectory(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval_report.html"
    res = CliRunner().invoke(main, ["report", str(demo_dir / "evaluate"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert 'id="metrics"' in html and "weighted F1 (the C-NMC metric)" in html and "SYNTHETIC" in html


def test_report_refuses_an_empty_directory(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code != 0
    assert "no evaluation" in res.output


def test_report_banner_only_for_synthetic(tmp_path: Path) -> None:
    metrics = {"n": 4, "weighted_f1": 0.75, "accuracy": 0.75, "roc_auc": 0.8,
               "confusion_matrix": {"labels": ["hem", "all"], "matrix": [[1, 1], [0, 2]]}, "synthetic": False}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    html = build_report(tmp_path).read_text()
    assert "SYNTHETIC" not in html and "Not for clinical use" in html
    assert '<td>hem</td><td class="num">1</td><td class="num">1</td>' in html
