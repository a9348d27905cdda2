"""Batched, pipelined inference: equality with a sequential run, bad files, outputs, statistics."""

from __future__ import annotations

import csv
import json
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from leukedge.cli.infer import infer_cmd  # noqa: E402
from leukedge.config import PreprocessConfig, normalize_uint8  # noqa: E402
from leukedge.infer import Predictor, run_inference, stats_path_for  # noqa: E402

SIZE = 48
SAMPLE = Path(__file__).parents[1].parent / "shared/data/cnmc_sample"


def _has_native() -> bool:
    try:
        import leukedge._native  # noqa: F401

        return True
    except ImportError:
        return False


HAS_NATIVE = _has_native()


def fake_preprocess(items, config_json, out=None, threads=0):
    """Deterministic stand-in for the Rust core (same contract): pixels derived from the file bytes,
    non-PNG files fail. Random sleeps shake up the thread interleaving."""
    cfg = PreprocessConfig.from_json(config_json)
    n = len(items)
    if out is None:
        out = np.zeros((n, 3, cfg.size, cfg.size), dtype=cfg.dtype)
    assert out.shape == (n, 3, cfg.size, cfg.size) and out.dtype == np.dtype(cfg.dtype) and out.flags.c_contiguous
    statuses = []
    for i, item in enumerate(items):
        data = Path(item).read_bytes() if Path(item).is_file() else b""
        if not (data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")):
            out[i] = 0
            statuses.append({"index": i, "source": str(item), "ok": False, "error": f"{item}: not a PNG", "stain_fallback": False})
            continue
        rng = np.random.default_rng(zlib.crc32(data))
        u8 = rng.integers(0, 256, (1, cfg.size, cfg.size, 3), dtype=np.uint8)
        out[i] = normalize_uint8(u8, cfg, dtype=cfg.dtype)[0]
        statuses.append({"index": i, "source": str(item), "ok": True, "error": None, "stain_fallback": False})
    time.sleep(float(np.random.default_rng().uniform(0, 0.01)))
    return out, statuses


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))  # works with any pytest import mode
    from test_export import make_bundle

    from leukedge.export import export_bundle

    d = tmp_path_factory.mktemp("inf")
    bundle = make_bundle(d / "bundle", size=SIZE)
    export_bundle(bundle, d / "export", fp16=True, check=False)
    return bundle, d / "export"


@pytest.fixture(scope="module")
def cells(infer_cells):
    return infer_cells


def _prep_fns():
    fns = [pytest.param(fake_preprocess, id="fake-core")]
    fns.append(pytest.param(None, id="rust-core", marks=pytest.mark.skipif(not HAS_NATIVE, reason="leukedge._native not built")))
    return fns


@pytest.mark.parametrize("prep", _prep_fns())
def test_pipelined_equals_sequential(model_dirs, cells, tmp_path, prep):
    _, exp = model_dirs
    runs = {}
    for pipeline in (False, True):
        out = tmp_path / f"r_{pipeline}.csv"
        res = run_inference(exp, [cells], out, batch=4, backend="onnxruntime", pipeline=pipeline, warmup=1,
                            preprocess_fn=prep)
        runs[pipeline] = res
        assert res.stats["pipeline"] is pipeline
        assert out.is_file() and stats_path_for(out).is_file()
    a, b = runs[False].results, runs[True].results
    assert [r.path for r in a] == [r.path for r in b]
    assert [r.status for r in a] == [r.status for r in b]
    pa = np.array([r.probability if r.probability is not None else -1 for r in a])
    pb = np.array([r.probability if r.probability is not None else -1 for r in b])
    np.testing.assert_array_equal(pa, pb)
    assert (tmp_path / "r_False.csv").read_text() == (tmp_path / "r_True.csv").read_text()
    # and identical to classifying each file on its own
    pred = Predictor(exp, backend="onnxruntime", batch=1, pipeline=False, preprocess_fn=prep)
    single = pred.predict([r.path for r in a])
    np.testing.assert_allclose(
        [r.probability if r.probability is not None else -1 for r in single], pa, rtol=0, atol=2e-6)


