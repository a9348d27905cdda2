"""Bad input never crashes, hangs or lies (issue 12): one regression test per case of the red-team
pass. Every case that could hang or abort runs in a subprocess with a timeout (and a memory limit
where it allocates), so a regression fails the test instead of hanging or killing the suite.

The table of what a user gets for each kind of bad input is docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_exported_bundle

from leukedge.config import PreprocessConfig, StainConfig

native = pytest.importorskip("leukedge._native", reason="the Rust extension is not built")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "cnmc_sample"
GIB = 1 << 30


def real_cells(n: int) -> list[Path]:
    cells = sorted(SAMPLE.rglob("*.bmp"))[:n] if SAMPLE.is_dir() else []
    if len(cells) < n:
        pytest.skip(f"real C-NMC sample not present at {SAMPLE}")
    return cells


def synth_cell(path: Path, seed: int = 0, size: int = 96) -> Path:
    from leukedge.synth import make_cell, write_bmp, write_png

    path.parent.mkdir(parents=True, exist_ok=True)
    (write_png if path.suffix == ".png" else write_bmp)(path, make_cell(seed % 2, seed=seed, size=size))
    return path


def run_py(code: str, *, timeout: float = 120, mem_bytes: int | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, bounded in time (and address space, when given)."""
    def limit() -> None:
        if mem_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, env=env)


def cli(*args: str, timeout: float = 180, mem_bytes: int | None = None) -> subprocess.CompletedProcess:
    """``leukedge ARGS`` in a subprocess (bounded)."""
    code = f"import sys; from leukedge.cli import main; sys.argv = ['leukedge'] + {list(args)!r}; main()"
    return run_py(code, timeout=timeout, mem_bytes=mem_bytes)


def one_clear_line(res) -> str:
    """The error output of a refused command: non-zero exit, no traceback, an ``Error:`` line."""
    if isinstance(res, subprocess.CompletedProcess):
        out, code = (res.stderr or "") + (res.stdout or ""), res.returncode
    else:  # click.testing.Result: .output holds stdout and stderr
        out, code = res.output, res.exit_code
    assert code not in (0, None), out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    return errors[0]


# -- a small real model (random tiny CNN), as a bundle with an ONNX export -------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    return tiny_exported_bundle(tmp_path_factory.mktemp("rel_model"), size=32, width=4)


# ==================================================================================================
# 1. A very tall or thin image must not abort the process (pad_to_square allocated max(w,h)^2)
# ==================================================================================================
def test_very_tall_and_thin_images_do_not_abort_the_batch(tmp_path):
    cell = real_cells(1)[0]
    code = f"""
        import json
        from PIL import Image
        from leukedge import _native
        Image.new("RGB", (1, 16_000_000)).save({str(tmp_path / 'tall.png')!r})
        im = Image.new("RGB", (100, 60_000), (90, 40, 160)); im.save({str(tmp_path / 'thin.png')!r})
        x, st = _native.preprocess_batch([{str(tmp_path / 'tall.png')!r}, {str(cell)!r}, {str(tmp_path / 'thin.png')!r}],
                                         '{{"size": 64}}', threads=1)
        print(json.dumps([s["ok"] for s in st]), float(abs(x[1]).sum()))
    """
    # before the fix: "memory allocation of 768000000000000 bytes failed", SIGABRT (rc -6 / 134)
    res = run_py(code, timeout=240, mem_bytes=3 * GIB)
    assert res.returncode == 0, res.stderr[-2000:]
    oks, mass = res.stdout.strip().rsplit(" ", 1)
    assert json.loads(oks) == [True, True, True] and float(mass) > 0


