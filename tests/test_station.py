"""Microscope-station mode (`leukedge station`): folder watching, deadline batching, SQLite results,
restart after SIGKILL, clean shutdown on SIGTERM, bad files, status / export.

Every test runs the real stack -- Rust preprocessing (leukedge._native) and a real model (a small
randomly initialised CNN exported to ONNX, run by ONNX Runtime) -- on synthetic cells and, where
present, the real C-NMC sample cells in ../shared/data/cnmc_sample.  All are bounded in time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
native = pytest.importorskip("leukedge._native", reason="Rust core leukedge._native is not built")

from click.testing import CliRunner  # noqa: E402
from conftest import tiny_exported_bundle  # noqa: E402

from leukedge.cli.station import open_predictor, predict_fn, station_group  # noqa: E402
from leukedge.station import (  # noqa: E402
    DeadlineBatcher,
    Scanner,
    Station,
    StationSettings,
    is_ignored_name,
    make_sample_fn,
)
from leukedge.station.scanner import final_names_for_temp  # noqa: E402
from leukedge.synth import make_cell, write_bmp, write_png  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "cnmc_sample"


def real_cells(n: int) -> list[Path]:
    if not SAMPLE.is_dir():
        return []
    return sorted(SAMPLE.rglob("*.bmp"))[:n]


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real (small, randomly initialised) model bundle with an ONNX export next to it."""
    return tiny_exported_bundle(tmp_path_factory.mktemp("station_model"))


@pytest.fixture(scope="module")
def predictor(model_dir):
    from rich.console import Console

    pred, info = open_predictor(str(model_dir), "onnxruntime", fallback=False, device="cpu", threads=2,
                                batch_size=16, console=Console(stderr=True, quiet=True))
    yield pred, info
    pred.close()


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> dict[str, bytes]:
    """Encoded synthetic cells (BMP and PNG) and real sample cells, by name."""
    out: dict[str, bytes] = {}
    d = tmp_path_factory.mktemp("station_cells")
    for i in range(12):
        img = make_cell(i % 2, seed=100 + i, size=160 if i % 3 else 450)
        p = d / (f"syn{i:02d}.bmp" if i % 2 == 0 else f"syn{i:02d}.png")
        (write_bmp if p.suffix == ".bmp" else write_png)(p, img)
        out[p.name] = p.read_bytes()
    for p in real_cells(10):
        out["real_" + p.name] = p.read_bytes()
    return out


def settings(watch: Path, **kw) -> StationSettings:
    base = dict(watch_dir=watch, db_path=watch / ".leukedge-station.sqlite", batch_size=8, max_wait_ms=150,
                settle_ms=250, poll_ms=25, heartbeat_s=0.2)
    base.update(kw)
    return StationSettings(**base)


def rows(db: Path, where: str = "1") -> list[dict]:
    c = sqlite3.connect(db)
    c.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in c.execute(f"SELECT * FROM results WHERE {where} ORDER BY id")]
    finally:
        c.close()


def count_results(db: Path) -> int:
    """Rows so far; 0 while the station is still creating the database."""
    if not db.exists():
        return 0
    try:
        return query(db, "SELECT COUNT(*) FROM results")[0][0]
    except sqlite3.OperationalError:
        return 0


