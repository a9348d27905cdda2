"""`leukedge preprocess` and the dataset cache (docs/architecture.md section 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import leukedge.preprocess as pp
from leukedge.cli.preprocess import preprocess_cmd
from leukedge.config import PreprocessConfig, StainConfig
from leukedge.preprocess import MANIFEST_FIELDS, load_cache, load_config_source, run_preprocess
from leukedge.synth import generate_dataset

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/cnmc_sample"


@pytest.fixture
def native():
    return pytest.importorskip("leukedge._native", reason="the Rust extension leukedge._native is not built (pip install -e .)")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, subjects=6, cells_per_subject=4, seed=3, size=160)
    return root


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _invoke(*args: str):
    return CliRunner().invoke(preprocess_cmd, list(args), catch_exceptions=False)


# -- with the Rust core ---------------------------------------------------------------------
def test_cli_writes_cache_on_synthetic_cells(native, synth_root, tmp_path):
    out = tmp_path / "cache"
    res = _invoke(str(synth_root), "-o", str(out), "--size", "48", "--batch-size", "5", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["cache.json", "config.json", "images.npy", "manifest.csv"]
    assert (out / "manifest.csv").read_text().splitlines()[0] == ",".join(MANIFEST_FIELDS)

    cache = load_cache(out)
    assert cache.images.shape == (24, 48, 48, 3) and cache.images.dtype == np.uint8
    assert np.load(out / "images.npy", mmap_mode="r").shape == (24, 48, 48, 3)
    assert cache.config.layout == "nhwc" and cache.config.dtype == "uint8" and cache.config.size == 48
    assert cache.meta["pixel_hash"] == cache.config.pixel_hash() and cache.meta["synthetic"] is True and cache.synthetic
    assert len(cache.ok_indices()) == 24
    assert set(cache.labels.tolist()) == {0, 1} and all(isinstance(f, int) for f in cache.folds)
    assert set(cache.splits) == {"train", "val"}  # three official folds -> the last one validates
    assert {cache.manifest[i]["fold"] for i in cache.indices("val")} == {2}
    assert all(isinstance(r["stain_fallback"], bool) for r in cache.manifest)
    # Every row equals the Rust core's own output for that file (the memmap slices were written correctly).
    ref, st = native.preprocess_batch(cache.paths, cache.config.to_native_json())
    assert all(s["ok"] for s in st)
    assert np.array_equal(np.asarray(cache.images), ref)
    assert all(cache.images[i].any() for i in range(24))


def test_real_sample(native, tmp_path):
    if not (SAMPLE / "C-NMC_Leukemia").is_dir():
        pytest.skip(f"real C-NMC sample not found at {SAMPLE}")
    s = run_preprocess([SAMPLE], tmp_path / "c", PreprocessConfig(size=32), threads=1, progress=False)
    assert (s.n_total, s.n_ok, s.n_failed, s.synthetic) == (52, 52, 0, False)
    cache = load_cache(tmp_path / "c")
    assert cache.meta["synthetic"] is False
    assert int(cache.labels.sum()) == 26 and "H3" in cache.subjects
    val_subjects = {cache.subjects[i] for i in cache.indices("val")}
    train_subjects = {cache.subjects[i] for i in cache.indices("train")}
    assert val_subjects and not val_subjects & train_subjects


def test_rerun_reuses_rows(native, synth_root, tmp_path):
    src = _copy_tree(synth_root, tmp_path / "src")
    out = tmp_path / "cache"
    first = run_preprocess([src], out, PreprocessConfig(size=40), threads=1, progress=False)
    before = np.array(load_cache(out).images)
    assert first.n_reused == 0 and first.n_computed == 24

    res = _invoke(str(src), "-o", str(out), "--size", "40", "--threads", "1", "--stain", "macenko")  # = PreprocessConfig()
    assert res.exit_code == 0, res.output
    assert "reused" in res.output
    again = run_preprocess([src], out, PreprocessConfig(size=40), threads=1, progress=False)
    assert again.n_reused == 24 and again.n_computed == 0
    assert np.array_equal(np.array(load_cache(out).images), before)

    # One changed file is recomputed; the rest reused.
    changed = sorted(src.rglob("*.bmp"))[3]
    raw = bytearray(changed.read_bytes())
    mid = 54 + (len(raw) - 54) // 2  # a pixel byte in the middle of the cell
    raw[mid] = (raw[mid] + 40) % 256
    changed.write_bytes(bytes(raw))
    third = run_preprocess([src], out, PreprocessConfig(size=40), threads=1, progress=False)
    assert third.n_reused == 23 and third.n_computed == 1
    # Other pixel settings: nothing is reused.
    fourth = run_preprocess([src], out, PreprocessConfig(size=40, crop="none"), threads=1, progress=False)
    assert fourth.n_reused == 0 and fourth.n_computed == 24
    assert not (out / ".tmp").exists()


def test_corrupt_file_fails_run_unless_allowed(native, synth_root, tmp_path):
    src = _copy_tree(synth_root, tmp_path / "src")
    bad = src / "C-NMC_Leukemia/training_data/fold_0/all/UID_99_1_1_all.bmp"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"BM this is not a bitmap at all")
    out = tmp_path / "cache"
    res = _invoke(str(src), "-o", str(out), "--size", "32", "--threads", "1")
    assert res.exit_code == 1
    assert "1 file(s) failed" in res.output and "UID_99_1_1_all.bmp" in res.output
    cache = load_cache(out)
    row = next(r for r in cache.manifest if r["path"].endswith("UID_99_1_1_all.bmp"))
    assert row["status"] == "error" and row["error"]
    assert not cache.images[row["index"]].any()
    assert row["index"] not in cache.ok_indices() and len(cache.ok_indices()) == 24

    res = _invoke(str(src), "-o", str(out), "--size", "32", "--threads", "1", "--allow-errors")
    assert res.exit_code == 0, res.output
    assert "24" in res.output  # the good files were reused


def test_config_file_is_used_exactly(native, synth_root, tmp_path):
    cfg = PreprocessConfig(size=36, stain=StainConfig(method="reinhard"), filter="box")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"format": 1, "preprocess": cfg.to_dict(), "preprocess_hash": cfg.pixel_hash()}))
    out = tmp_path / "c"
    res = _invoke(str(synth_root), "-o", str(out), "--config", str(bundle / "bundle.json"), "--threads", "1")
    assert res.exit_code == 0, res.output
    got = load_cache(out).config
    assert got.pixel_hash() == cfg.pixel_hash() and got.size == 36
    res = CliRunner().invoke(preprocess_cmd, [str(synth_root), "-o", str(out), "--config", str(bundle), "--size", "64"])
    assert res.exit_code == 2 and "--size" in res.output and "--config" in res.output


def test_stain_reference_is_fitted(native, synth_root, tmp_path):
    refs = sorted(synth_root.rglob("*.bmp"))[:3]
    out = tmp_path / "c"
    res = _invoke(str(synth_root), "-o", str(out), "--size", "32", "--stain", "macenko", "--threads", "1",
                  *sum((["--stain-reference", str(r)] for r in refs), []))
    assert res.exit_code == 0, res.output
    cfg = load_cache(out).config
    assert cfg.stain.method == "macenko" and cfg.stain.params
    assert cfg.pixel_hash() != PreprocessConfig(size=32).pixel_hash()


# -- orchestration (no Rust needed: a recording stand-in for the batch call) -----------------
class _FakeNative:
    """Records calls; fills each row with a value derived from its position; can be interrupted."""

    def __init__(self, interrupt_on_call: int | None = None):
        self.calls: list[list[str]] = []
        self.interrupt_on_call = interrupt_on_call

    def Pipeline(self, config_json):
        fake = self

        class _Pipeline:
            def run(self, items, out=None, threads=0):
                return fake.preprocess_batch(items, config_json, out=out, threads=threads)

        return _Pipeline()

    def preprocess_batch(self, items, config_json, out=None, threads=0):
        self.calls.append(list(items))
        if self.interrupt_on_call is not None and len(self.calls) == self.interrupt_on_call:
            raise KeyboardInterrupt
        size = json.loads(config_json)["size"]
        assert out is not None and out.shape == (len(items), size, size, 3) and out.dtype == np.uint8
        st = []
        for i, it in enumerate(items):
            ok = not it.endswith("broken.png")
            out[i] = (sum(Path(it).read_bytes()[-64:]) % 250 + 1) if ok else 0
            st.append({"index": i, "source": it, "ok": ok, "error": None if ok else "DecodeError: broken", "stain_fallback": i == 0})
        return out, st


def test_interrupted_run_never_leaves_a_complete_looking_cache(synth_root, tmp_path, monkeypatch):
    out = tmp_path / "c"
    monkeypatch.setattr(pp, "_native", lambda: _FakeNative(interrupt_on_call=2))
    with pytest.raises(KeyboardInterrupt):
        run_preprocess([synth_root], out, PreprocessConfig(size=16), batch_size=5, progress=False)
    with pytest.raises(FileNotFoundError, match="not a complete dataset cache"):
        load_cache(out)
    assert not (out / ".tmp").exists()

    fake = _FakeNative()
    monkeypatch.setattr(pp, "_native", lambda: fake)
    s = run_preprocess([synth_root], out, PreprocessConfig(size=16), batch_size=5, progress=False)
    assert s.n_ok == 24 and len(fake.calls) == 5 and not (out / ".tmp").exists()
    good = np.array(load_cache(out).images)

    # An interrupted re-run with other settings keeps the previous complete cache intact.
    monkeypatch.setattr(pp, "_native", lambda: _FakeNative(interrupt_on_call=1))
    with pytest.raises(KeyboardInterrupt):
        run_preprocess([synth_root], out, PreprocessConfig(size=20), batch_size=5, progress=False)
    cache = load_cache(out)
    assert cache.config.size == 16 and np.array_equal(np.array(cache.images), good)


def test_reuse_only_sends_changed_files(synth_root, tmp_path, monkeypatch):
    src = _copy_tree(synth_root, tmp_path / "src")
    out = tmp_path / "c"
    fake = _FakeNative()
    monkeypatch.setattr(pp, "_native", lambda: fake)
    run_preprocess([src], out, PreprocessConfig(size=16), batch_size=7, progress=False)
    first = np.array(load_cache(out).images)
    first_fallback = [m["stain_fallback"] for m in load_cache(out).manifest]
    assert any(first_fallback) and not all(first_fallback)
    fake.calls.clear()
    changed = sorted(src.rglob("*.bmp"))[9]
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x01")
    s = run_preprocess([src], out, PreprocessConfig(size=16), batch_size=7, progress=False)
    assert [Path(p).name for call in fake.calls for p in call] == [changed.name]
    assert s.n_reused == 23 and s.n_computed == 1
    cache = load_cache(out)
    idx = cache.paths.index(str(changed.resolve()))
    assert np.array_equal(np.delete(np.array(cache.images), idx, 0), np.delete(first, idx, 0))
    # stain_fallback flags travel with reused rows
    assert [r["stain_fallback"] for r in cache.manifest if r["index"] != idx] == [f for i, f in enumerate(first_fallback) if i != idx]


def test_split_options_and_failures_in_manifest(tmp_path, monkeypatch):
    from leukedge.synth import make_cell, write_png

    for s in range(8):
        for c in range(2):
            lab = s % 2
            cls = ("hem", "all")[lab]
            subj = f"H{s}" if lab == 0 else str(s)
            (tmp_path / "d" / cls).mkdir(parents=True, exist_ok=True)
            write_png(tmp_path / "d" / cls / f"UID_{subj}_1_{c + 1}_{cls}.png", make_cell(lab, seed=s * 10 + c, size=32))
    (tmp_path / "d/all/broken.png").write_bytes(b"\x89PNG nope")
    monkeypatch.setattr(pp, "_native", lambda: _FakeNative())
    s = run_preprocess([tmp_path / "d"], tmp_path / "c", PreprocessConfig(size=16), split_by="subject", val_fraction=0.25,
                       seed=1, progress=False)
    assert s.n_failed == 1 and s.failures[0][0].endswith("broken.png") and "broken" in s.failures[0][1]
    cache = load_cache(tmp_path / "c")
    tr = {cache.subjects[i] for i in cache.indices("train")}
    va = {cache.subjects[i] for i in cache.indices("val")}
    assert tr and va and not tr & va
    assert cache.meta["synthetic"] is False  # generated with make_cell but not marked: only the marker counts
    with pytest.warns(UserWarning, match="image-level"):
        run_preprocess([tmp_path / "d"], tmp_path / "c2", PreprocessConfig(size=16), split_by="image", progress=False)


def test_load_config_source(tmp_path):
    cfg = PreprocessConfig(size=100, crop="none")
    cfg.save(tmp_path / "config.json")
    assert load_config_source(tmp_path / "config.json") == cfg
    assert load_config_source(tmp_path) == cfg
    b = tmp_path / "b"
    b.mkdir()
    (b / "bundle.json").write_text(json.dumps({"arch": "x", "preprocess": cfg.to_dict()}))
    assert load_config_source(b) == cfg and load_config_source(b / "bundle.json") == cfg
    (tmp_path / "bad.json").write_text(json.dumps({"size": 100, "colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        load_config_source(tmp_path / "bad.json")


def test_load_cache_refuses_inconsistent_cache(synth_root, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "_native", lambda: _FakeNative())
    run_preprocess([synth_root], tmp_path / "c", PreprocessConfig(size=16), progress=False)
    cfg = json.loads((tmp_path / "c/config.json").read_text())
    cfg["crop_margin"] = 3
    (tmp_path / "c/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pixel_hash"):
        load_cache(tmp_path / "c")


def test_invalid_stain_params_are_a_clear_error(native, synth_root, tmp_path):
    params = {"method": "reinhard", "mean": [1, 2, 3], "std": [1, 1, 1]}
    # the Rust core validates every PreprocessConfig: such a config cannot even be built
    with pytest.raises(ValueError, match="fitted for method Reinhard"):
        PreprocessConfig(size=16, stain=StainConfig(method="macenko", params=params))
    d = PreprocessConfig(size=16).to_dict()
    d["stain"]["params"] = params
    (tmp_path / "bad.json").write_text(json.dumps(d))
    res = CliRunner().invoke(preprocess_cmd, [str(synth_root), "-o", str(tmp_path / "c"), "--config", str(tmp_path / "bad.json")])
    assert res.exit_code == 1 and "not a valid preprocessing config" in res.output and "reinhard" in res.output.lower()
    assert not (tmp_path / "c" / "cache.json").exists() and not (tmp_path / "c" / ".tmp").exists()
