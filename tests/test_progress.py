"""Progress without a terminal: the one plain-line mechanism (leukedge._util.LineProgress) that every
command uses when stderr is not a TTY (nohup, CI, systemd), and the station's per-batch log lines."""

from __future__ import annotations

import io
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from leukedge._util import LineProgress, PlainReporter, format_duration

LINE = re.compile(r"^(?P<desc>[^:]+): (?P<done>[\d,]+)/(?P<total>[\d,]+) \((?P<pct>\d+) %\) \| (?P<rate>[\d.,]+)/s")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_line_progress_every_tenth_and_every_interval_with_rate_and_eta():
    clock, lines = Clock(), []
    task = LineProgress("infer", 1000, lines.append, every_s=30.0, clock=clock)
    for _ in range(99):  # 99 items in 9.9 s: below 10 % and below 30 s, nothing yet
        clock.t += 0.1
        task.advance(1)
    assert lines == []
    clock.t += 0.1
    task.advance(1)  # 100 = 10 %
    assert len(lines) == 1
    m = LINE.match(lines[0])
    assert m and m["desc"] == "infer" and m["done"] == "100" and m["total"] == "1,000" and m["pct"] == "10"
    assert m["rate"] == "10.0"  # 100 items in 10 s
    assert "ETA 1m30s" in lines[0] and "elapsed 10s" in lines[0]
    # slow phase: 1 item a minute -> a line every 30 s even though no 10 % step is crossed
    clock.t += 31
    task.advance(1, stats="loss 0.1234")
    assert len(lines) == 2 and lines[1].startswith("infer: 101/1,000 (10 %)") and lines[1].endswith("loss 0.1234")
    task.update(completed=1000)
    assert len(lines) == 3 and "(100 %)" in lines[2] and "ETA" not in lines[2]
    task.finish()
    assert len(lines) == 3  # nothing new since the last line: no duplicate closing line


def test_line_progress_closing_line_and_unknown_total():
    clock, lines = Clock(), []
    task = LineProgress("scan", None, lines.append, every_s=30.0, clock=clock)
    clock.t += 2
    task.advance(7)
    task.finish()
    assert lines == ["scan: 7 | 3.5/s | elapsed 2s | done"]


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 7260)] == ["0s", "59s", "1m01s", "59m59s", "2h01m"]


def test_plain_reporter_prints_progress_lines_and_quiet_prints_none():
    buf = io.StringIO()
    with PlainReporter(stream=buf).progress("epoch 1/2", total=20) as task:
        for _ in range(20):
            task.advance(1)
    out = buf.getvalue().splitlines()
    assert len(out) == 10 and out[0].startswith("epoch 1/2: 2/20 (10 %)") and out[-1].startswith("epoch 1/2: 20/20 (100 %)")
    quiet = io.StringIO()
    with PlainReporter(quiet=True, stream=quiet).progress("x", total=5) as task:
        task.advance(5)
    assert quiet.getvalue() == ""


def test_rich_reporter_without_terminal_prints_plain_lines_not_bars():
    from rich.console import Console

    from leukedge.cli._console import RichReporter

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=40)  # narrow: lines must not be wrapped
    rep = RichReporter(console)
    with rep.progress("preprocess [cells]", total=4) as task:
        for _ in range(4):
            task.advance(1, stats="[bold]4 ok[/]")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4
    assert all(line.startswith("preprocess [cells]: ") for line in lines)  # no markup eaten, no wrapping
    assert lines[-1].startswith("preprocess [cells]: 4/4 (100 %)") and lines[-1].endswith("4 ok")
    assert "\x1b[" not in buf.getvalue() and "━" not in buf.getvalue()
    # bars=False (e.g. --quiet): no lines either
    buf2 = io.StringIO()
    with RichReporter(Console(file=buf2, force_terminal=False), bars=False).progress("x", total=3) as task:
        task.advance(3)
    assert buf2.getvalue() == ""


def test_rich_reporter_on_a_terminal_keeps_the_bar():
    from rich.console import Console

    from leukedge.cli._console import RichReporter

    buf = io.StringIO()
    rep = RichReporter(Console(file=buf, force_terminal=True, width=100))
    with rep.progress("train", total=2) as task:
        task.advance(2)
    assert "━" in buf.getvalue()  # the Rich bar, as before
    assert not LINE.search(buf.getvalue())


