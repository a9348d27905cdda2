"""leukedge._native.preprocess_batch: contract of docs/architecture.md section 2."""

from __future__ import annotations

import io
import json
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cell, make_tissue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from leukedge.config import PreprocessConfig, StainConfig, normalize_uint8

pytestmark = pytest.mark.timeout(300)

STATUS_KEYS = {"index", "source", "ok", "error", "stain_fallback", "stain_reason", "rejected", "note"}


def small_cfg(**kw) -> PreprocessConfig:
    base = dict(size=32, stain=StainConfig(min_foreground=50))
    base.update(kw)
    return PreprocessConfig(**base)


def run(native, items, cfg: PreprocessConfig, **kw):
    return native.preprocess_batch(items, cfg.to_native_json(), **kw)


def bmp_header(width: int, height: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 70, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0) + b"\0" * 16)


# -- output formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_output_equals_normalize_uint8(native, layout, dtype):
    imgs = [make_cell(80, 64, seed=s) for s in range(3)]
    u8, st_u8 = run(native, imgs, small_cfg(layout="nhwc", dtype="uint8"))
    assert u8.shape == (3, 32, 32, 3) and u8.dtype == np.uint8
    cfg = small_cfg(layout=layout, dtype=dtype, mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3))
    x, st = run(native, imgs, cfg)
    assert x.dtype == np.dtype(dtype) and x.flags.c_contiguous
    want = normalize_uint8(u8, cfg, layout=layout, dtype=dtype)
    assert x.shape == want.shape
    np.testing.assert_array_equal(x, want)  # bit-exact, float32 and float16
    assert [s["ok"] for s in st] == [True] * 3


def test_uint8_nchw_is_transposed_nhwc(native):
    imgs = [make_cell(70, seed=1)]
    a, _ = run(native, imgs, small_cfg(layout="nhwc", dtype="uint8"))
    b, _ = run(native, imgs, small_cfg(layout="nchw", dtype="uint8"))
    np.testing.assert_array_equal(a.transpose(0, 3, 1, 2), b)


def test_pipeline_matches_composition_of_single_functions(native):
    """crop=none, square image: batch == decode -> normalize_stain -> resize."""
    img = make_cell(90, seed=2)
    cfg = small_cfg(crop="none", layout="nhwc", dtype="uint8", filter="bilinear")
    out, _ = run(native, [img], cfg)
    stained, _ = native.normalize_stain(img, cfg.to_native_json())
    np.testing.assert_array_equal(out[0], native.resize(stained, 32, 32, "bilinear"))


def test_bbox_crop_pad_and_crop_modes(native):
    big = np.zeros((200, 300, 3), np.uint8)
    big[90:110, 130:170] = (180, 90, 200)  # 40 x 20 flat "cell"
    none = small_cfg(stain=StainConfig(method="none"), layout="nhwc", dtype="uint8", filter="nearest", crop_margin=0)
    # crop=none: the small cell stays small
    a, _ = run(native, [big], none.replace(crop="none", square="pad"))
    assert (a[0].max(axis=-1) == 0).mean() > 0.9
    # bbox + square=crop: the frame is filled with cell colour
    b, _ = run(native, [big], none.replace(square="crop"))
    assert (b[0] == (180, 90, 200)).all()
    # bbox + pad: centred band, black above and below
    c, _ = run(native, [big], none.replace(square="pad"))
    assert (c[0, :7] == 0).all() and (c[0, -7:] == 0).all() and (c[0, 10:22] == (180, 90, 200)).all()
    # no foreground at all: whole image is used, no error
    d, st = run(native, [np.zeros((50, 70, 3), np.uint8)], none)
    assert st[0]["ok"] and not d.any()


# -- items and statuses --------------------------------------------------------------------------
def test_paths_pathlike_bytes_and_arrays_agree(native, tmp_path):
    img = make_cell(64, 80, seed=3)
    p = tmp_path / "cell.png"
    Image.fromarray(img).save(p)
    cfg = small_cfg()
    out, st = run(native, [str(p), p, p.read_bytes(), img], cfg)
    for i in range(1, 4):
        np.testing.assert_array_equal(out[i], out[0])
    assert all(set(s) == STATUS_KEYS for s in st)
    assert [s["index"] for s in st] == [0, 1, 2, 3]
    assert st[0]["source"] == str(p) and st[1]["source"] == str(p)
    assert st[2]["source"].startswith("<bytes") and st[3]["source"].startswith("<array")
    assert all(s["ok"] and s["error"] is None and s["stain_fallback"] is False for s in st)


