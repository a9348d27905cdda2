"""Stain normalisation: Rust core vs torchstain's NumPy backend (images without background) and
vs the masked NumPy reference in benchmarks/reference.py (images with black background).

Tolerances (uint8 levels): the algorithms are the same step by step, so the only differences
come from floating-point evaluation order right at a uint8 truncation boundary. We require
max |diff| <= 1 and at most 0.5 % of the values differing at all (observed: identical).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_cell, make_tissue

pytestmark = pytest.mark.timeout(300)

ts_np = pytest.importorskip("torchstain.numpy.normalizers")
from leukedge.config import PreprocessConfig, StainConfig  # noqa: E402


def cfg_json(**stain) -> str:
    return PreprocessConfig(stain=StainConfig(**stain)).to_native_json()


def assert_close(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == np.uint8, (a.shape, b.shape, a.dtype)
    d = np.abs(a.astype(int) - b.astype(int))
    assert d.max() <= 1 and (d > 0).mean() <= 0.005, (what, d.max(), (d > 0).mean())


@pytest.fixture(scope="module")
def interior_crops(native, sample_cells):
    """64x64 crops from inside real cells with no background pixel at all."""
    crops = []
    for p in sample_cells:
        img = native.decode(p)
        m = native.foreground_mask(img)
        ys, xs = np.nonzero(m)
        cy, cx = int(ys.mean()), int(xs.mean())
        y0, x0 = max(cy - 32, 0), max(cx - 32, 0)
        if m[y0:y0 + 64, x0:x0 + 64].all() and img[y0:y0 + 64, x0:x0 + 64].shape[:2] == (64, 64):
            crops.append(np.ascontiguousarray(img[y0:y0 + 64, x0:x0 + 64]))
    assert len(crops) >= 20
    return crops


def _tissues():
    return [make_tissue(70 + 7 * s, 90 - 5 * s, seed=s) for s in range(6)]


# -- Macenko -------------------------------------------------------------------------------------
def test_macenko_default_reference_vs_torchstain_synthetic(native):
    norm = ts_np.NumpyMacenkoNormalizer()
    for i, img in enumerate(_tissues()):
        want, _, _ = norm.normalize(img, stains=False)
        got, fb = native.normalize_stain(img, cfg_json(min_foreground=100))
        assert not fb
        assert_close(got, want, f"tissue {i}")


def test_macenko_default_reference_vs_torchstain_real_crops(native, interior_crops):
    norm = ts_np.NumpyMacenkoNormalizer()
    for i, c in enumerate(interior_crops):
        want, _, _ = norm.normalize(c, stains=False)
        got, fb = native.normalize_stain(c, cfg_json(min_foreground=100))
        assert not fb
        assert_close(got, want, f"crop {i}")


def test_macenko_fit_target_vs_torchstain(native, interior_crops):
    target = interior_crops[0]
    norm = ts_np.NumpyMacenkoNormalizer()
    norm.fit(target)
    params = json.loads(native.fit_stain([target], cfg_json(min_foreground=100)))
    assert params["method"] == "macenko" and params["n_images"] == 1 and params["n_pixels"] == 64 * 64
    np.testing.assert_allclose(np.array(params["he"]), norm.HERef, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.array(params["max_c"]), norm.maxCRef, rtol=1e-9)
    cfg = cfg_json(min_foreground=100, params=params)
    for i, img in enumerate(interior_crops[1:8] + _tissues()[:3]):
        want, _, _ = norm.normalize(img, stains=False)
        got, fb = native.normalize_stain(img, cfg)
        assert not fb
        assert_close(got, want, f"image {i}")


def test_macenko_masked_vs_numpy_reference_on_real_cells(native, reference, sample_cells):
    cfg = cfg_json()
    for p in sample_cells:
        img = native.decode(p)
        got, fb = native.normalize_stain(img, cfg)
        want, wfb = reference.macenko_normalize(img)
        assert fb == wfb is False
        assert_close(got, want, p.name)
        bg = ~native.foreground_mask(img)
        assert bg.mean() > 0.5 and (got[bg] == 0).all()


def test_macenko_fit_many_vs_reference(native, reference, sample_cells):
    imgs = [native.decode(p) for p in sample_cells[:6]]
    params = json.loads(native.fit_stain(imgs, cfg_json()))
    he, max_c = reference.macenko_fit(imgs)
    np.testing.assert_allclose(params["he"], he, atol=1e-9)
    np.testing.assert_allclose(params["max_c"], max_c, rtol=1e-9)
    # a (N, H, W, 3) stack is accepted too
    assert json.loads(native.fit_stain(np.stack(imgs), cfg_json())) == params
    # normalising to fitted parameters == reference with those as HERef / maxCRef
    cfg = cfg_json(params=params)
    for p in sample_cells[6:12]:
        img = native.decode(p)
        got, _ = native.normalize_stain(img, cfg)
        want, _ = reference.macenko_normalize(img, he, max_c)
        assert_close(got, want, p.name)


def test_macenko_synthetic_cells_with_background_vs_reference(native, reference):
    for s in range(5):
        img = make_cell(120, 100, seed=s)
        got, fb = native.normalize_stain(img, cfg_json())
        want, wfb = reference.macenko_normalize(img)
        assert fb == wfb is False
        assert_close(got, want, f"cell {s}")


# -- Reinhard ------------------------------------------------------------------------------------
def test_reinhard_vs_torchstain(native, interior_crops):
    target = interior_crops[1]
    norm = ts_np.NumpyReinhardNormalizer()
    norm.fit(target)
    params = json.loads(native.fit_stain([target], cfg_json(method="reinhard", min_foreground=100)))
    np.testing.assert_allclose(params["mean"], norm.target_means, atol=1e-4)
    np.testing.assert_allclose(params["std"], norm.target_stds, atol=1e-4)
    cfg = cfg_json(method="reinhard", min_foreground=100, params=params)
    for i, img in enumerate(interior_crops[2:10] + _tissues()[:3]):
        want = norm.normalize(img)
        got, fb = native.normalize_stain(img, cfg)
        assert not fb
        assert_close(got, want, f"image {i}")


def test_reinhard_masked_vs_reference(native, reference, sample_cells):
    imgs = [native.decode(p) for p in sample_cells[:20]]
    params = json.loads(native.fit_stain(imgs[:3], cfg_json(method="reinhard")))
    mean, std = reference.reinhard_fit(imgs[:3])
    np.testing.assert_allclose(params["mean"], mean, atol=1e-4)
    np.testing.assert_allclose(params["std"], std, atol=1e-4)
    cfg = cfg_json(method="reinhard", params=params)
    for img in imgs[3:]:
        got, fb = native.normalize_stain(img, cfg)
        want, wfb = reference.reinhard_normalize(img, mean, std)
        assert fb == wfb is False
        assert_close(got, want)
        assert (got[~native.foreground_mask(img)] == 0).all()


def test_builtin_references(native, reference):
    mac = json.loads(native.reference_params("macenko"))
    np.testing.assert_array_equal(mac["he"], reference.HE_REF)
    np.testing.assert_array_equal(mac["max_c"], reference.MAXC_REF)
    rein = json.loads(native.reference_params("reinhard"))
    assert len(rein["mean"]) == 3 and min(rein["std"]) > 0
    img = make_cell(90, seed=4)
    got, _ = native.normalize_stain(img, cfg_json(method="reinhard"))
    want, _ = reference.reinhard_normalize(img, rein["mean"], rein["std"])
    assert_close(got, want)
    with pytest.raises(native.ConfigError):
        native.reference_params("vahadane")


# -- masking, fallbacks, errors ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_fallbacks_keep_image_and_blacken_background(native, method):
    # too little foreground
    img = make_cell(30, seed=1)
    out, fb = native.normalize_stain(img, cfg_json(method=method))
    assert fb
    fg = native.foreground_mask(img)
    np.testing.assert_array_equal(out[fg], img[fg])
    assert (out[~fg] == 0).all()
    # uniform colour (zero variance) with a dark-grey "background" pixel
    img = np.full((40, 40, 3), (150, 90, 170), np.uint8)
    img[0, 0] = (7, 9, 3)
    out, fb = native.normalize_stain(img, cfg_json(method=method))
    assert fb and (out[0, 0] == 0).all()
    np.testing.assert_array_equal(out.reshape(-1, 3)[1:], img.reshape(-1, 3)[1:])
    # all black
    out, fb = native.normalize_stain(np.zeros((50, 50, 3), np.uint8), cfg_json(method=method))
    assert fb and not out.any()
    # too few pixels with OD >= beta (almost white cell): Macenko degenerates, no NaN garbage
    img = np.full((40, 40, 3), 235, np.uint8)
    img[::2, ::3] = (230, 228, 236)
    out, fb = native.normalize_stain(img, cfg_json(method=method))
    assert out.dtype == np.uint8
    if method == "macenko":
        assert fb
        np.testing.assert_array_equal(out, img)


def test_min_foreground_threshold_is_respected(native):
    img = make_cell(60, seed=2)
    n_fg = int(native.foreground_mask(img).sum())
    _, fb = native.normalize_stain(img, cfg_json(min_foreground=n_fg))
    assert not fb
    _, fb = native.normalize_stain(img, cfg_json(min_foreground=n_fg + 1))
    assert fb


def test_white_threshold_masks_glass(native, reference):
    img = make_cell(100, seed=3)
    glass = img.max(axis=-1) == 0
    img[glass] = (245, 243, 247)  # bright glass instead of black
    out, fb = native.normalize_stain(img, cfg_json(white_threshold=240))
    assert not fb and (out[glass] == 0).all()
    want, _ = reference.macenko_normalize(img, white_threshold=240)
    assert_close(out, want)
    m = native.foreground_mask(img, white_threshold=240)
    np.testing.assert_array_equal(m, reference.foreground_mask(img, 10, 240))
    # without it the glass is foreground and the fit changes
    out2, _ = native.normalize_stain(img, cfg_json())
    assert (out2[glass] != 0).any()


def test_grey_and_rgba_inputs(native):
    img = make_cell(64, seed=5)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    a, _ = native.normalize_stain(img, cfg_json(min_foreground=10))
    b, _ = native.normalize_stain(rgba, cfg_json(min_foreground=10))
    np.testing.assert_array_equal(a, b)
    g, _ = native.normalize_stain(img[..., 1].copy(), cfg_json(min_foreground=10))
    assert g.shape == img.shape


def test_method_none_is_identity(native):
    img = make_cell(50, seed=1)
    out, fb = native.normalize_stain(img, cfg_json(method="none"))
    assert not fb
    np.testing.assert_array_equal(out, img)


def test_stain_errors(native):
    with pytest.raises(native.StainError, match="foreground"):
        native.fit_stain([np.zeros((40, 40, 3), np.uint8)], cfg_json())
    with pytest.raises(native.StainError):
        native.fit_stain([], cfg_json())
    with pytest.raises(ValueError, match="uint8"):
        native.fit_stain([np.zeros((40, 40, 3), np.float32)], cfg_json())
    params = json.loads(native.reference_params("macenko"))
    with pytest.raises(native.ConfigError, match="method"):
        native.normalize_stain(make_cell(40), cfg_json(method="reinhard", params=params))
    with pytest.raises(native.ConfigError):
        native.normalize_stain(make_cell(40), cfg_json(params={"method": "macenko", "he": [[1, 2]]}))
    with pytest.raises(native.ConfigError):
        native.normalize_stain(make_cell(40), '{"stain": {"method": "vahadane"}}')
    assert issubclass(native.StainError, ValueError) and issubclass(native.ConfigError, ValueError)


def test_foreground_bbox(native):
    img = np.zeros((30, 40, 3), np.uint8)
    assert native.foreground_bbox(img) is None
    img[5, 7] = (0, 0, 11)
    img[20, 31] = (200, 0, 0)
    assert native.foreground_bbox(img) == (7, 5, 32, 21)
    assert native.foreground_bbox(img, black_threshold=11) == (31, 20, 32, 21)