def test_synth_command_without_terminal_prints_progress_lines(tmp_path):
    r = CliRunner().invoke(__import__("leukedge.cli", fromlist=["main"]).main,
                           ["data", "synth", str(tmp_path / "cells"), "--subjects", "4", "--cells-per-subject", "5",
                            "--size", "64", "--format", "png"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("synth: ")]
    assert len(lines) == 10, r.output  # 20 cells: a line every 10 %
    assert lines[-1].startswith("synth: 20/20 (100 %)") and "/s" in lines[-1]


def test_station_logs_each_batch_and_stores_preprocess_times(tmp_path, sample_cells):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("leukedge._native")
    from leukedge.cli.station import station_group

    watch = tmp_path / "watch" / "slide1"
    watch.mkdir(parents=True)
    for p in sample_cells[:10]:
        shutil.copy(p, watch / p.name)
    r = CliRunner().invoke(station_group, ["run", str(tmp_path / "watch"), "--once", "--batch", "4",
                                           "--backend", "onnxruntime", "--device", "cpu", "--threads", "1",
                                           "--settle-ms", "0"])
    assert r.exit_code == 0, r.output
    batch_lines = [ln for ln in r.output.splitlines() if ln.startswith("batch #")]
    assert len(batch_lines) == 3, r.output  # 10 files in batches of 4
    for ln in batch_lines:
        assert re.search(r"^batch #\d+: [1-4] files? \(\w+\) \| \d+ ok, 0 errors \| latency p50 [\d,]+ ms, max [\d,]+ ms \| "
                         r"preprocess [\d,]+ ms, compute [\d,]+ ms$", ln), ln
    with sqlite3.connect(tmp_path / "watch" / ".leukedge-station.sqlite") as c:
        pre = [row[0] for row in c.execute("SELECT preprocess_ms FROM results")]
        batches = [row[0] for row in c.execute("SELECT preprocess_ms FROM batches")]
    assert len(pre) == 10 and all(v is not None and v > 0 for v in pre)
    assert batches and all(v is not None and v > 0 for v in batches)
    # one timestamp format: status --json and export both give ISO 8601 with the UTC offset
    import json as _json

    st = _json.loads(CliRunner().invoke(station_group, ["status", str(tmp_path / "watch"), "--json"]).output)
    iso = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
    assert iso.match(st["station"]["started_at"]) and iso.match(st["station"]["stopped_at"])
    assert all(iso.match(s["last_result_at"]) for s in st["samples"])
    out = tmp_path / "cells.json"
    assert CliRunner().invoke(station_group, ["export", str(tmp_path / "watch"), "--out", str(out), "--cells"]).exit_code == 0
    assert all(iso.match(r["done_at"]) for r in _json.loads(out.read_text()))


def test_one_station_throughput_definition():
    from leukedge.station.db import throughput

    assert throughput(120, now=1000.0, since=None) == 2.0  # 120 results in the last minute
    assert throughput(20, now=1000.0, since=990.0) == 2.0  # a run 10 s old: per second since its start
    assert throughput(3, now=1000.0, since=999.9) == 3.0  # at least 1 s


def test_every_long_command_reports_through_the_reporter():
    """The commands named in the issue (preprocess, train, cv, infer, demo, synth) pass the CLI reporter
    that falls back to plain lines; none draws its own bar."""
    cli = Path(__file__).resolve().parents[1] / "leukedge" / "cli"
    for name in ("preprocess", "train", "cv", "infer", "demo", "data"):
        text = (cli / f"{name}.py").read_text()
        assert "RichReporter" in text, name
        assert "progress_bar(" not in text, name


# -- help and messages (issue 26, item 9) -------------------------------------------------------------
def test_help_lists_commands_in_pipeline_order_and_o_means_out():
    from leukedge.cli import main

    r = CliRunner().invoke(main, ["--help"])
    names = [ln.split()[0] for ln in r.output.split("Commands:")[1].splitlines() if ln.startswith("  ") and ln.split()
             and not ln.startswith("   ")]
    assert names == ["demo", "data", "preprocess", "train", "cv", "evaluate", "export", "calibrate-ood", "build-engine",
                     "infer", "station", "report"], names
    for cmd in (["report"], ["station", "export"], ["infer"], ["train"], ["export"], ["preprocess"]):
        text = CliRunner().invoke(main, [*cmd, "--help"]).output
        assert "-o, --out" in text, cmd
    infer_help = CliRunner().invoke(main, ["infer", "--help"]).output
    assert "see below" not in infer_help and "see the list above" not in CliRunner().invoke(main, ["cv", "--help"]).output
    assert "efficientnet_lite0: ReLU6" in CliRunner().invoke(main, ["cv", "--help"]).output.replace("\n", " ").replace("  ", " ") \
        or "efficientnet_lite0:" in CliRunner().invoke(main, ["cv", "--help"]).output


def test_train_on_an_image_folder_says_to_preprocess_elsewhere(tmp_path):
    from leukedge.cli import main

    folder = tmp_path / "cells" / "all"
    folder.mkdir(parents=True)
    (folder / "UID_1_1_1_all.bmp").write_bytes(b"BM")
    r = CliRunner().invoke(main, ["train", str(tmp_path / "cells"), "-o", str(tmp_path / "run")])
    assert r.exit_code != 0
    msg = " ".join(r.output.split())
    assert msg.count(str(tmp_path / "cells")) == 2  # the folder, and the command's input: never twice as a prefix
    assert f"-o {tmp_path / 'cells'} " not in msg and "-o cells_cache" in msg


def test_preprocess_defaults_to_the_shipped_models_stain(tmp_path):
    pytest.importorskip("leukedge._native")
    from leukedge.artifacts import default_model_path, load_cache, load_config_source
    from leukedge.cli import main
    from leukedge.synth import make_cell, write_png

    for i, (cls, name) in enumerate((("all", "UID_1_1_1_all.png"), ("all", "UID_2_1_1_all.png"), ("all", "UID_3_1_1_all.png"),
                                     ("hem", "UID_H1_1_1_hem.png"), ("hem", "UID_H2_1_1_hem.png"), ("hem", "UID_H3_1_1_hem.png"))):
        (tmp_path / "d" / cls).mkdir(parents=True, exist_ok=True)
        write_png(tmp_path / "d" / cls / name, make_cell(int(cls == "all"), seed=i, size=96))
    r = CliRunner().invoke(main, ["preprocess", str(tmp_path / "d"), "-o", str(tmp_path / "c"), "--size", "32"])
    assert r.exit_code == 0, r.output
    assert load_cache(tmp_path / "c").config.stain.method == load_config_source(default_model_path()).stain.method == "none"


def test_predictor_fills_subject_and_true_label(sample_cells):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("leukedge._native")
    from leukedge.infer import Predictor

    with Predictor(backend="onnxruntime", device="cpu") as pred:
        res = pred.predict(sample_cells[:2])
    for r, p in zip(res, sample_cells[:2]):
        assert r.status == "ok" and r.subject and r.true_label in ("all", "hem")
        assert p.name.startswith(f"UID_{r.subject}_") or p.name.lower().startswith(f"uid_{r.subject.lower()}_")


def test_build_engine_says_plainly_where_an_engine_runs():
    from leukedge.cli import main
    from leukedge.cli.build_engine import runs_on

    r = CliRunner().invoke(main, ["build-engine", "x.onnx", "-o", "x.plan", "--target-cc", "8.7"])
    msg = " ".join(r.output.split())
    assert r.exit_code != 0 and "Jetson Orin (CC 8.7)" in msg and "JetPack" in msg and "not from pip" in msg
    rtx = runs_on({"flavour": "tensorrt-rtx", "trt_version": "1.7", "target_compute_capabilities": ["8.6", "8.9"]})
    assert "8.6, 8.9" in rtx and "NOT on Jetson Orin (8.7) or Hopper (9.0)" in rtx
    std = runs_on({"flavour": "tensorrt", "trt_version": "10.3", "built_on": {"gpu": "Orin", "compute_capability": "8.7"}})
    assert "runs only on Orin (CC 8.7)" in std


def test_engine_mismatch_hint_rebuilds_from_the_requested_models_export(tmp_path):
    from leukedge.artifacts import EngineMismatchError
    from leukedge.config import PreprocessConfig
    from leukedge.engines.factory import _rebuild_from_requested
    from leukedge.model import ModelSpec

    spec = ModelSpec(kind="export", config=PreprocessConfig(), path=tmp_path / "mymodel", onnx_fp16=tmp_path / "mymodel" / "export" / "model_fp16.onnx",
                     engine=tmp_path / "mymodel" / "export" / "model.plan")
    old = EngineMismatchError("built for CC 8.6, this GPU is 8.9. Rebuild it here: leukedge build-engine /old/export -o x")
    new = _rebuild_from_requested(spec, old)
    assert isinstance(new, EngineMismatchError) and str(old) in str(new)
    assert f"leukedge build-engine {tmp_path / 'mymodel' / 'export'} -o {spec.engine}" in str(new)
    assert _rebuild_from_requested(spec, ValueError("other")) is None
