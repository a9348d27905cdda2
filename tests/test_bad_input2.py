"""Regression tests of the second bad-input pass (issue 25): junk frames are never called blasts, no file
name or image can take a run down. Each test failed on the code before the fix (see docs/reliability.md)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import sample_cell_paths, tiny_exported_bundle

from leukedge.config import GateConfig, PreprocessConfig
from leukedge.synth import make_cell, write_png

REPO = Path(__file__).resolve().parents[1]


def junk_frames(size: int = 450) -> dict[str, np.ndarray]:
    """What a microscope also delivers: empty fields, blank frames, noise, debris, a cell cut by the edge."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    cell = make_cell(1, seed=3, size=size)
    half = np.zeros_like(cell)
    half[:, : size // 2] = cell[:, size // 2:]  # the right half of a cell, cut by the left edge
    debris = np.zeros((size, size, 3), np.uint8)
    debris[np.hypot(yy - size / 2, xx - size / 2) < 6] = (120, 60, 140)
    return {
        "black": np.zeros((size, size, 3), np.uint8),
        "white": np.full((size, size, 3), 255, np.uint8),
        "grey": np.full((size, size, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "one_pixel": np.array([[[180, 90, 200]]], np.uint8),
        "debris": debris,
        "half_cell": half,
    }


# -- 1. the cell quality gate -----------------------------------------------------------------------
def test_gate_settings_travel_with_the_config_and_keep_the_pixel_hash():
    base = PreprocessConfig()
    assert "gate" not in base.to_dict()  # older bundles and caches: unchanged JSON, unchanged hash
    loose = base.replace(gate=GateConfig(max_area=0.9))
    assert loose.pixel_hash() == base.pixel_hash()
    back = PreprocessConfig.from_json(loose.to_json())
    assert back.gate == GateConfig(max_area=0.9)
    assert json.loads(loose.to_native_json())["gate"]["max_area"] == 0.9
    with pytest.raises(ValueError, match="gate"):
        PreprocessConfig.from_dict({"gate": {"max_area": 0.1, "min_area": 0.5}})
    with pytest.raises(ValueError, match="unknown gate"):
        PreprocessConfig.from_dict({"gate": {"colour": 1}})
    # the shipped default model still loads, with the default gate
    from leukedge.formats.bundle import default_model_path, read_bundle

    cfg = read_bundle(default_model_path()).config
    assert cfg.gate == GateConfig()


def test_gate_rejects_junk_and_passes_every_real_sample_cell(native):
    cfg = PreprocessConfig(size=64)
    frames = junk_frames()
    _, st = cfg.pipeline().run(list(frames.values()))
    reasons = {k: s["rejected"] for k, s in zip(frames, st)}
    assert all(s["ok"] for s in st)
    assert all(reasons.values()), reasons
    assert reasons["black"].startswith("no cell found") and reasons["one_pixel"].startswith("no cell found")
    assert "touches the frame border" in reasons["half_cell"]
    assert "outside" in reasons["grey"] and "outside" in reasons["noise"] and "outside" in reasons["white"]
    # synthetic cells of every size the tests use pass
    _, st = cfg.pipeline().run([make_cell(i % 2, seed=i, size=s) for i, s in enumerate((32, 64, 96, 160, 450))])
    assert [s["rejected"] for s in st] == [None] * 5
    real = sample_cell_paths()
    if real:
        _, st = cfg.pipeline().run([str(p) for p in real])
        assert [s["rejected"] for s in st if s["rejected"]] == []
        assert len(st) == 52


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return tiny_exported_bundle(tmp_path_factory.mktemp("gate_model"))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Two real-looking cells and the junk frames, as PNG."""
    d = tmp_path_factory.mktemp("mixed") / "sample1"
    d.mkdir()
    for i in range(2):
        write_png(d / f"cell{i}.png", make_cell(0, seed=10 + i, size=160))
    for name, img in junk_frames(160).items():
        write_png(d / f"junk_{name}.png", img)
    return d


def test_infer_counts_rejected_apart_and_never_labels_them(native, tiny_bundle, mixed_folder, tmp_path):
    from leukedge.infer import run_inference

    out = tmp_path / "r.csv"
    res = run_inference(tiny_bundle, [mixed_folder], out, backend="onnxruntime", warmup=0)
    by = {Path(r.path).name: r for r in res.results}
    assert {k for k, r in by.items() if r.status == "ok"} == {"cell0.png", "cell1.png"}
    rejected = [r for r in res.results if r.status == "rejected"]
    assert len(rejected) == 7 and res.n_rejected == 7 and res.n_error == 0
    assert all(r.label is None and r.probability is None and r.reason for r in rejected)
    assert res.stats["n_rejected"] == 7 and res.stats["n_ok"] == 2 and res.stats["n_error"] == 0
    rows = list(csv.DictReader(out.open()))
    assert sum(r["status"] == "rejected" for r in rows) == 7
    assert all(r["reason"] and not r["label"] for r in rows if r["status"] == "rejected")


def test_station_counts_rejected_apart_from_the_blast_fraction(native, tiny_bundle, mixed_folder, tmp_path):
    import shutil

    from rich.console import Console

    from leukedge.cli.station import open_predictor, predict_fn
    from leukedge.station import db as sdb
    from leukedge.station.core import Station, StationSettings

    watch = tmp_path / "watch"
    shutil.copytree(mixed_folder, watch / "sample1")
    pred, info = open_predictor(str(tiny_bundle), "onnxruntime", fallback=False, device="cpu", threads=1,
                                batch_size=16, console=Console(stderr=True, quiet=True))
    try:
        st = Station(StationSettings(watch_dir=watch, db_path=watch / "db.sqlite", batch_size=16, max_wait_ms=50,
                                     settle_ms=0, poll_ms=20, once=True), predict_fn(pred), info,
                     install_signal_handlers=False)
        summary = st.run()
    finally:
        pred.close()
    assert summary.rejected == 7
    conn = sdb.connect(watch / "db.sqlite", readonly=True)
    try:
        (s,) = sdb.sample_totals(conn)
        cells = list(sdb.cell_rows(conn))
    finally:
        conn.close()
    assert (s["n_files"], s["n_cells"], s["n_rejected"], s["n_errors"]) == (9, 2, 7, 0)
    assert s["blast_fraction"] in (0.0, 0.5, 1.0)  # over the 2 cells only
    assert all(c["is_blast"] is None and c["reason"] for c in cells if c["status"] == "rejected")
    assert all(c["stain_fallback"] in (0, 1) for c in cells)


V1_RESULTS = """CREATE TABLE results (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, sample_id TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')), error TEXT, probability REAL, label TEXT, is_blast INTEGER,
    model_id TEXT, preprocess_hash TEXT, backend TEXT, run_id INTEGER REFERENCES runs(id),
    batch_id INTEGER REFERENCES batches(id), detected_at REAL, ready_at REAL, started_at REAL, done_at REAL,
    queued_ms REAL, preprocess_ms REAL, compute_ms REAL, latency_ms REAL, superseded INTEGER NOT NULL DEFAULT 0,
    UNIQUE (path, sha256));
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO results(path, sha256, sample_id, status, probability, label, is_blast)
    VALUES ('/w/s1/a.png', 'abc', 's1', 'ok', 0.9, 'all', 1);
"""


def test_station_database_of_schema_1_is_migrated_and_readable(tmp_path):
    from leukedge.station import db as sdb

    path = tmp_path / "old.sqlite"
    c = sqlite3.connect(path)
    c.executescript(V1_RESULTS)
    c.close()
    # read-only (status / export of an old database on a card): the new columns read as empty
    ro = sdb.connect(path, readonly=True)
    assert [r["reason"] for r in sdb.cell_rows(ro)] == [None]
    ro.close()
    conn = sdb.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(sdb.SCHEMA_VERSION)
    assert [tuple(r) for r in conn.execute("SELECT id, path, probability, is_blast FROM results")] == \
        [(1, "/w/s1/a.png", 0.9, 1)]
    conn.execute("INSERT INTO results(path, sha256, sample_id, status, reason) VALUES ('/w/s1/b.png', 'd', 's1', "
                 "'rejected', 'no cell found')")
    (s,) = sdb.sample_totals(conn)
    assert (s["n_cells"], s["n_blasts"], s["n_rejected"], s["blast_fraction"]) == (1, 1, 1, 1.0)
    conn.close()


# -- OOD score ---------------------------------------------------------------------------------------
def test_energy_score_and_threshold_validation():
    from leukedge.ood import OodThreshold, calibrate, energy_score

    e = energy_score(np.array([[10.0, 0.0], [0.1, 0.0], [1000.0, 999.0]]))
    assert e[0] < e[1] and np.isfinite(e).all()
    assert e[2] == pytest.approx(-(1000 + np.log1p(np.exp(-1.0))))
    th = calibrate(np.arange(1000.0), 0.99)
    assert th.threshold == pytest.approx(989.01) and th.n_cells == 1000
    assert OodThreshold.from_dict(th.to_dict()) == th
    for bad in ({"threshold": "x", "quantile": 0.99, "n_cells": 3}, {"threshold": 1, "quantile": 2, "n_cells": 3},
                {"threshold": 1, "quantile": 0.9, "n_cells": 3, "score": "maxlogit"}, []):
        with pytest.raises(ValueError):
            OodThreshold.from_dict(bad)


def test_calibrate_ood_stores_the_threshold_and_infer_rejects_above_it(native, tiny_bundle, mixed_folder, tmp_path):
    import shutil

    from click.testing import CliRunner

    from leukedge.cli import main
    from leukedge.infer import run_inference
    from leukedge.preprocess import run_preprocess

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    cells = tmp_path / "train" / "all"
    cells.mkdir(parents=True)
    for i in range(12):
        write_png(cells / f"UID_{i % 3 + 1}_{i}_1_all.png", make_cell(1, seed=200 + i, size=96))
    cache = tmp_path / "cache"
    run_preprocess([tmp_path / "train"], cache, PreprocessConfig(size=64), threads=1, progress=False)
    r = CliRunner().invoke(main, ["calibrate-ood", str(bundle), str(cache), "--quantile", "0.5", "--backend",
                                  "onnxruntime", "--split", "any"])
    assert r.exit_code == 0, r.output
    ood = json.loads((bundle / "bundle.json").read_text())["ood"]
    assert ood["n_cells"] == 12 and ood["quantile"] == 0.5 and np.isfinite(ood["threshold"])
    res = run_inference(bundle, [cells], None, backend="onnxruntime", warmup=0)
    scores = [r.ood_score for r in res.results if r.ood_score is not None]
    assert len(scores) == 12
    n_above = sum(s > ood["threshold"] for s in scores)
    assert res.n_rejected == n_above and 3 <= n_above <= 9  # half of the training cells, give or take ties
    assert all("out of distribution" in r.reason for r in res.results if r.status == "rejected")


# -- 2. file names that are not UTF-8 ---------------------------------------------------------------------
BAD_NAME = os.fsdecode(b"cell_\xff\xfe.png")
CR_NAME = "cell\rwith_cr.png"


def test_infer_results_keep_non_utf8_and_cr_names_losslessly(tmp_path):
    from leukedge.infer import FileResult, write_results

    res = [FileResult(str(tmp_path / BAD_NAME), 0.7, "all", "ok"), FileResult(str(tmp_path / CR_NAME), None, None,
                                                                                  "error", "x"),
           FileResult(str(tmp_path / "plain.png"), 0.1, "hem", "ok")]
    out = write_results(res, tmp_path / "r.csv")
    rows = list(csv.DictReader(io.StringIO(out.read_text("utf-8"))))
    assert len(rows) == 3  # the CR did not split a row
    assert rows[0]["path"].endswith("cell_\\xff\\xfe.png") and "\r" not in rows[1]["path"]
    assert os.fsdecode(base64.b64decode(rows[0]["path_bytes"])) == str(tmp_path / BAD_NAME)
    assert os.fsdecode(base64.b64decode(rows[1]["path_bytes"])) == str(tmp_path / CR_NAME)
    assert rows[2]["path_bytes"] == ""
    js = write_results(res, tmp_path / "r.jsonl").read_text("utf-8").splitlines()
    assert len(js) == 3 and json.loads(js[0])["path_bytes"]


def test_station_database_stores_non_utf8_names_and_resumes(tmp_path):
    from leukedge.station import db as sdb

    conn = sdb.connect(tmp_path / "db.sqlite")
    run = sdb.start_run(conn, watch_dir=str(tmp_path / os.fsdecode(b"w\xff")), model="m", model_id="m",
                        preprocess_hash="h", backend="b", settings={})
    bid = sdb.open_batch(conn, run_id=run, size=1, reason="full", opened_at=0.0, started_at=0.0)
    paths = [str(tmp_path / BAD_NAME), str(tmp_path / CR_NAME)]
    rows = [sdb.ResultRow(path=p, sha256=f"s{i}", size=1, mtime_ns=1, sample_id=os.fsdecode(b"s\xff"), status="ok",
                          error=None, probability=0.5, label="all", is_blast=1, model_id="m", preprocess_hash="h",
                          backend="b", run_id=run, batch_id=bid, detected_at=0.0, ready_at=0.0, started_at=0.0,
                          done_at=0.0, queued_ms=0.0, preprocess_ms=None, compute_ms=None, latency_ms=0.0)
            for i, p in enumerate(paths)]
    sdb.insert_batch(conn, bid, rows, preprocess_ms=0, compute_ms=0, total_ms=0)  # UnicodeEncodeError before
    known = sdb.load_known(conn)
    assert set(known) == set(paths)  # exact names back: a restart does not classify them again
    sdb.supersede_paths(conn, [paths[0]])
    assert sdb.totals(conn)["superseded"] == 1
    conn.close()


def test_preprocess_survives_a_non_utf8_name(native, tmp_path):
    from leukedge.artifacts import load_cache
    from leukedge.preprocess import run_preprocess

    d = tmp_path / "in" / "all"
    d.mkdir(parents=True)
    write_png(d / "UID_1_1_1_all.png", make_cell(1, seed=1, size=96))
    write_png(Path(os.fsdecode(os.fsencode(d) + b"/UID_2_1_1_all_\xff.png")), make_cell(1, seed=2, size=96))
    run_preprocess([tmp_path / "in"], tmp_path / "cache", PreprocessConfig(size=32), threads=1, progress=False)
    c = load_cache(tmp_path / "cache")
    assert len(c) == 2 and all(r["status"] == "ok" for r in c.manifest)


# -- 3. PNG iCCP bomb ------------------------------------------------------------------------------------
# Peak RSS of the child itself: VmHWM starts afresh at exec, while ru_maxrss keeps the forking parent's peak
PEAK_MB = ("peak_mb = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) "
           "// 1024; ")


def iccp_bomb(inflated: int) -> bytes:
    """A valid 8x8 PNG whose colour profile (iCCP) inflates to ``inflated`` bytes."""
    import struct

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    block = b"\0" * (1 << 20)
    prof = b"".join(z.compress(block) for _ in range(inflated >> 20)) + z.flush()
    raw = b"".join(b"\0" + bytes(range(24)) for _ in range(8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
            + chunk(b"iCCP", b"x\0\0" + prof) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_png_iccp_bomb_memory_is_bounded(native, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(iccp_bomb(1100 << 20))  # about 1.1 MB on disk, 1.1 GB inflated
    assert bomb.stat().st_size < 2 << 20
    code = ("import sys, leukedge._native as n; a = n.decode(sys.argv[1]); " + PEAK_MB + "print(a.shape, peak_mb())")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, rss_mb = out.stdout.rsplit(" ", 1)
    assert shape == "(8, 8, 3)"
    assert int(rss_mb) < 300, f"peak RSS {rss_mb} MB"  # it was over 1.1 GB (and aborted for 4 MB files)


def test_fuzz_corpus_has_the_new_seeds():
    names = {p.name for p in (REPO / "fuzz" / "corpus").iterdir()}
    assert {"iccp-bomb.png", "short-scan.jpg", "multipage.tif"} <= names


# -- 6. the engine file is the one its sidecar describes ------------------------------------------------------
def test_engine_whose_bytes_differ_from_its_sidecar_hash_is_refused(tmp_path):
    import hashlib

    from leukedge.artifacts import EngineMismatchError, read_sidecar, write_sidecar

    cfg = PreprocessConfig(size=32)
    eng = tmp_path / "m.plan"
    eng.write_bytes(b"engine A")
    write_sidecar(eng, {"flavour": "tensorrt", "trt_version": "10.3.0", "preprocess": cfg.to_dict(),
                        "preprocess_hash": cfg.pixel_hash(), "inputs": [], "outputs": [],
                        "engine_sha256": hashlib.sha256(b"engine A").hexdigest()})
    assert read_sidecar(eng)["engine_sha256"]
    eng.write_bytes(b"engine B")  # another engine copied over it
    with pytest.raises(EngineMismatchError, match="not the engine its sidecar .* describes.*build-engine"):
        read_sidecar(eng)


# -- 9. the one-liners ---------------------------------------------------------------------------------------
def test_fifo_or_device_as_model_is_refused_without_reading(tmp_path):
    from leukedge.engines import resolve_model

    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        resolve_model(fifo)  # used to block forever opening it
    with pytest.raises(ValueError, match="device or special file"):
        resolve_model("/dev/zero")


def test_list_files_fifo_self_reference_and_deep_folders(tmp_path):
    from leukedge.data import discover

    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        discover([fifo])  # used to hang
    d = tmp_path / "cells"
    d.mkdir()
    write_png(d / "UID_1_1_1_all.png", make_cell(1, seed=1, size=32))
    selfref = tmp_path / "self.txt"
    selfref.write_text(f"self.txt\n{d / 'UID_1_1_1_all.png'}\n")
    assert len(discover([selfref])) == 1  # used to be a RecursionError
    deep = tmp_path / "deep"
    p = str(deep)
    for _ in range(1500):  # one level at a time: Path.mkdir(parents=True) itself recurses
        os.mkdir(p)
        p += "/d"
    os.mkdir(p)
    write_png(Path(p) / "UID_2_1_1_all.png", make_cell(1, seed=2, size=32))
    try:
        assert [r.path.name for r in discover([deep])] == ["UID_2_1_1_all.png"]  # RecursionError on Python 3.11
    finally:
        subprocess.run(["rm", "-rf", str(deep)], check=False)  # shutil.rmtree recurses too


def test_manifest_label_out_of_range_and_foreign_cache_version(tmp_path):
    from leukedge.artifacts import MANIFEST_FIELDS, load_cache, read_manifest

    m = tmp_path / "manifest.csv"
    m.write_text(",".join(MANIFEST_FIELDS) + "\n0,/x.bmp,7,all,s1,,,ok,,abc,False\n")
    with pytest.raises(ValueError, match="label 7 is not"):
        read_manifest(m)
    (tmp_path / "cache.json").write_text(json.dumps({"version": 99, "pixel_hash": "x"}))
    with pytest.raises(ValueError, match="cache version 99 is not"):
        load_cache(tmp_path)


def test_cli_batch_cap_thread_warning_and_empty_ext(tmp_path, native, tiny_bundle, mixed_folder):
    from click.testing import CliRunner

    from leukedge.cli import main

    r = CliRunner().invoke(main, ["infer", str(mixed_folder), "-m", str(tiny_bundle), "-o", str(tmp_path / "r.csv"),
                                  "--batch", "4096"])
    assert r.exit_code == 2 and "4096" in r.output and "1024" in r.output
    r = CliRunner().invoke(main, ["infer", str(mixed_folder / "cell0.png"), "-m", str(tiny_bundle), "-o",
                                  str(tmp_path / "r.csv"), "--backend", "onnxruntime", "--backend-threads", "1024",
                                  "--warmup", "0"])
    assert r.exit_code == 0, r.output
    assert "--backend-threads 1024 is more than the" in " ".join(r.output.split())
    r = CliRunner().invoke(main, ["station", str(mixed_folder), "--ext", "", "--once"])
    assert r.exit_code == 2 and "every extension must name one" in r.output


def test_station_durations_use_the_monotonic_clock(tmp_path, monkeypatch):
    import time as _time

    from leukedge.station import core
    from leukedge.station.core import ModelInfo, Station, StationSettings

    watch = tmp_path / "w"
    (watch / "s").mkdir(parents=True)
    write_png(watch / "s" / "a.png", make_cell(1, seed=1, size=64))
    real_time = _time.time
    jump = {"on": False}

    def predict(paths):
        jump["on"] = True  # the wall clock jumps back an hour while the batch runs
        return [{"path": p, "status": "ok", "probability": 0.9, "label": "all"} for p in paths]

    monkeypatch.setattr(core.time, "time", lambda: real_time() - (3600 if jump["on"] else 0))
    st = Station(StationSettings(watch_dir=watch, db_path=watch / "db.sqlite", settle_ms=0, poll_ms=20, once=True,
                                 max_wait_ms=20), predict, ModelInfo("m", "m", "h", "b"), install_signal_handlers=False)
    st.run()
    c = sqlite3.connect(watch / "db.sqlite")
    (lat, q), = c.execute("SELECT latency_ms, queued_ms FROM results").fetchall()
    c.close()
    assert 0 <= lat < 60_000 and 0 <= q < 60_000


# -- 5. stale results -------------------------------------------------------------------------------------
def test_station_rehashes_a_file_replaced_with_equal_size_and_mtime(tmp_path):
    from leukedge.station.core import ModelInfo, Station, StationSettings

    watch = tmp_path / "w"
    (watch / "s").mkdir(parents=True)
    f = watch / "s" / "a.bmp"
    f.write_bytes(b"A" * 1000)
    calls: list[bytes] = []

    def predict(paths):
        calls.extend(Path(p).read_bytes()[:1] for p in paths)
        return [{"path": p, "status": "ok", "probability": 0.9, "label": "all"} for p in paths]

    def run() -> None:
        Station(StationSettings(watch_dir=watch, db_path=tmp_path / "db.sqlite", settle_ms=0, poll_ms=20, once=True,
                                max_wait_ms=20), predict, ModelInfo("m", "m", "h", "b"),
                install_signal_handlers=False).run()

    run()
    st = f.stat()
    tmp = watch / "s" / "new.tmp"
    tmp.write_bytes(b"B" * 1000)  # other content, same size ...
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the same mtime
    os.replace(tmp, f)
    run()  # a restart: the old code kept the stale result for good
    assert calls == [b"A", b"B"]
    c = sqlite3.connect(tmp_path / "db.sqlite")
    assert c.execute("SELECT COUNT(*), SUM(superseded) FROM results").fetchone() == (2, 1)
    c.close()


def _jpeg_cut_scan(jpg: bytes, keep: float = 0.3) -> bytes:
    """``keep`` of a JPEG's scan data, then its end-of-image marker (the issue's "70 % cut, end marker kept")."""
    sos = jpg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpg[sos + 2:sos + 4], "big")
    return jpg[:start + int((len(jpg) - 2 - start) * keep)] + b"\xff\xd9"


def _tiff(pages: list[np.ndarray]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    first, *rest = [Image.fromarray(p) for p in pages]
    first.save(buf, "TIFF", save_all=True, append_images=rest)
    return buf.getvalue()


def test_jpeg_with_a_short_scan_is_refused_naming_the_rows(native, tmp_path):
    from PIL import Image

    cells = [np.asarray(Image.open(p).convert("RGB")) for p in sample_cell_paths()[:4]] or \
        [make_cell(k % 2, seed=k, size=450) for k in range(4)]  # real cells where the sample is present
    for cell in cells:
        for kw in ({"quality": 90}, {"quality": 75, "subsampling": 0}, {"quality": 85, "restart_marker_rows": 2}):
            buf = io.BytesIO()
            Image.fromarray(cell).save(buf, "JPEG", **kw)
            whole = buf.getvalue()
            assert native.decode(whole).shape == (450, 450, 3)
            short = _jpeg_cut_scan(whole)
            Image.open(io.BytesIO(short)).load()  # Pillow takes it too (and fills the rest grey)
            with pytest.raises(native.DecodeError, match=r"JPEG: the scan data ends after \d+ of \d+ MCU rows .*the "
                                                         r"rest of the image is missing"):
                native.decode(short)
    # per file in a batch, naming it; the other files unharmed
    f = tmp_path / "short.jpg"
    f.write_bytes(short)
    good = tmp_path / "good.png"
    write_png(good, cells[0])
    x, st = native.preprocess_batch([str(f), str(good)], PreprocessConfig(size=32).to_json())
    assert not st[0]["ok"] and "short.jpg" in st[0]["error"] and "MCU rows" in st[0]["error"]
    assert st[1]["ok"] and st[1]["note"] is None


def test_jpeg_huffman_table_that_overflows_is_a_decode_error_not_a_panic(native, tmp_path):
    """Found by the CI fuzzer: a Huffman table with more codes of one length than it has bit patterns (its
    symbol total kept, so the segment parses) made the scan check index past its lookup table, a Rust panic
    (PanicException), in decode and in a batch. Now a DecodeError, and a per-file error in a batch."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_cell(0, seed=5, size=64)).save(buf, "JPEG", quality=80)
    jpg = bytearray(buf.getvalue())
    counts = jpg.index(b"\xff\xc4") + 5
    donor = next(j for j in range(counts + 1, counts + 16) if jpg[j] >= 3)
    jpg[donor] -= 3
    jpg[counts] += 3  # three codes of length 1
    with pytest.raises(native.DecodeError):
        native.decode(bytes(jpg))
    f = tmp_path / "overflow.jpg"
    f.write_bytes(bytes(jpg))
    good = tmp_path / "good.png"
    write_png(good, make_cell(1, seed=6, size=64))
    _, st = native.preprocess_batch([str(f), str(good)], PreprocessConfig(size=32).to_json())
    assert not st[0]["ok"] and "overflow.jpg" in st[0]["error"]
    assert st[1]["ok"]


def test_multipage_tiff_says_page_1_of_n_used(native, tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from leukedge.cli import main

    d = tmp_path / "tiffs"
    d.mkdir()
    cell, other = make_cell(0, seed=10, size=160), make_cell(1, seed=11, size=160)
    (d / "cell_then_two.tif").write_bytes(_tiff([cell, other, other]))
    (d / "black_then_cells.tif").write_bytes(_tiff([np.zeros_like(cell), cell, other]))
    (d / "single.tif").write_bytes(_tiff([cell]))
    out = tmp_path / "r.csv"
    r = CliRunner().invoke(main, ["infer", str(d), "-m", str(tiny_bundle), "-o", str(out), "--backend", "onnxruntime",
                                  "--warmup", "0"])
    assert r.exit_code == 0, r.output
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert list(csv.DictReader(out.open()).fieldnames or [])[-1] == "note"  # a new column, last
    used = "TIFF: page 1 of 3 used (only the first page is read)"
    assert rows["cell_then_two.tif"]["status"] == "ok" and rows["cell_then_two.tif"]["note"] == used
    # the black first page is what was used: the quality gate rejects it, and the note says why it is black
    assert rows["black_then_cells.tif"]["status"] == "rejected" and rows["black_then_cells.tif"]["note"] == used
    assert rows["single.tif"]["status"] == "ok" and rows["single.tif"]["note"] == ""
    flat = "".join(r.output.split())  # the console wraps long paths anywhere
    assert "".join(f"note {d / 'cell_then_two.tif'}: {used}".split()) in flat, r.output
    assert "single.tif" not in flat


def test_station_stores_the_note_of_a_multipage_tiff(tmp_path):
    from leukedge.station.core import ModelInfo, Station, StationSettings

    watch = tmp_path / "w"
    (watch / "s").mkdir(parents=True)
    for name in ("stack.tif", "one.tif", "black.tif"):
        (watch / "s" / name).write_bytes(name.encode() * 100)
    note = "TIFF: page 1 of 3 used (only the first page is read)"

    def predict(paths):
        rows = []
        for p in paths:
            name = Path(p).name
            if name == "black.tif":
                rows.append({"path": p, "status": "rejected", "reason": "no cell found", "note": note})
            else:
                rows.append({"path": p, "status": "ok", "probability": 0.9, "label": "all",
                             "note": note if name == "stack.tif" else None})
        return rows

    Station(StationSettings(watch_dir=watch, db_path=tmp_path / "db.sqlite", settle_ms=0, poll_ms=20, once=True,
                            max_wait_ms=20), predict, ModelInfo("m", "m", "h", "b"), install_signal_handlers=False).run()
    c = sqlite3.connect(tmp_path / "db.sqlite")
    got = {Path(p).name: (st, r) for p, st, r in c.execute("SELECT path, status, reason FROM results")}
    c.close()
    assert got == {"stack.tif": ("ok", note), "one.tif": ("ok", None), "black.tif": ("rejected", f"no cell found ({note})")}

def test_resumed_results_csv_written_before_the_note_column_keeps_its_columns(tmp_path):
    from leukedge.infer.results import RESULT_FIELDS, FileResult, ResultStream, format_results

    out = tmp_path / "r.csv"
    old_fields = RESULT_FIELDS[:-1]  # a results file written before the note column
    part = out.with_name("r.csv.partial")
    part.write_text(format_results([FileResult("/a.png", 0.5, "all", "ok")], ".csv", fields=old_fields))
    s = ResultStream(out, resume=True)
    assert s.done == {"/a.png"}
    s.append([FileResult("/b.tif", 0.7, "all", "ok", note="TIFF: page 1 of 2 used")])
    s.finish()
    rows = list(csv.reader(out.open()))
    assert rows[0] == list(old_fields) and all(len(r) == len(old_fields) for r in rows)
    fresh = list(csv.DictReader(io.StringIO(format_results([FileResult("/b.tif", 0.7, "all", "ok", note="n")], ".csv"))))
    assert fresh[0]["note"] == "n" and list(fresh[0]) == list(RESULT_FIELDS)


# -- 7. Ctrl-C on infer --------------------------------------------------------------------------------------
def test_interrupted_infer_keeps_finished_rows_and_resumes(native, tiny_bundle, mixed_folder, tmp_path, monkeypatch):
    from leukedge import infer as inf

    out = tmp_path / "r.csv"
    real = inf.Predictor.results_for
    calls = {"n": 0}

    def interrupt_on_third_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(inf.Predictor, "results_for", interrupt_on_third_batch)
    with pytest.raises(inf.InferenceInterrupted, match=r"4 of 9 file\(s\) have their results in .*r\.csv\.partial.*--resume"):
        inf.run_inference(tiny_bundle, [mixed_folder], out, backend="onnxruntime", warmup=0, batch=2, pipeline=False)
    assert not out.exists()
    part = out.with_name("r.csv.partial")
    assert len(list(csv.DictReader(part.open()))) == 4
    with part.open("a") as f:
        f.write(str(mixed_folder / "cut-off-last-li"))  # a kill -9 in the middle of a row
    monkeypatch.setattr(inf.Predictor, "results_for", real)
    res = inf.run_inference(tiny_bundle, [mixed_folder], out, backend="onnxruntime", warmup=0, batch=2, resume=True)
    assert len(res.results) == 5 and res.stats["n_resumed"] == 4
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in mixed_folder.iterdir())
    assert not part.exists()


# -- 8. the station database on a full disk ---------------------------------------------------------------------
def test_station_waits_for_disk_space_and_loses_nothing(tmp_path, monkeypatch):
    from leukedge.station import core
    from leukedge.station import db as sdb
    from leukedge.station.core import ModelInfo, Station, StationError, StationSettings

    watch = tmp_path / "w"
    (watch / "s").mkdir(parents=True)
    for i in range(3):
        (watch / "s" / f"c{i}.bmp").write_bytes(bytes([i]) * 100)
    real_insert = sdb.insert_batch
    fails = {"n": 2}

    def full_then_ok(*a, **k):
        if fails["n"]:
            fails["n"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return real_insert(*a, **k)

    monkeypatch.setattr(core, "insert_batch", full_then_ok)  # core imports it by name
    monkeypatch.setattr(core, "DISK_FULL_RETRY_S", 0.05)
    messages: list[str] = []

    class Rep:
        def start(self, st): pass
        def stop(self, st): pass
        def batch_done(self, *a): pass
        def message(self, m): messages.append(m)

    st = Station(StationSettings(watch_dir=watch, db_path=tmp_path / "db.sqlite", settle_ms=0, poll_ms=20, once=True,
                                 max_wait_ms=20, batch_size=8),
                 lambda paths: [{"path": p, "status": "ok", "probability": 0.9, "label": "all"} for p in paths],
                 ModelInfo("m", "m", "h", "b"), reporter=Rep(), install_signal_handlers=False)
    summary = st.run()  # it used to crash with a double traceback, the run logged as "killed"
    assert summary.processed == 3
    assert sum("is full" in m for m in messages) == 1 and any("disk space is back" in m for m in messages)
    c = sqlite3.connect(tmp_path / "db.sqlite")
    assert c.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 3
    c.close()
    # at start: a healthy database on a full disk is not called damaged
    monkeypatch.setattr(sdb, "_connect_rw", lambda *a: (_ for _ in ()).throw(sqlite3.OperationalError(
        "database or disk is full")))
    with pytest.raises(StationError, match="is full .*intact") as ei:
        Station(StationSettings(watch_dir=watch, db_path=tmp_path / "db.sqlite", once=True),
                lambda p: [], ModelInfo("m", "m", "h", "b"), install_signal_handlers=False).run()
    assert "damaged" not in str(ei.value)


# -- 6. bundle, export and weights are bound by hashes -----------------------------------------------------------
def test_foreign_onnx_without_export_json_and_swapped_weights_are_refused(tiny_bundle, tmp_path):
    import shutil

    import torch

    from leukedge.config import ConfigMismatchError
    from leukedge.engines import resolve_model
    from leukedge.export import export_model
    from leukedge.models import build_model, save_bundle

    torch.manual_seed(1)
    other = build_model("tiny", width=8).eval()
    ocfg = PreprocessConfig(size=64, crop="none")  # other preprocessing, same input size
    ob = save_bundle(tmp_path / "other", other, arch="tiny", arch_kwargs={"width": 8}, config=ocfg, synthetic=True)
    export_model(other, ocfg, ob / "export", meta=json.loads((ob / "bundle.json").read_text()), fp16=False,
                 check=False, bundle_path=ob)
    exp = tmp_path / "exp"
    shutil.copytree(tiny_bundle / "export", exp)
    (exp / "export.json").unlink()
    resolve_model(exp)  # its own ONNX: fine
    shutil.copy(ob / "export" / "model_fp32.onnx", exp / "model_fp32.onnx")
    with pytest.raises(ConfigMismatchError, match="other preprocessing.*export the model again"):
        resolve_model(exp)
    # weights swapped under an export that names its own
    b = tmp_path / "swapped"
    shutil.copytree(tiny_bundle, b)
    resolve_model(b)
    shutil.copy(ob / "model.safetensors", b / "model.safetensors")
    with pytest.raises(ValueError, match="exported from other weights.*leukedge export"):
        resolve_model(b)


# -- 4. decode memory budget of a batch -------------------------------------------------------------------------
def _png16_black(path: Path, side: int) -> None:
    """A 16-bit RGB PNG of side x side black pixels, streamed (about 0.4 MB for 7999 x 7999)."""
    import struct

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    z = zlib.compressobj(6)
    row = b"\0" * (1 + 6 * side)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_batch_of_huge_16bit_pngs_stays_within_the_stated_memory_bound(native, tmp_path):
    first = tmp_path / "big0.png"
    _png16_black(first, 7999)  # 64 M pixels, just within max_pixels
    files = [first] + [tmp_path / f"big{i}.png" for i in range(1, 8)]
    for f in files[1:]:
        os.link(first, f)
    code = ("import json, sys; from leukedge.config import PreprocessConfig, StainConfig; "
            "p = PreprocessConfig(size=32, stain=StainConfig(method='none')).pipeline(); "
            "_, st = p.run(sys.argv[1:], threads=8); " + PEAK_MB +
            "print(json.dumps([sum(s['ok'] for s in st), peak_mb()]))")
    out = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    n_ok, rss_mb = json.loads(out.stdout.strip().splitlines()[-1])
    assert n_ok == 8
    # the bound `infer --help` states: 2 x max_pixels pixels at once, at most 16 bytes each (about 2 GB);
    # eight at once on 8 threads took 6.5 GB before
    assert rss_mb < 2200, f"peak RSS {rss_mb} MB"