def query(db: Path, sql: str, *args) -> list[tuple]:
    c = sqlite3.connect(db, timeout=10)
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    plan = json.load(open(sys.argv[1]))
    for step in plan:
        data = open(step["src"], "rb").read()
        dst = step["dst"]
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        mode = step["mode"]
        if mode == "partial":          # write half, pause (shorter than the settle time), write the rest
            with open(dst, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
                time.sleep(step.get("pause", 0.08))
                f.write(data[len(data) // 2 :])
        elif mode == "rename":         # write to a temporary name, then rename
            tmp = dst + step.get("tmp_suffix", ".tmp")
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush()
                time.sleep(step.get("pause", 0.03))
                f.write(data[len(data) // 2 :])
            os.rename(tmp, dst)
        else:
            with open(dst, "wb") as f:
                f.write(data)
        print(json.dumps({"dst": dst, "t": time.time()}), flush=True)
        time.sleep(step.get("sleep", 0.0))
    """
)


def start_writer(tmp: Path, plan: list[dict]) -> subprocess.Popen:
    src = tmp / "writer_src"
    src.mkdir(exist_ok=True)
    (tmp / "writer.py").write_text(WRITER)
    (tmp / "plan.json").write_text(json.dumps(plan))
    return subprocess.Popen([sys.executable, str(tmp / "writer.py"), str(tmp / "plan.json")], stdout=subprocess.PIPE,
                            text=True)


def stage(tmp: Path, name: str, data: bytes) -> str:
    p = tmp / "writer_src" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return str(p)


def station_cli(watch: Path, model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "leukedge.cli", "station", str(watch), "--model", str(model_dir),
            "--backend", "onnxruntime", "--device", "cpu", "--threads", "2", "--poll-ms", "25", "--settle-ms", "250",
            "--heartbeat-s", "0.2", *extra]


def sub_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


# -- pure logic ------------------------------------------------------------------------------------
def test_ignored_and_temporary_names():
    for name in (".hidden.bmp", "cell.bmp.tmp", "cell.part", "~cell.bmp", "cell.bmp~", "#cell.bmp#", ".cell.bmp.Ab12Cd",
                 "cell.bmp.crdownload", "CELL.BMP.TMP"):
        assert is_ignored_name(name), name
    for name in ("cell.bmp", "UID_H10_1_1_hem.bmp", "a.tmp.bmp"):
        assert not is_ignored_name(name), name
    assert "cell.bmp" in final_names_for_temp("cell.bmp.tmp")
    assert "cell.bmp" in final_names_for_temp(".cell.bmp.Ab12Cd")
    assert "cell" in final_names_for_temp("cell.part")
    assert is_ignored_name("x.bmp", ("x.*",))


def test_sample_id_rules(tmp_path):
    f = make_sample_fn(str(tmp_path), None)
    assert f(str(tmp_path / "P17" / "c.bmp")) == "P17"
    g = make_sample_fn(str(tmp_path), r"^(?P<sample>[^/]+)/")
    assert g(str(tmp_path / "slideA" / "field3" / "c.bmp")) == "slideA"
    h = make_sample_fn(str(tmp_path), r"UID_(?P<sample>h?H?\d+)_")
    assert h(str(tmp_path / "x" / "UID_H10_1_2_hem.bmp")) == "H10"
    assert h(str(tmp_path / "x" / "other.bmp")) == "x"  # no match: parent folder
    with pytest.raises(ValueError, match="named group"):
        make_sample_fn(str(tmp_path), r"(\d+)")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        make_sample_fn(str(tmp_path), r"(")


@pytest.mark.timeout(10)
def test_deadline_batcher_full_deadline_flush():
    class It:
        def __init__(self, t):
            self.ready_mono = t

    b = DeadlineBatcher(max_batch=4, max_wait_s=0.2)
    now = time.monotonic()
    b.put([It(now) for _ in range(9)])
    assert [len(b.take(0.01)[0]) for _ in range(2)] == [4, 4]
    t0 = time.monotonic()
    items, reason = b.take(1.0)  # one left: released when it has waited 0.2 s since it was ready
    assert (len(items), reason) == (1, "deadline") and time.monotonic() - now >= 0.19
    assert time.monotonic() - t0 < 0.5
    assert b.take(0.05) == ([], None)
    b.put([It(time.monotonic()) for _ in range(2)])
    assert b.take(0.01, flush=True)[1] == "flush"


@pytest.mark.timeout(20)
def test_scanner_waits_for_stable_size_and_rename(tmp_path):
    sc = Scanner(tmp_path, settle_s=0.15)
    p = tmp_path / "s1" / "a.bmp"
    p.parent.mkdir()
    with open(p, "wb") as f:
        f.write(b"BM" + b"\0" * 1000)
        f.flush()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # still growing: never handed over
            assert sc.scan() == []
            f.write(b"\1" * 100)
            f.flush()
            time.sleep(0.03)
    t0 = time.monotonic()
    got = []
    while not got and time.monotonic() - t0 < 3:
        got = sc.scan()
        time.sleep(0.02)
    assert [g.path for g in got] == [str(p)] and got[0].how == "settled"
    assert got[0].sha256 == sha(p) and got[0].sample_id == "s1"
    assert time.monotonic() - t0 >= 0.14
    # temporary name seen, then renamed: complete at once, the temp itself is never handed over
    tmp = tmp_path / "s1" / "b.bmp.part"
    tmp.write_bytes(b"BM123")
    assert sc.scan() == []
    os.rename(tmp, tmp_path / "s1" / "b.bmp")
    got = sc.scan()
    assert [(Path(g.path).name, g.how) for g in got] == [("b.bmp", "renamed")]
    # handed-over files are not handed over again while in flight or once reported done
    assert sc.scan() == []
    sc.report_done(got[0].path, got[0].sha256, got[0].size, got[0].mtime_ns)
    time.sleep(0.2)
    assert sc.scan() == [] and sc.scan() == []


@pytest.mark.timeout(20)
def test_scanner_skips_stored_files_between_full_sweeps_but_catches_rewrites(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    for i in range(5):
        (d / f"c{i}.bmp").write_bytes(b"BM" + bytes([i]) * 10)
    sc = Scanner(tmp_path, settle_s=0.0, full_scan_s=1.0)
    got = []
    for _ in range(20):
        got += sc.scan()
        if len(got) == 5:
            break
        time.sleep(0.02)
    assert len(got) == 5
    for g in got:
        sc.report_done(g.path, g.sha256, g.size, g.mtime_ns)
    sc.scan()
    t_full = time.monotonic()
    (d / "c2.bmp").write_bytes(b"BM" + b"\xee" * 10)  # rewritten in place: same folder entries
    (d / "new.bmp").write_bytes(b"BMnew")              # a new file: picked up at once
    seen: dict[str, float] = {}
    while time.monotonic() - t_full < 3.0 and len(seen) < 2:
        for g in sc.scan():
            seen[Path(g.path).name] = time.monotonic() - t_full
            assert g.sha256 == sha(g.path)
        time.sleep(0.02)
    assert set(seen) == {"new.bmp", "c2.bmp"}
    assert seen["new.bmp"] < 0.5


# -- end to end --------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_end_to_end_slow_partial_writer(tmp_path, predictor, cells):
    """A writer process drops synthetic and real cells slowly, half-written, and via temp+rename;
    every final file gets exactly one result row, computed from its complete content."""
    pred, info = predictor
    watch = tmp_path / "watch"
    watch.mkdir()
    plan, expect = [], {}
    modes = ["partial", "rename", "direct", "rename"]
    for i, (name, data) in enumerate(sorted(cells.items())):
        sample = "real" if name.startswith("real_") else f"S{i % 3}"
        dst = watch / sample / name
        plan.append({"src": stage(tmp_path, name, data), "dst": str(dst), "mode": modes[i % 4],
                     "tmp_suffix": [".tmp", ".part"][i % 2], "sleep": [0.0, 0.05, 0.12][i % 3]})
        expect[str(dst)] = (hashlib.sha256(data).hexdigest(), sample)
    writer = start_writer(tmp_path, plan)
    st = Station(settings(watch, settle_ms=400, exit_when_idle_s=1.0), predict_fn(pred), info,
                 install_signal_handlers=False)
    summary = st.run()
    assert writer.wait(timeout=30) == 0
    got = rows(watch / ".leukedge-station.sqlite")
    assert sorted(r["path"] for r in got) == sorted(expect)  # exactly one row per final file, no temp names
    for r in got:
        h, sample = expect[r["path"]]
        assert r["sha256"] == h, f"{r['path']} was read before it was complete"
        assert r["status"] == "ok", r["error"]
        assert 0.0 <= r["probability"] <= 1.0 and r["label"] in ("all", "hem")
        assert r["is_blast"] == int(r["label"] == "all")
        assert r["sample_id"] == sample
        assert r["model_id"] == info.model_id and r["preprocess_hash"] == info.preprocess_hash
        assert r["backend"].startswith("onnxruntime")
        assert r["detected_at"] <= r["ready_at"] <= r["started_at"] <= r["done_at"]
        assert r["latency_ms"] > 0 and r["queued_ms"] >= 0 and r["compute_ms"] is not None
    assert summary.processed == len(expect) and summary.errors == 0
    # the station's numbers equal a direct call of the same Predictor on the same files
    direct = {r.path: r for r in pred.predict([r["path"] for r in got])}
    for r in got:
        assert abs(direct[r["path"]].probability - r["probability"]) < 1e-5


@pytest.mark.timeout(60)
def test_bad_files_recorded_and_station_continues(tmp_path, predictor, cells):
    pred, info = predictor
    watch = tmp_path / "w"
    (watch / "S1").mkdir(parents=True)
    good = [n for n in sorted(cells) if n.endswith(".bmp")][:3]
    for n in good:
        (watch / "S1" / n).write_bytes(cells[n])
    bmp = cells[good[0]]
    (watch / "S1" / "truncated.bmp").write_bytes(bmp[: len(bmp) // 3])
    (watch / "S1" / "garbage.bmp").write_bytes(os.urandom(5000))
    (watch / "S1" / "text.png").write_text("this is not an image\n")
    (watch / "S1" / "gif_named.png").write_bytes(b"GIF89a" + b"\0" * 100)
    (watch / "S1" / "huge.bmp").write_bytes(b"BM" + b"\0" * (1200 * 1024))
    (watch / "S1" / "notes.txt").write_text("ignored: not an image extension")
    st = Station(settings(watch, once=True, max_file_mb=1.0), predict_fn(pred), info, install_signal_handlers=False)
    summary = st.run()
    got = {Path(r["path"]).name: r for r in rows(watch / ".leukedge-station.sqlite")}
    assert set(got) == set(good) | {"truncated.bmp", "garbage.bmp", "text.png", "gif_named.png", "huge.bmp"}
    for n in good:
        assert got[n]["status"] == "ok"
    for n in ("truncated.bmp", "garbage.bmp", "text.png", "gif_named.png", "huge.bmp"):
        assert got[n]["status"] == "error" and got[n]["error"], n
        assert got[n]["probability"] is None
    assert "too large" in got["huge.bmp"]["error"]
    assert summary.errors == 5 and summary.processed == len(good) + 5


@pytest.mark.timeout(60)
def test_batches_close_on_deadline_when_trickling_and_fill_when_flooded(tmp_path, predictor, cells):
    pred, info = predictor
    data = cells[sorted(cells)[0]]
    # flood: 24 complete files at once -> batches of exactly --batch
    flood = tmp_path / "flood"
    (flood / "S").mkdir(parents=True)
    for i in range(24):
        (flood / "S" / f"c{i:02d}.bmp").write_bytes(data[:-1] + bytes([i]))
    st = Station(settings(flood, batch_size=8, max_wait_ms=5000, exit_when_idle_s=0.3), predict_fn(pred), info,
                 install_signal_handlers=False)
    st.run()
    b = query(flood / ".leukedge-station.sqlite", "SELECT size, reason, state FROM batches ORDER BY id")
    assert b == [(8, "full", "done")] * 3
    assert query(flood / ".leukedge-station.sqlite", "SELECT COUNT(DISTINCT batch_id), COUNT(*) FROM results") == [(3, 24)]

    # trickle: one file every 0.3 s, renamed into place -> each batch closes on the deadline, small
    trickle = tmp_path / "trickle"
    trickle.mkdir()
    plan = [{"src": stage(tmp_path, f"t{i}.bmp", data[:-1] + bytes([100 + i])), "dst": str(trickle / "S" / f"t{i}.bmp"),
             "mode": "rename", "sleep": 0.3} for i in range(6)]
    writer = start_writer(tmp_path, plan)
    st = Station(settings(trickle, batch_size=8, max_wait_ms=100, exit_when_idle_s=0.8), predict_fn(pred), info,
                 install_signal_handlers=False)
    st.run()
    assert writer.wait(timeout=20) == 0
    b = query(trickle / ".leukedge-station.sqlite", "SELECT size, reason FROM batches ORDER BY id")
    assert sum(n for n, _ in b) == 6
    assert all(reason == "deadline" and n < 8 for n, reason in b), b
    assert len(b) >= 4  # files 0.3 s apart, 0.1 s deadline: (almost) one batch per file
    q = [r[0] for r in query(trickle / ".leukedge-station.sqlite", "SELECT queued_ms FROM results")]
    assert max(q) < 100 + 400  # released by the deadline (+ polling / CPU slack), not held for a full batch


@pytest.mark.timeout(30)
def test_backend_exceptions_are_isolated_per_file_and_a_dead_backend_stops_the_station(tmp_path, predictor, cells):
    from leukedge.station import StationError

    pred, info = predictor
    real = predict_fn(pred)
    watch = tmp_path / "w"
    (watch / "S").mkdir(parents=True)
    data = cells[sorted(cells)[0]]
    for i in range(6):
        (watch / "S" / f"c{i}.bmp").write_bytes(data[:-1] + bytes([i]))

    def flaky(paths):  # the runtime raises whenever one particular file is in the batch
        if any(p.endswith("c3.bmp") for p in paths):
            raise RuntimeError("simulated runtime failure")
        return real(paths)

    Station(settings(watch, batch_size=8, once=True), flaky, info, install_signal_handlers=False).run()
    got = {Path(r["path"]).name: r for r in rows(watch / ".leukedge-station.sqlite")}
    assert len(got) == 6 and got["c3.bmp"]["status"] == "error"
    assert "simulated runtime failure" in got["c3.bmp"]["error"]
    assert all(got[f"c{i}.bmp"]["status"] == "ok" for i in (0, 1, 2, 4, 5))

    dead = tmp_path / "dead"
    (dead / "S").mkdir(parents=True)
    for i in range(6):
        (dead / "S" / f"d{i}.bmp").write_bytes(data[:-1] + bytes([50 + i]))

    def broken(paths):
        raise RuntimeError("CUDA error: device lost")

    with pytest.raises(StationError, match="failed on 3 batches in a row"):
        Station(settings(dead, batch_size=2, max_wait_ms=10), broken, info, install_signal_handlers=False).run()
    db = dead / ".leukedge-station.sqlite"
    assert rows(db) == []  # nothing recorded as bad: the files are retried on the next start
    assert query(db, "SELECT state FROM heartbeat") == [("failed",)]
    Station(settings(dead, once=True), real, info, install_signal_handlers=False).run()
    assert len(rows(db)) == 6 and all(r["status"] == "ok" for r in rows(db))


@pytest.mark.timeout(30)
def test_max_files_stops_after_whole_batches(tmp_path, predictor, cells):
    pred, info = predictor
    watch = tmp_path / "w"
    (watch / "S").mkdir(parents=True)
    data = cells[sorted(cells)[0]]
    for i in range(10):
        (watch / "S" / f"c{i}.bmp").write_bytes(data[:-1] + bytes([i]))
    summary = Station(settings(watch, batch_size=2, max_wait_ms=5000, max_files=4), predict_fn(pred), info,
                      install_signal_handlers=False).run()
    assert summary.processed == 4 and summary.batch_sizes == [2, 2]
    assert "--max-files 4" in summary.exit_reason
    assert len(rows(watch / ".leukedge-station.sqlite")) == 4


@pytest.mark.timeout(60)
def test_sigterm_finishes_and_commits_the_batch_in_flight(tmp_path, predictor, cells):
    pred, info = predictor
    watch = tmp_path / "w"
    (watch / "S").mkdir(parents=True)
    data = cells[sorted(cells)[0]]
    for i in range(20):
        (watch / "S" / f"c{i:02d}.bmp").write_bytes(data[:-1] + bytes([i]))
    real = predict_fn(pred)
    calls = []

    def predict_then_signal(paths):
        calls.append(len(paths))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while this batch is in flight
        return real(paths)

    st = Station(settings(watch, batch_size=8, max_wait_ms=5000), predict_then_signal, info)
    summary = st.run()
    db = watch / ".leukedge-station.sqlite"
    assert summary.exit_reason == "SIGTERM received"
    assert calls == [8]
    assert query(db, "SELECT size, state FROM batches") == [(8, "done")]
    assert len(rows(db)) == 8 and all(r["status"] == "ok" for r in rows(db))
    assert query(db, "SELECT exit_reason FROM runs") == [("SIGTERM received",)]
    assert signal.getsignal(signal.SIGTERM) is not st._on_signal  # handlers restored
    # the rest is picked up by the next start, nothing twice
    Station(settings(watch, batch_size=8, once=True), real, info, install_signal_handlers=False).run()
    got = rows(db)
    assert len(got) == 20 and len({r["path"] for r in got}) == 20


@pytest.mark.timeout(90)
def test_sigkill_and_restart_nothing_lost_nothing_twice(tmp_path, model_dir, cells):
    watch = tmp_path / "w"
    data = sorted(cells.items())
    expect = {}
    for i in range(48):
        name, blob = data[i % len(data)]
        p = watch / f"S{i % 4}" / f"{i:02d}_{name}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
        expect[str(p)] = sha(p)
    db = watch / ".leukedge-station.sqlite"
    proc = subprocess.Popen(station_cli(watch, model_dir, "--batch", "2", "--max-wait-ms", "20", "-q"), env=sub_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and proc.poll() is None:
            if count_results(db) >= 6:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = rows(db)
    assert 6 <= len(first) < 48, "the station was not killed mid-run"
    # more files arrive while the station is down, one replaces an already classified file
    for i in range(48, 52):
        p = watch / "S9" / f"late{i}.bmp"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data[i % len(data)][1])
        expect[str(p)] = sha(p)
    replaced = Path(first[0]["path"])
    other = next(b for n, b in data if hashlib.sha256(b).hexdigest() != first[0]["sha256"])
    replaced.write_bytes(other)
    expect[str(replaced)] = sha(replaced)

    res = subprocess.run(station_cli(watch, model_dir, "--batch", "8", "--exit-when-idle", "1", "-q"), env=sub_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = rows(db)
    current = [r for r in got if not r["superseded"]]
    assert sorted(r["path"] for r in current) == sorted(expect)  # nothing lost
    assert len({(r["path"], r["sha256"]) for r in got}) == len(got)  # nothing twice
    assert len(got) == len(expect) + 1  # + the superseded row of the replaced file
    for r in current:
        assert r["sha256"] == expect[r["path"]] and r["status"] == "ok"
    old = [r for r in got if r["superseded"]]
    assert [r["path"] for r in old] == [str(replaced)]
    # rows committed before the kill were kept untouched (same ids, same results)
    by_id = {r["id"]: r for r in got}
    for r in first[1:]:
        assert by_id[r["id"]]["probability"] == r["probability"]
    runs = query(db, "SELECT exit_reason FROM runs ORDER BY id")
    assert runs[0][0].startswith("killed") and "idle" in runs[1][0]


@pytest.mark.timeout(60)
def test_cli_sigterm_status_and_export(tmp_path, model_dir, cells):
    watch = tmp_path / "w"
    for i, (name, blob) in enumerate(sorted(cells.items())[:10]):
        p = watch / ("A" if i < 6 else "B") / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    (watch / "B" / "broken.bmp").write_bytes(b"BM" + b"\xff" * 40)
    db = tmp_path / "db" / "station.sqlite"
    proc = subprocess.Popen(station_cli(watch, model_dir, "--db", str(db), "--batch", "4"), env=sub_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if count_results(db) >= 11:
                break
            time.sleep(0.05)
        runner = CliRunner()
        while time.monotonic() < deadline:  # the heartbeat catches up within --heartbeat-s
            live = runner.invoke(station_group, ["status", "--db", str(db), "--json"])
            assert live.exit_code == 0, live.output
            st = json.loads(live.output)
            if st["station"]["processed_this_run"] >= 11:
                break
            time.sleep(0.05)
        assert st["station"]["running"] is True and st["station"]["state"] == "running"
        assert st["station"]["queue_len"] == 0 and st["station"]["settling"] == 0
        assert st["throughput_1m"] > 0
        # a second station on the same database is refused while this one runs
        second = runner.invoke(station_group, ["run", str(watch), "--model", str(model_dir), "--db", str(db),
                                               "--backend", "onnxruntime", "--once", "-q"])
        assert second.exit_code != 0 and "another station" in second.output, second.output
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM" in err
    assert query(db, "SELECT COUNT(*) FROM batches WHERE state != 'done'") == [(0,)]
    assert query(db, "SELECT exit_reason FROM runs") == [("SIGTERM received",)]

    runner = CliRunner()
    st = json.loads(runner.invoke(station_group, ["status", "--db", str(db), "--json"]).output)
    assert st["station"]["running"] is False
    samples = {s["sample_id"]: s for s in st["samples"]}
    assert samples["A"]["n_cells"] == 6 and samples["B"]["n_cells"] == 4 and samples["B"]["n_errors"] == 1
    for s in samples.values():
        assert s["blast_fraction"] == pytest.approx(s["n_blasts"] / s["n_cells"])
    text = runner.invoke(station_group, ["status", "--db", str(db)])
    assert text.exit_code == 0 and "Per-sample totals" in text.output

    out_csv = tmp_path / "exp" / "totals.csv"
    r = runner.invoke(station_group, ["export", "--db", str(db), "-o", str(out_csv)])
    assert r.exit_code == 0, r.output
    lines = out_csv.read_text().splitlines()
    assert lines[0].startswith("sample_id,n_files,n_cells,n_blasts,blast_fraction,n_errors")
    assert len(lines) == 3 and lines[1].startswith("A,6,6,") and lines[2].startswith("B,5,4,")
    out_json = tmp_path / "exp" / "cells.json"
    r = runner.invoke(station_group, ["export", "--db", str(db), "-o", str(out_json), "--cells"])
    assert r.exit_code == 0, r.output
    per_cell = json.loads(out_json.read_text())
    assert len(per_cell) == 11 and {c["status"] for c in per_cell} == {"ok", "error"}
    assert sorted(os.listdir(out_csv.parent)) == ["cells.json", "totals.csv"]  # no temp files left behind
    # a station database that does not exist is named in the error
    r = runner.invoke(station_group, ["status", "--db", str(tmp_path / "nope.sqlite")])
    assert r.exit_code != 0 and "nope.sqlite" in r.output


@pytest.mark.timeout(60)
def test_gpu_backend_failure_is_clear_and_fallback_uses_onnxruntime(tmp_path, model_dir, cells):
    watch = tmp_path / "w"
    (watch / "S").mkdir(parents=True)
    name = sorted(cells)[0]
    (watch / "S" / name).write_bytes(cells[name])
    runner = CliRunner()
    args = ["run", str(watch), "--model", str(model_dir), "--backend", "tensorrt", "--once", "--settle-ms", "100", "-q"]
    r = runner.invoke(station_group, args)
    assert r.exit_code != 0
    assert "backend 'tensorrt' failed to start" in r.output and "--fallback" in r.output
    r = runner.invoke(station_group, [*args, "--fallback"])
    assert r.exit_code == 0, r.output
    assert "falling back" in r.output.lower() or "fallback" in r.output.lower()
    got = rows(watch / ".leukedge-station.sqlite")
    assert len(got) == 1 and got[0]["status"] == "ok" and got[0]["backend"].startswith("onnxruntime")