@pytest.mark.parametrize("prep", _prep_fns())
def test_bad_files_reported_rest_completes(model_dirs, cells, tmp_path, prep):
    _, exp = model_dirs
    out = tmp_path / "res.jsonl"
    res = run_inference(exp, [cells], out, batch=8, backend="onnxruntime", preprocess_fn=prep)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 26 and res.n_ok == 23 and res.n_error == 3
    bad = [r for r in rows if r["status"] == "error"]
    assert {Path(r["path"]).name for r in bad} == {"UID_1_90_1_all.png", "UID_2_91_1_all.png", "UID_3_92_1_all.bmp"}
    assert all(r["error"] and r["probability"] is None and r["label"] is None for r in bad)
    good = [r for r in rows if r["status"] == "ok"]
    assert all(0.0 <= r["probability"] <= 1.0 and r["label"] in ("hem", "all") for r in good)
    assert all(r["subject"] in ("1", "2", "3") and r["true_label"] == "all" for r in rows)
    # bad files sit in the middle of a batch: their neighbours equal a run without them
    goods = [r["path"] for r in good]
    clean = Predictor(exp, backend="onnxruntime", batch=8, preprocess_fn=prep).predict(goods)
    np.testing.assert_allclose([r.probability for r in clean], [r["probability"] for r in good], atol=2e-6)