def test_bounded_padding_is_close_to_exact_padding(native):
    """Where the padded square would exceed max_pixels, the region is downscaled first: the result
    stays close to the exact pad-then-resize (here computable, 3000^2 pixels)."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(150, 40, (3000, 200, 3)), 1, 255).astype(np.uint8)
    cfg = {"size": 32, "crop": "none", "stain": {"method": "none"}, "dtype": "uint8", "layout": "nhwc"}
    exact, st1 = native.preprocess_batch([img], json.dumps({**cfg, "max_pixels": 64_000_000}))
    bounded, st2 = native.preprocess_batch([img], json.dumps({**cfg, "max_pixels": 1_000_000}))
    assert st1[0]["ok"] and st2[0]["ok"]
    diff = np.abs(exact.astype(int) - bounded.astype(int))
    assert diff.mean() < 2 and (bounded[0, :, :14] == 0).all() and (bounded[0, :, 15:17] > 0).all()


# ==================================================================================================
# 2. Special files (FIFO, symlink to /dev/zero, symlink loops) never hang or exhaust memory
# ==================================================================================================
@pytest.fixture()
def hostile_folder(tmp_path) -> Path:
    d = tmp_path / "hostile"
    good = synth_cell(d / "hem" / "good.bmp", seed=1)
    os.mkfifo(d / "hem" / "fifo.bmp")
    os.symlink("/dev/zero", d / "hem" / "zero.bmp")
    os.symlink("..", d / "hem" / "loop1")
    os.symlink("..", d / "hem" / "loop2")
    assert good.is_file()
    return d


def test_discovery_survives_symlink_loops(hostile_folder):
    code = f"""
        from leukedge.data import discover
        print(sorted(r.path.name for r in discover([{str(hostile_folder)!r}])))
    """
    res = run_py(code, timeout=60)  # before: 2 links to '..' made the walk exponential (a hang)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "['fifo.bmp', 'good.bmp', 'zero.bmp']"


def test_native_refuses_special_files_without_reading(native, hostile_folder):
    code = f"""
        from leukedge import _native
        x, st = _native.preprocess_batch([{str(hostile_folder / 'hem/fifo.bmp')!r}, {str(hostile_folder / 'hem/zero.bmp')!r},
                                          {str(hostile_folder / 'hem/good.bmp')!r}], '{{"size": 32}}', threads=1)
        for s in st: print(s["ok"], s["error"])
    """
    res = run_py(code, timeout=60, mem_bytes=2 * GIB)  # before: FIFO blocked forever, /dev/zero grew without end
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("False") and "FIFO" in lines[0] and "fifo.bmp" in lines[0]
    assert lines[1].startswith("False") and "character device" in lines[1]
    assert lines[2].startswith("True")
    with pytest.raises(native.DecodeError, match="not a regular file"):
        native.decode("/dev/zero")


def test_preprocess_and_infer_report_special_files_per_file(hostile_folder, tmp_path, tiny_model):
    res = cli("preprocess", str(hostile_folder), "-o", str(tmp_path / "cache"), "--size", "32", "--threads", "1",
              "--allow-errors", timeout=120, mem_bytes=3 * GIB)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    manifest = (tmp_path / "cache" / "manifest.csv").read_text()
    assert "not a regular file (a FIFO" in manifest and "not a regular file (a character device" in manifest
    res = cli("infer", str(hostile_folder), "-m", str(tiny_model), "--backend", "onnxruntime", "-o",
              str(tmp_path / "r.csv"), timeout=120, mem_bytes=4 * GIB)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    rows = (tmp_path / "r.csv").read_text().splitlines()[1:]
    assert sum(",ok," in r for r in rows) == 1 and sum(",error," in r for r in rows) == 2


def test_file_sha256_refuses_special_and_oversized_files(tmp_path):
    from leukedge.data import FileTooLarge, NotRegularFile, file_sha256

    os.mkfifo(tmp_path / "f.bmp")
    with pytest.raises(NotRegularFile, match="FIFO"):
        file_sha256(tmp_path / "f.bmp")  # would block in open() before the fix
    with pytest.raises(NotRegularFile, match="character device"):
        file_sha256("/dev/zero")
    (tmp_path / "big.bmp").write_bytes(b"x" * 100)
    with pytest.raises(FileTooLarge):
        file_sha256(tmp_path / "big.bmp", max_bytes=99)
    assert len(file_sha256(tmp_path / "big.bmp", max_bytes=100)) == 64


# ==================================================================================================
# 3. A truncated JPEG is an error, not a grey-filled cell
# ==================================================================================================
def test_truncated_jpeg_is_refused_like_pillow(native, tmp_path):
    from PIL import Image

    src = real_cells(1)[0]
    Image.open(src).convert("RGB").save(tmp_path / "cell.jpg", quality=90)
    data = (tmp_path / "cell.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):
        Image.open(tmp_path / "half.jpg").load()  # Pillow refuses it ...
    with pytest.raises(native.DecodeError, match="truncated"):
        native.decode(str(tmp_path / "half.jpg"))  # ... and so do we (before: decoded, missing half grey)
    assert native.decode(str(tmp_path / "cell.jpg")).shape[:2] == Image.open(src).size[::-1]
    _, st = native.preprocess_batch([str(tmp_path / "half.jpg"), str(tmp_path / "cell.jpg")], '{"size": 32}')
    assert [s["ok"] for s in st] == [False, True] and "half.jpg" in st[0]["error"]


# ==================================================================================================
# 4. A model whose outputs are NaN never yields "status ok"
# ==================================================================================================
def _edit_weights(bundle: Path, dest: Path, fn) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("export"))
    state = load_file(str(dest / "model.safetensors"))
    save_file(fn(state), str(dest / "model.safetensors"))
    return dest


def test_nan_or_int8_weights_are_refused(tiny_model, tmp_path):
    import torch

    from leukedge.models import BundleError, load_bundle

    def nan(state):
        k = next(k for k, v in state.items() if v.is_floating_point() and v.ndim > 1)
        state[k] = torch.full_like(state[k], float("nan"))
        return state

    def int8(state):
        return {k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in state.items()}

    with pytest.raises(BundleError, match="NaN"):
        load_bundle(_edit_weights(tiny_model, tmp_path / "nan", nan))
    with pytest.raises(BundleError, match="int8"):
        load_bundle(_edit_weights(tiny_model, tmp_path / "int8", int8))
    cell = synth_cell(tmp_path / "c.bmp")
    res = CliRunner().invoke(__import__("leukedge.cli.infer", fromlist=["infer_cmd"]).infer_cmd,
                             [str(cell), "-m", str(tmp_path / "nan"), "--backend", "torch", "-o", str(tmp_path / "o.csv")])
    assert "NaN" in one_clear_line(res)  # before: "probability nan, label hem, status ok", exit 0


def test_non_finite_model_output_is_an_error_per_file(tiny_model, tmp_path):
    from leukedge.engines import Backend, resolve_model
    from leukedge.infer import Predictor

    class NanBackend(Backend):
        name = "nan-test"
        device_kind = "cpu"

        def infer_impl(self, batch):
            out = np.zeros((len(batch), 2), np.float32)
            out[0] = np.nan
            return out, None

    cells = [str(synth_cell(tmp_path / f"c{i}.bmp", seed=i)) for i in range(3)]
    pred = Predictor(spec=resolve_model(tiny_model), backend_obj=NanBackend(), pipeline=False)
    res = pred.predict(cells)
    assert [r.status for r in res] == ["error", "ok", "ok"]
    assert res[0].probability is None and "non-finite" in res[0].error


# ==================================================================================================
# 5. Contradictory thresholds are refused
# ==================================================================================================
def test_white_threshold_below_black_threshold_is_refused(tmp_path):
    from leukedge.cli.preprocess import preprocess_cmd

    with pytest.raises(ValueError, match="white_threshold"):
        StainConfig(black_threshold=100, white_threshold=50)
    cell = synth_cell(tmp_path / "d" / "c.bmp")
    res = CliRunner().invoke(preprocess_cmd, [str(cell.parent), "-o", str(tmp_path / "c"), "--black-threshold", "100",
                                              "--white-threshold", "50"])
    assert "--white-threshold" in one_clear_line(res)  # before: every image black, status ok
    with pytest.raises(native.ConfigError, match="white_threshold"):
        native.preprocess_batch([str(cell)], json.dumps({"stain": {"black_threshold": 100, "white_threshold": 50}}))


# ==================================================================================================
# 6. A current row follows its file: renamed, moved or deleted files stop counting
# ==================================================================================================
def _fake_predict(paths):
    return [{"path": p, "probability": 0.9, "label": "all", "status": "ok", "error": None} for p in paths]


def _run_station_until(settings, done, timeout=60.0):
    from leukedge.station import ModelInfo, Station

    st = Station(settings, _fake_predict, ModelInfo("m", "m@1", "h", "fake"), install_signal_handlers=False)
    import threading

    th = threading.Thread(target=st.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        while not done():
            assert time.monotonic() - t0 < timeout, "station did not get there in time"
            assert th.is_alive(), "station stopped"
            time.sleep(0.05)
    finally:
        st.request_stop("test done")
        th.join(timeout=30)
    return st


def _current(db: Path) -> dict[str, int]:
    from leukedge.station import db as sdb

    conn = sdb.connect(db, readonly=True)
    try:
        return {s["sample_id"]: s["n_cells"] for s in sdb.sample_totals(conn)}
    finally:
        conn.close()


def test_station_rows_follow_renamed_moved_and_deleted_files(tmp_path):
    from leukedge.station import StationSettings

    watch = tmp_path / "watch"
    for i in range(6):
        synth_cell(watch / "s1" / f"c{i}.bmp", seed=i, size=64)
    db = tmp_path / "st.sqlite"
    s = StationSettings(watch_dir=watch, db_path=db, batch_size=8, max_wait_ms=50, settle_ms=100, poll_ms=20,
                        heartbeat_s=0.2, full_scan_s=0.5)
    _run_station_until(s, lambda: db.exists() and _current_safe(db) == {"s1": 6})
    os.rename(watch / "s1" / "c0.bmp", watch / "s1" / "c0-renamed.bmp")
    (watch / "s2").mkdir()
    os.rename(watch / "s1" / "c1.bmp", watch / "s2" / "c1.bmp")
    os.unlink(watch / "s1" / "c2.bmp")
    # before the fix: 9 cells for 6 files (old rows kept counting next to the new ones)
    _run_station_until(s, lambda: _current_safe(db) == {"s1": 4, "s2": 1})
    # a restart keeps the counts, and a file that comes back counts again
    os.rename(watch / "s1" / "c0-renamed.bmp", watch / "s1" / "c0.bmp")
    _run_station_until(s, lambda: _current_safe(db) == {"s1": 4, "s2": 1}
                       and query_one(db, "SELECT COUNT(*) FROM results WHERE superseded = 0 AND path LIKE '%c0.bmp'") == 1)


def query_one(db: Path, sql: str):
    c = sqlite3.connect(db, timeout=10)
    try:
        return c.execute(sql).fetchone()[0]
    finally:
        c.close()


def _current_safe(db: Path) -> dict[str, int]:
    try:
        return {k: v for k, v in _current(db).items() if v}
    except Exception:  # noqa: BLE001 - the station may still be creating the database
        return {}


# ==================================================================================================
# 7. The station records the model that ran: export.json file hashes are checked
# ==================================================================================================
def test_export_with_another_models_onnx_is_refused_and_model_id_is_what_ran(tiny_model, tmp_path):
    import torch
    from rich.console import Console

    from leukedge.cli.station import open_predictor
    from leukedge.data import file_sha256
    from leukedge.engines import resolve_model
    from leukedge.export import export_model
    from leukedge.models import build_model

    torch.manual_seed(1)
    other = build_model("tiny", width=4).eval()
    cfg = PreprocessConfig(size=32)
    export_model(other, cfg, tmp_path / "other", meta={"arch": "tiny"}, fp16=False, check=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_model / "export", mixed)
    shutil.copy(tmp_path / "other" / "model_fp32.onnx", mixed / "model_fp32.onnx")
    with pytest.raises(ValueError, match="sha256"):
        resolve_model(mixed)  # before: accepted, and the station named the bundle from export.json
    pred, info = open_predictor(str(tiny_model / "export"), "onnxruntime", fallback=False, device="cpu", threads=1,
                                batch_size=4, console=Console(quiet=True))
    try:
        ran = file_sha256(tiny_model / "export" / "model_fp32.onnx")[:12]
        assert info.model_id == f"export@{ran}"
    finally:
        pred.close()


# ==================================================================================================
# 8. infer: the output is checked before the work; a write failure says where
# ==================================================================================================
def test_infer_refuses_a_bad_output_before_inference(tmp_path, monkeypatch):
    import leukedge.infer.predictor as inf  # where run_inference looks Predictor up

    class Boom:
        def __init__(self, *a, **k):
            raise AssertionError("inference started before the output was checked")

    monkeypatch.setattr(inf, "Predictor", Boom)
    from leukedge.cli.infer import infer_cmd

    cell = synth_cell(tmp_path / "c.bmp")
    res = CliRunner().invoke(infer_cmd, [str(cell), "-o", str(tmp_path / "x.txt")])
    assert ".csv or .jsonl" in one_clear_line(res)
    res = CliRunner().invoke(infer_cmd, [str(cell), "-o", "/proc/leukedge-test/results.csv"])  # read-only
    assert "cannot write the results file /proc/leukedge-test/results.csv" in one_clear_line(res)


def test_infer_write_failure_is_one_line_and_leaves_no_temp_file(tiny_model, tmp_path, monkeypatch):
    import leukedge.engines.sidecar as sidecar
    from leukedge.cli.infer import infer_cmd

    cell = synth_cell(tmp_path / "in" / "c.bmp")
    out = tmp_path / "out"
    out.mkdir()

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sidecar.os, "replace", full_disk)
    res = CliRunner().invoke(infer_cmd, [str(cell), "-m", str(tiny_model), "--backend", "onnxruntime",
                                             "-o", str(out / "r.csv")])
    line = one_clear_line(res)
    assert "could not be written to" in line and str(out / "r.csv") in line and "No space left" in line
    # issue 25: rows are streamed as batches finish; the finished ones are kept, with the way to resume
    assert list(out.iterdir()) == [out / "r.csv.partial"] and "--resume" in line


# ==================================================================================================
# 9. The station database: read-only medium, corrupt file
# ==================================================================================================
def _station_db_with_rows(watch: Path, db: Path, sample: str = "s1", n: int = 2) -> None:
    from leukedge.station import StationSettings

    for i in range(n):
        synth_cell(watch / sample / f"c{i}.bmp", seed=i, size=64)
    s = StationSettings(watch_dir=watch, db_path=db, batch_size=8, max_wait_ms=50, settle_ms=50, poll_ms=20,
                        heartbeat_s=0.2)
    _run_station_until(s, lambda: db.exists() and sum(_current_safe(db).values()) == n)


def _make_read_only(d: Path) -> None:
    """``d`` as on a read-only medium: nothing can be created in it, not even by root."""
    if os.geteuid() != 0:
        os.chmod(d, 0o555)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
        pytest.skip("running as root and cannot set the immutable attribute to emulate a read-only medium")


def _make_writable(d: Path) -> None:
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    os.chmod(d, 0o755)


def test_status_of_a_database_on_a_read_only_medium(tmp_path):
    from leukedge.cli.station import station_group

    ro = tmp_path / "ro"
    ro.mkdir()
    db = ro / "st.sqlite"
    _station_db_with_rows(tmp_path / "watch", db)
    for f in ro.iterdir():  # the checkpointed database alone, as copied onto a card
        if f != db:
            f.unlink()
    _make_read_only(ro)
    try:
        assert not (ro / "probe").exists()
        res = CliRunner().invoke(station_group, ["status", "--db", str(db), "--json"])
        assert res.exit_code == 0, res.output  # before: sqlite3.OperationalError: unable to open database file
        assert json.loads(res.output[res.output.index("{"):])["totals"]["ok"] == 2
        res = CliRunner().invoke(station_group, ["export", "--db", str(db), "-o", str(tmp_path / "e.csv")])
        assert res.exit_code == 0, res.output
        assert (tmp_path / "e.csv").read_text().count("\n") == 2
    finally:
        _make_writable(ro)


def test_corrupt_database_is_reported_clearly(tmp_path):
    from leukedge.cli.station import station_group

    db = tmp_path / "st.sqlite"
    db.write_bytes(b"this is not a database at all" * 100)
    (tmp_path / "st.sqlite-wal").write_bytes(b"x" * 10)
    for args in (["status", "--db", str(db)], ["export", "--db", str(db), "-o", str(tmp_path / "e.csv")]):
        line = one_clear_line(CliRunner().invoke(station_group, args))
        assert "damaged" in line and str(db) in line and "st.sqlite-wal" in line
    from leukedge.station import StationError, StationSettings
    from leukedge.station.core import ModelInfo, Station

    st = Station(StationSettings(watch_dir=tmp_path, db_path=db), _fake_predict, ModelInfo("m", "m", "h", "fake"),
                 install_signal_handlers=False)
    with pytest.raises(StationError, match="damaged"):
        st.run()


# ==================================================================================================
# 10. An unreadable file that is later fixed (chmod 644) is retried
# ==================================================================================================
def test_unreadable_file_is_retried_once_readable(tmp_path, monkeypatch):
    import leukedge.station.scanner as sc

    real = sc.file_sha256
    locked = {"on": True}

    def sha(path, *a, **k):
        if locked["on"] and str(path).endswith("c.bmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(sc, "file_sha256", sha)
    cell = synth_cell(tmp_path / "w" / "s" / "c.bmp")
    scanner = sc.Scanner(tmp_path / "w", settle_s=0.0, full_scan_s=0.0)

    def poll(n=20):
        for _ in range(n):
            ready = scanner.scan()
            if ready:
                return ready
            time.sleep(0.01)
        return []

    first = poll()
    assert len(first) == 1 and first[0].error and "Permission denied" in first[0].error
    scanner.report_done(first[0].path, first[0].sha256, first[0].size, first[0].mtime_ns)
    assert poll(5) == []  # still unreadable: not stored twice
    locked["on"] = False   # chmod 644: neither size nor mtime change
    again = poll()
    assert len(again) == 1 and again[0].error is None and again[0].sha256 == real(cell)


# ==================================================================================================
# 11. Rich markup in paths and sample ids is shown as text
# ==================================================================================================
def test_markup_in_paths_and_sample_ids_is_escaped(tiny_model, tmp_path):
    from leukedge.cli.infer import infer_cmd
    from leukedge.cli.station import station_group

    bad = tmp_path / "in" / "x[/]y.bmp"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"BM not really")
    res = CliRunner().invoke(infer_cmd, [str(bad), "-m", str(tiny_model), "--backend", "onnxruntime",
                                         "-o", str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output  # before: rich.errors.MarkupError on the error line
    assert "x[/]y.bmp" in res.output.replace("\n", "")
    watch, db = tmp_path / "watch", tmp_path / "st.sqlite"
    _station_db_with_rows(watch, db, sample="[red]", n=1)
    res = CliRunner().invoke(station_group, ["status", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "[red]" in res.output  # before: rendered blank (taken as a style)


# ==================================================================================================
# 12. User errors are one line naming the file or setting, never a traceback
# ==================================================================================================
BAD_BUNDLES = {
    "arch_kwargs_wrong_key": lambda m: {**m, "arch_kwargs": {"widht": 4}},
    "arch_kwargs_wrong_type": lambda m: {**m, "arch_kwargs": {"width": "four"}},
    "arch_kwargs_not_object": lambda m: {**m, "arch_kwargs": [4]},
    "json_list": lambda m: [m],
    "size_big": lambda m: {**m, "input_size": "big"},
    "one_class_name": lambda m: {**m, "class_names": ["hem"]},
    "unknown_arch": lambda m: {**m, "arch": "vgg99"},
    "preprocess_size_big": lambda m: {**m, "preprocess": {**m["preprocess"], "size": "big"}},
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_hand_edited_bundles_are_one_clear_line(tiny_model, tmp_path, case):
    from leukedge.cli.infer import infer_cmd

    b = tmp_path / "b"
    shutil.copytree(tiny_model, b, ignore=shutil.ignore_patterns("export"))
    meta = json.loads((b / "bundle.json").read_text())
    (b / "bundle.json").write_text(json.dumps(BAD_BUNDLES[case](meta)))
    cell = synth_cell(tmp_path / "c.bmp")
    line = one_clear_line(CliRunner().invoke(infer_cmd, [str(cell), "-m", str(b), "-o", str(tmp_path / "o.csv")]))
    assert "bundle.json" in line


@pytest.mark.parametrize("kind", ["not_onnx", "truncated"])
def test_broken_onnx_files_are_one_clear_line(tiny_model, tmp_path, kind):
    from leukedge.cli.infer import infer_cmd

    onnx_bytes = (tiny_model / "export" / "model_fp32.onnx").read_bytes()
    exp = tmp_path / "exp"
    shutil.copytree(tiny_model / "export", exp)
    data = b"PK\x03\x04 this is a zip file" * 20 if kind == "not_onnx" else onnx_bytes[: len(onnx_bytes) // 2]
    (exp / "model_fp32.onnx").write_bytes(data)
    (tmp_path / "m.onnx").write_bytes(data)
    cell = synth_cell(tmp_path / "c.bmp")
    for model in (tmp_path / "m.onnx", exp):
        line = one_clear_line(CliRunner().invoke(infer_cmd, [str(cell), "-m", str(model), "--backend", "onnxruntime",
                                                             "-o", str(tmp_path / "o.csv")]))
        assert "onnx" in line.lower()


@pytest.mark.parametrize("opt", [("--stain-io", "nan"), ("--stain-beta", "inf"), ("--stain-alpha", "nan"),
                                 ("--mean", "nan", "0.4", "0.4"), ("--std", "0.2", "inf", "0.2")])
def test_non_finite_settings_are_one_clear_line(tmp_path, opt):
    from leukedge.cli.preprocess import preprocess_cmd

    cell = synth_cell(tmp_path / "d" / "c.bmp")
    line = one_clear_line(CliRunner().invoke(preprocess_cmd, [str(cell.parent), "-o", str(tmp_path / "c"),
                                                              "--split-by", "none", *opt]))
    assert "finite" in line and opt[0] in line  # before: "expected value at line 1 column 218"


def test_preprocess_on_a_full_disk_is_one_clear_line(tmp_path, monkeypatch):
    import leukedge.preprocess as pp

    cell = synth_cell(tmp_path / "d" / "c.bmp")
    monkeypatch.setattr(pp.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    from leukedge.cli.preprocess import preprocess_cmd

    line = one_clear_line(CliRunner().invoke(preprocess_cmd, [str(cell.parent), "-o", str(tmp_path / "c"),
                                                              "--size", "64", "--split-by", "none"]))
    assert "not enough free disk space" in line and "1000" not in line
    assert not (tmp_path / "c" / ".tmp").exists()


# ==================================================================================================
# 13. Smaller issues
# ==================================================================================================
def test_csv_export_escapes_formulas():
    from leukedge.cli.station import render_export

    text = render_export([{"sample_id": "=HYPERLINK(\"http://x\")", "n_cells": 3},
                          {"sample_id": "+1", "n_cells": -1}, {"sample_id": "ok", "n_cells": 0}],
                         ("sample_id", "n_cells"), "csv")
    lines = text.splitlines()
    assert lines[1].startswith("\"'=HYPERLINK") and lines[2] == "'+1,-1" and lines[3] == "ok,0"


def test_arch_kwargs_are_allow_listed(tiny_model, tmp_path):
    from leukedge.models import BundleError, build_model, load_bundle

    b = tmp_path / "b"
    shutil.copytree(tiny_model, b, ignore=shutil.ignore_patterns("export"))
    meta = json.loads((b / "bundle.json").read_text())
    meta.update(arch="resnet18", arch_kwargs={"checkpoint_path": "/etc/passwd"})
    (b / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="checkpoint_path.*not an allowed"):
        load_bundle(b)
    with pytest.raises(ValueError, match="not an allowed"):
        build_model("resnet18", pretrained_cfg_overlay={"file": "/etc/passwd"})


def test_preprocess_resumes_after_kill_9(tmp_path):
    import leukedge.preprocess as pp
    from leukedge.preprocess import load_cache, run_preprocess

    src = tmp_path / "src"
    for i in range(12):
        synth_cell(src / ("all" if i % 2 else "hem") / f"c{i:02d}.png", seed=i, size=48)
    out = tmp_path / "cache"
    # the child computes 2 batches of 4, then is killed with SIGKILL during the third
    code = f"""
        import os, signal
        import leukedge.preprocess as pp
        from leukedge.config import PreprocessConfig
        real = pp._native()
        class Killer:
            calls = 0
            def __getattr__(self, name): return getattr(real, name)
            def Pipeline(self, config):
                pipe = real.Pipeline(config)
                class Run:
                    def run(self, *a, **k):
                        Killer.calls += 1
                        if Killer.calls == 3:
                            os.kill(os.getpid(), signal.SIGKILL)
                        return pipe.run(*a, **k)
                return Run()
        pp._native = lambda: Killer()
        pp.run_preprocess([{str(src)!r}], {str(out)!r}, PreprocessConfig(size=16), threads=1, batch_size=4, progress=False)
    """
    res = run_py(code, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert (out / ".tmp" / "images.npy").is_file()

    real = pp._native()
    calls = []

    class Recorder:
        def __getattr__(self, name):
            return getattr(real, name)

        def Pipeline(self, config):
            pipe = real.Pipeline(config)

            class Run:
                def run(self, items, *a, **k):
                    calls.append(list(items))
                    return pipe.run(items, *a, **k)

            return Run()

    pp_native = pp._native
    try:
        pp._native = lambda: Recorder()
        s = run_preprocess([src], out, PreprocessConfig(size=16), threads=1, batch_size=4, progress=False)
    finally:
        pp._native = pp_native
    assert s.n_resumed == 8 and sum(map(len, calls)) == 4  # before: all 12 recomputed
    assert not (out / ".tmp").exists()
    resumed = np.array(load_cache(out).images)
    run_preprocess([src], tmp_path / "fresh", PreprocessConfig(size=16), threads=1, batch_size=4, progress=False)
    assert np.array_equal(resumed, np.array(load_cache(tmp_path / "fresh").images))


def test_restart_is_not_refused_while_the_killed_station_is_a_zombie(tmp_path):
    from leukedge.station import db as sdb

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while sdb._is_zombie(child.pid) is False and time.monotonic() < deadline:
        time.sleep(0.02)  # not reaped: the child stays a zombie until wait()
    try:
        conn = sdb.connect(tmp_path / "st.sqlite")
        sdb.start_run(conn, watch_dir=str(tmp_path), model="m", model_id="m", preprocess_hash="h", backend="b",
                      settings={})
        conn.execute("UPDATE runs SET pid = ?", (child.pid,))
        sdb.write_heartbeat(conn, 1, state="running")
        assert sdb._is_zombie(child.pid)
        assert sdb.live_station(conn) is None  # before: refused for 5 s ("another station ... is writing")
        conn.close()
    finally:
        child.wait()