def test_real_sample_batch_equals_single(native, sample_cells):
    paths = sample_cells[:8]
    cfg = PreprocessConfig(dtype="float16")
    out, st = native.preprocess_batch([str(p) for p in paths], cfg.to_native_json(), threads=2)
    assert out.shape == (8, 3, 224, 224) and all(s["ok"] for s in st)
    assert np.isfinite(out.astype(np.float32)).all()
    for i in (0, 5):
        one, _ = native.preprocess_batch([native.decode(paths[i])], cfg.to_native_json())
        np.testing.assert_array_equal(one[0], out[i])


def test_stain_fallback_is_reported(native):
    tiny = make_cell(20, seed=1)  # < 500 foreground pixels
    _, st = run(native, [tiny, make_cell(96, seed=1)], small_cfg(stain=StainConfig()))
    assert [s["stain_fallback"] for s in st] == [True, False]
    assert all(s["ok"] for s in st)


def _bad_corpus(tmp_path: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (path, should_succeed)."""
    good = make_cell(120, 100, seed=7)
    files: dict[str, tuple[Path, bool]] = {}

    def put(name, data, ok):
        p = tmp_path / name
        p.write_bytes(data)
        files[name] = (p, ok)

    buf = io.BytesIO()
    Image.fromarray(good).save(buf, "BMP")
    bmp = buf.getvalue()
    put("good.bmp", bmp, True)
    put("zero.bmp", b"", False)
    put("truncated.bmp", bmp[: len(bmp) // 3], False)
    put("text.bmp", b"just some text, renamed to .bmp\n" * 4, False)
    put("bomb.bmp", bmp_header(100_000, 100_000), False)
    put("bomb2.bmp", bmp_header(20_000, 20_000), False)
    one = io.BytesIO()
    Image.fromarray(np.array([[[200, 10, 90]]], np.uint8)).save(one, "BMP")
    put("one_pixel.bmp", one.getvalue(), True)
    for name, im in {
        "grey.png": Image.fromarray(good[..., 1].copy()),
        "rgba.png": Image.fromarray(np.concatenate([good, np.full(good.shape[:2] + (1,), 128, np.uint8)], -1)),
        "sixteen.png": Image.fromarray((good[..., 0].astype(np.uint16) * 257)),
    }.items():
        b = io.BytesIO()
        im.save(b, "PNG")
        put(name, b.getvalue(), True)
    files["missing.bmp"] = (tmp_path / "missing.bmp", False)
    return files


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_bad_inputs_are_isolated(native, tmp_path, dtype):
    files = _bad_corpus(tmp_path)
    names = list(files)
    cfg = small_cfg(dtype=dtype, max_pixels=100_000_000)
    out, st = run(native, [str(files[n][0]) for n in names], cfg, threads=2)
    for i, n in enumerate(names):
        path, should = files[n]
        assert st[i]["ok"] is should, (n, st[i])
        if should:
            alone, st1 = run(native, [str(path)], cfg, threads=1)
            assert st1[0]["ok"]
            np.testing.assert_array_equal(out[i], alone[0], err_msg=n)
        else:
            assert n in st[i]["error"], st[i]["error"]
            assert not out[i].any(), f"{n} not zero-filled"
    err = {n: st[i]["error"] for i, n in enumerate(names)}
    assert "zero-byte" in err["zero.bmp"]
    assert "truncated" in err["truncated.bmp"]
    assert "not an image" in err["text.bmp"]
    assert "too large" in err["bomb.bmp"] and "too large" in err["bomb2.bmp"]
    assert "no such file" in err["missing.bmp"]


def test_zero_fill_overwrites_reused_buffer(native, tmp_path):
    (tmp_path / "bad.bmp").write_bytes(b"")
    cfg = small_cfg(dtype="float32")
    buf = np.full((2, 3, 32, 32), 7.0, np.float32)
    out, st = run(native, [str(tmp_path / "bad.bmp"), make_cell(64, seed=1)], cfg, out=buf)
    assert out is buf
    assert not buf[0].any() and st[1]["ok"] and (buf[1] != 7.0).all()


# -- out= and threads ----------------------------------------------------------------------------
def test_out_buffer_reuse(native):
    imgs = [make_cell(64, seed=s) for s in range(4)]
    cfg = small_cfg(dtype="float16")
    ref, _ = run(native, imgs, cfg)
    buf = np.empty((4, 3, 32, 32), np.float16)
    for _ in range(2):
        res, _ = run(native, imgs, cfg, out=buf)
        assert res is buf
        np.testing.assert_array_equal(buf, ref)


def test_out_buffer_validation(native):
    imgs = [make_cell(40, seed=1)] * 2
    cfg = small_cfg(dtype="float32", layout="nchw")
    with pytest.raises(ValueError, match="shape"):
        run(native, imgs, cfg, out=np.empty((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        run(native, imgs, cfg, out=np.empty((3, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        run(native, imgs, cfg, out=np.empty((2, 3, 32, 32), np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        run(native, imgs, cfg, out=np.empty((2, 3, 32, 64), np.float32)[..., ::2])
    ro = np.empty((2, 3, 32, 32), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        run(native, imgs, cfg, out=ro)
    with pytest.raises(TypeError):
        run(native, imgs, cfg, out=[1, 2, 3])


def test_threads_do_not_change_results(native):
    imgs = [make_cell(70 + 3 * s, 60 + 5 * s, seed=s) for s in range(8)]
    cfg = small_cfg(dtype="float32")
    a, sa = run(native, imgs, cfg, threads=1)
    b, sb = run(native, imgs, cfg, threads=2)
    c, _ = run(native, imgs, cfg, threads=0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert sa == sb
    assert native.default_threads() >= 1


def test_concurrent_calls_from_python_threads(native):
    """The GIL is released during the work; concurrent calls give the same answers."""
    imgs = [make_cell(80, seed=s) for s in range(6)]
    cfg = small_cfg().to_native_json()
    want, _ = native.preprocess_batch(imgs, cfg, threads=1)
    results = [None] * 4

    def work(k):
        results[k] = native.preprocess_batch(imgs, cfg, threads=1)[0]

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for r in results:
        np.testing.assert_array_equal(r, want)


# -- argument errors ----------------------------------------------------------------------------
def test_argument_errors(native):
    cfg = small_cfg().to_native_json()
    with pytest.raises(ValueError, match=r"items\[1\].*float64"):
        native.preprocess_batch([make_cell(20), np.zeros((20, 20, 3))], cfg)
    with pytest.raises(ValueError, match="shape"):
        native.preprocess_batch([np.zeros((20, 20, 5), np.uint8)], cfg)
    with pytest.raises(TypeError, match=r"items\[0\]"):
        native.preprocess_batch([42], cfg)
    with pytest.raises(TypeError):
        native.preprocess_batch("a.bmp", cfg)
    with pytest.raises(native.ConfigError, match="sise"):
        native.preprocess_batch([], '{"sise": 3}')
    with pytest.raises(native.ConfigError, match="size"):
        native.preprocess_batch([], '{"size": 2}')
    with pytest.raises(native.ConfigError):
        native.preprocess_batch([], "not json")
    out, st = native.preprocess_batch([], cfg)
    assert out.shape == (0, 3, 32, 32) and st == []


def test_max_pixels_applies_to_arrays_and_files(native, tmp_path):
    img = make_cell(60, seed=1)
    p = tmp_path / "c.png"
    Image.fromarray(img).save(p)
    out, st = run(native, [img, str(p)], small_cfg(max_pixels=3000))
    assert [s["ok"] for s in st] == [False, False]
    assert "max_pixels=3000" in st[0]["error"] and "max_pixels=3000" in st[1]["error"]


def test_config_json_roundtrip_with_fitted_params(native):
    imgs = [make_cell(90, seed=s) for s in range(3)]
    base = small_cfg()
    params = json.loads(native.fit_stain(imgs, base.to_native_json()))
    cfg = base.replace(stain=StainConfig(min_foreground=50, params=params))
    cfg2 = PreprocessConfig.from_json(cfg.to_json())
    a, _ = run(native, imgs, cfg)
    b, _ = run(native, imgs, cfg2)
    np.testing.assert_array_equal(a, b)
    c, _ = run(native, imgs, base)
    assert not np.array_equal(a, c)


# -- property tests ------------------------------------------------------------------------------
_cfgs = st.builds(
    lambda size, layout, dtype, filt, crop, square, method, margin: PreprocessConfig(
        size=size, layout=layout, dtype=dtype, filter=filt, crop=crop, square=square, crop_margin=margin,
        stain=StainConfig(method=method, min_foreground=30)),
    size=st.sampled_from([8, 17, 32]),
    layout=st.sampled_from(["nchw", "nhwc"]),
    dtype=st.sampled_from(["float32", "float16", "uint8"]),
    filt=st.sampled_from(["bilinear", "lanczos3", "box", "nearest", "catmullrom"]),
    crop=st.sampled_from(["bbox", "none"]),
    square=st.sampled_from(["pad", "crop"]),
    method=st.sampled_from(["macenko", "reinhard", "none"]),
    margin=st.integers(0, 12),
)


@st.composite
def _images(draw):
    h = draw(st.integers(1, 300))
    w = draw(st.integers(1, 300))
    ch = draw(st.sampled_from([None, 1, 3, 4]))
    kind = draw(st.sampled_from(["cell", "noise", "black", "tissue"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "cell":
        img = make_cell(h, w, seed=seed)
    elif kind == "tissue":
        img = make_tissue(h, w, seed=seed)
    elif kind == "noise":
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        img = np.zeros((h, w, 3), np.uint8)
    if ch is None:
        return np.ascontiguousarray(img[..., 0])
    if ch == 1:
        return np.ascontiguousarray(img[..., :1])
    if ch == 4:
        return np.concatenate([img, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], axis=-1)
    return img


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(imgs=st.lists(_images(), min_size=1, max_size=4), cfg=_cfgs)
def test_property_shapes_finite_and_batch_equals_single(native, imgs, cfg):
    out, st_ = native.preprocess_batch(imgs, cfg.to_native_json(), threads=2)
    s = cfg.size
    assert out.shape == ((len(imgs), 3, s, s) if cfg.layout == "nchw" else (len(imgs), s, s, 3))
    assert out.dtype == np.dtype(cfg.dtype)
    assert all(x["ok"] for x in st_), st_
    if cfg.dtype != "uint8":
        assert np.isfinite(out.astype(np.float32)).all()
        lo = (0 - max(cfg.mean)) / min(cfg.std)
        hi = (1 - min(cfg.mean)) / min(cfg.std)
        assert out.min() >= lo - 1e-2 and out.max() <= hi + 1e-2
    for i, img in enumerate(imgs):
        one, _ = native.preprocess_batch([img], cfg.to_native_json(), threads=1)
        np.testing.assert_array_equal(one[0], out[i])


@settings(max_examples=25, deadline=None)
@given(dt=st.sampled_from([np.float32, np.float64, np.uint16, np.int8, np.int64, np.bool_]),
       shape=st.sampled_from([(5, 6), (5, 6, 3), (5, 6, 4)]))
def test_property_non_uint8_arrays_are_refused(native, dt, shape):
    arr = np.zeros(shape, dtype=dt)
    cfg = small_cfg().to_native_json()
    with pytest.raises(ValueError, match="uint8"):
        native.preprocess_batch([arr], cfg)
    with pytest.raises(ValueError, match="uint8"):
        native.normalize_stain(arr, cfg)
    with pytest.raises(ValueError, match="uint8"):
        native.resize(arr, 3, 3)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), seed=st.integers(0, 1000),
       method=st.sampled_from(["macenko", "reinhard"]))
def test_property_normalize_stain_never_garbage(native, h, w, seed, method):
    img = make_cell(h, w, seed=seed)
    out, fb = native.normalize_stain(img, json.dumps({"stain": {"method": method, "min_foreground": 20}}))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    bg = img.max(axis=-1) <= 10
    assert (out[bg] == 0).all()
    if fb:
        np.testing.assert_array_equal(out[~bg], img[~bg])


def test_tissue_helper_has_no_background():
    t = make_tissue(50, 40, seed=1)
    assert (t.max(axis=-1) > 10).all()