def test_stats_and_csv(model_dirs, cells, tmp_path):
    _, exp = model_dirs
    out = tmp_path / "res.csv"
    res = run_inference(exp, [cells], out, batch=8, backend="onnxruntime", preprocess_fn=fake_preprocess, limit=20)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and list(rows[0]) == ["path", "probability", "label", "status", "error", "subject",
                                                 "true_label", "stain_fallback", "reason", "ood_score", "path_bytes",
                                                 "note"]
    st = json.loads(stats_path_for(out).read_text())
    assert st["n_files"] == 20 and st["n_batches"] == 3 and st["batch"] == 8
    for k in ("preprocess", "compute", "end_to_end"):
        s = st["latency_ms"][k]
        assert s["n"] == 3 and s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
    assert st["throughput_img_s"] > 0 and st["preprocess_hash"] == res.stats["preprocess_hash"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_worker_error_propagates(model_dirs, cells, tmp_path):
    _, exp = model_dirs
    calls = []

    def broken(items, config_json, out=None, threads=0):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise RuntimeError("core exploded")
        return fake_preprocess(items, config_json, out=out, threads=threads)

    with pytest.raises(RuntimeError, match="core exploded"):
        run_inference(exp, [cells], tmp_path / "x.csv", batch=4, backend="onnxruntime", preprocess_fn=broken)
    assert "leukedge-preprocess" in calls
    assert not (tmp_path / "x.csv").exists()


def test_torch_and_fp16_backends_agree(model_dirs, cells):
    bundle, exp = model_dirs
    files = sorted(str(p) for p in (cells / "all").glob("UID_*_1_all.png") if p.stat().st_size > 100)[:10]
    ref = Predictor(bundle, backend="torch", device="cpu", preprocess_fn=fake_preprocess).predict(files)
    ort32 = Predictor(exp, backend="onnxruntime", precision="fp32", preprocess_fn=fake_preprocess).predict(files)
    ort16 = Predictor(exp, backend="onnxruntime", precision="fp16", preprocess_fn=fake_preprocess)
    assert ort16.config.dtype == "float16"  # the core writes FP16 directly for an FP16-input graph
    r16 = ort16.predict(files)
    p = np.array([r.probability for r in ref])
    np.testing.assert_allclose([r.probability for r in ort32], p, atol=1e-5)
    np.testing.assert_allclose([r.probability for r in r16], p, atol=0.02)


@pytest.mark.skipif(not HAS_NATIVE, reason="leukedge._native not built")
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="real sample cells (../shared/data/cnmc_sample) not present")
def test_cli_on_real_sample_cells(model_dirs, tmp_path):
    _, exp = model_dirs
    out = tmp_path / "real.csv"
    r = CliRunner().invoke(infer_cmd, [str(SAMPLE), "--model", str(exp), "-o", str(out), "--batch", "16",
                                       "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 50 and all(row["status"] == "ok" for row in rows)
    assert {row["true_label"] for row in rows} == {"all", "hem"}
    assert "end to end" in r.output and "p99" in r.output


def test_cli_errors(model_dirs, tmp_path):
    _, exp = model_dirs
    r = CliRunner().invoke(infer_cmd, [str(tmp_path / "nothing_here"), "--model", str(exp), "-o", str(tmp_path / "o.csv")])
    assert r.exit_code != 0 and "nothing_here" in r.output
    (tmp_path / "c").mkdir()
    r = CliRunner().invoke(infer_cmd, [str(tmp_path / "c"), "--model", str(exp), "-o", str(tmp_path / "o.txt")])
    assert r.exit_code != 0


# --------------------------------------------------------------------------------------------
# core partitioning between Rust preprocessing and a CPU backend
def test_plan_threads_rule():
    from leukedge.engines import plan_threads

    # under one core's worth of preprocessing: both stages share every core, still pipelined
    p = plan_threads(backend_on_cpu=True, pipeline=True, cores=2)
    assert (p.preprocess, p.backend, p.partitioned, p.pipeline) == (2, 2, False, True)
    p = plan_threads(backend_on_cpu=True, pipeline=True, cores=4)
    assert (p.preprocess, p.backend, p.partitioned) == (1, 3, True)
    p = plan_threads(backend_on_cpu=True, pipeline=True, cores=8)
    assert (p.preprocess, p.backend, p.partitioned) == (2, 6, True)
    p = plan_threads(backend_on_cpu=True, pipeline=True, cores=64)
    assert p.preprocess + p.backend == 64 and p.preprocess >= 1 and p.backend >= 1
    p = plan_threads(backend_on_cpu=True, pipeline=True, cores=8, preprocess=3)
    assert (p.preprocess, p.backend, p.partitioned) == (3, 5, True)
    p = plan_threads(backend_on_cpu=True, pipeline=True, cores=8, backend=7)
    assert (p.preprocess, p.backend) == (1, 7)
    p = plan_threads(backend_on_cpu=True, pipeline=True, cores=2, preprocess=2)  # asked for: oversubscribed
    assert (p.preprocess, p.backend, p.partitioned) == (2, 1, False)
    p = plan_threads(backend_on_cpu=True, pipeline=True, cores=1)
    assert (p.preprocess, p.backend, p.partitioned) == (1, 1, False)
    p = plan_threads(backend_on_cpu=True, pipeline=False, cores=8)  # stages take turns: all cores each
    assert (p.preprocess, p.backend, p.partitioned) == (8, 8, False)
    p = plan_threads(backend_on_cpu=False, pipeline=True, cores=8)  # GPU: preprocessing keeps every core
    assert (p.preprocess, p.backend, p.partitioned) == (8, 0, False)
    with pytest.raises(ValueError):
        plan_threads(backend_on_cpu=True, preprocess=-1)


@pytest.mark.parametrize("prep", _prep_fns())
def test_partition_applied_and_outputs_unchanged(model_dirs, cells, tmp_path, monkeypatch, prep):
    """4 usable cores, ONNX Runtime on the CPU, pipelined: the Rust core is called with exactly its share,
    the session with the rest and no spinning; the stats say so; results equal the sequential run."""
    import leukedge.engines.threads as base
    from leukedge.infer import native_preprocess

    _, exp = model_dirs
    monkeypatch.setattr(base, "usable_cores", lambda: 4)
    inner = prep or native_preprocess()
    seen: list[int] = []

    def recording(items, config_json, out=None, threads=0):
        seen.append(threads)
        return inner(items, config_json, out=out, threads=threads)

    pred = Predictor(exp, backend="onnxruntime", device="cpu", batch=4, pipeline=True, preprocess_fn=recording)
    try:
        assert (pred.threads.preprocess, pred.threads.backend, pred.threads.partitioned) == (1, 3, True)
        cfg = pred.backend.session_config()
        assert cfg["intra_op_num_threads"] == "3" and cfg["session.intra_op.allow_spinning"] == "0"
        out = tmp_path / "part.csv"
        res = run_inference(None, [cells], out, predictor=pred, warmup=1)
    finally:
        pred.close()
    assert seen and set(seen) == {1}
    st = json.loads(stats_path_for(out).read_text())["threads"]
    assert st["preprocess"] == 1 and st["backend"] == 3 and st["partitioned"] is True and st["cores"] == 4
    assert res.stats["threads"] == st

    seen.clear()
    seq_out = tmp_path / "seq.csv"
    seq = run_inference(exp, [cells], seq_out, batch=4, backend="onnxruntime", device="cpu", pipeline=False,
                        warmup=0, preprocess_fn=recording)
    assert set(seen) == {4}
    assert seq.stats["threads"]["partitioned"] is False and seq.stats["threads"]["backend"] == 4
    assert out.read_text() == seq_out.read_text()


def test_explicit_threads_and_torch_backend(model_dirs, cells, tmp_path, monkeypatch):
    import torch

    import leukedge.engines.threads as base

    bundle, _ = model_dirs
    monkeypatch.setattr(base, "usable_cores", lambda: 4)
    before = torch.get_num_threads()
    seen: list[int] = []
    during: list[int] = []

    def recording(items, config_json, out=None, threads=0):
        seen.append(threads)
        return fake_preprocess(items, config_json, out=out, threads=threads)

    pred = Predictor(bundle, backend="torch", device="cpu", batch=4, threads=2, preprocess_fn=recording)
    orig_infer = pred.backend.infer
    pred.backend.infer = lambda x: (during.append(torch.get_num_threads()), orig_infer(x))[1]
    try:
        assert (pred.threads.preprocess, pred.threads.backend) == (2, 2)
        res = run_inference(None, [cells], tmp_path / "t.csv", predictor=pred, warmup=0)
    finally:
        pred.close()
    assert set(seen) == {2} and set(during) == {2}
    assert res.stats["threads"]["backend"] == 2 and res.stats["threads"]["preprocess"] == 2
    assert torch.get_num_threads() == before  # restored on close


def test_cli_backend_threads(model_dirs, cells, tmp_path):
    _, exp = model_dirs
    out = tmp_path / "cli.csv"
    r = CliRunner().invoke(infer_cmd, [str(cells), "--model", str(exp), "-o", str(out), "--batch", "8",
                                       "--backend", "onnxruntime", "--device", "cpu", "--threads", "1",
                                       "--backend-threads", "1"])
    assert r.exit_code == 0, r.output
    st = json.loads(stats_path_for(out).read_text())["threads"]
    assert st["preprocess"] == 1 and st["backend"] == 1 and "threads: preprocess 1, backend 1" in r.output
    assert "--backend-threads" in CliRunner().invoke(infer_cmd, ["--help"]).output


def test_batch_one_runs_inline_without_a_worker_thread(model_dirs, cells, monkeypatch):
    """Below PIPELINE_MIN_BATCH the batches run on the calling thread (no hand-off to the preprocessing worker,
    no wait behind the previous batch), with the thread plan of a sequential run; results equal the pipeline's."""
    import threading

    from leukedge.infer import PIPELINE_MIN_BATCH, pipelined

    assert PIPELINE_MIN_BATCH == 2 and not pipelined(True, 1) and pipelined(True, 2) and not pipelined(False, 8)
    _, exp = model_dirs
    piped = run_inference(exp, [cells], None, batch=2, backend="onnxruntime", device="cpu", pipeline=True, warmup=0)
    started: list[str] = []
    real_start = threading.Thread.start

    def spy(self):
        started.append(self.name)
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", spy)
    res = run_inference(exp, [cells], None, batch=1, backend="onnxruntime", device="cpu", pipeline=True, warmup=0)
    assert "leukedge-preprocess" not in started
    assert res.stats["pipeline"] is False and res.stats["pipeline_requested"] is True
    assert res.stats["threads"]["pipeline"] is False
    assert res.stats["n_batches"] == len(res.results) > 1
    assert [r.path for r in res.results] == [r.path for r in piped.results]
    np.testing.assert_allclose([r.probability or -1 for r in res.results], [r.probability or -1 for r in piped.results],
                               rtol=0, atol=2e-6)
