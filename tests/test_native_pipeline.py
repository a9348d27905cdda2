"""leukedge._native.Pipeline: one validated configuration reused for every batch, and the
validation of PreprocessConfig through it (every bound lives in rust_ext/src/config.rs)."""

import dataclasses
import json

import numpy as np
import pytest

from leukedge.config import PreprocessConfig, StainConfig
from leukedge.synth import make_cell

native = pytest.importorskip("leukedge._native")


def _cells(n=3, size=80):
    return [make_cell(s % 2, seed=s, size=size) for s in range(n)]


def test_run_equals_preprocess_batch_and_is_reusable():
    cfg = PreprocessConfig(size=32, stain=StainConfig(min_foreground=50), dtype="float16")
    pipe = native.Pipeline(cfg.to_native_json())
    imgs = _cells()
    want, st_want = native.preprocess_batch(imgs, cfg.to_native_json())
    for _ in range(2):  # the same object, twice
        got, st = pipe.run(imgs)
        np.testing.assert_array_equal(got, want)
        assert [s["ok"] for s in st] == [s["ok"] for s in st_want]
    out = np.empty(pipe.output_shape(len(imgs)), np.float16)
    res, _ = pipe.run(imgs, out=out, threads=1)
    assert res is out
    np.testing.assert_array_equal(out, want)


def test_accepts_a_preprocess_config_and_reports_its_settings():
    cfg = PreprocessConfig(size=48, layout="nhwc", dtype="uint8", stain=StainConfig(method="reinhard"))
    pipe = native.Pipeline(cfg)
    assert (pipe.size, pipe.layout, pipe.dtype, pipe.stain_method) == (48, "nhwc", "uint8", "reinhard")
    assert pipe.output_shape(5) == (5, 48, 48, 3)
    assert json.loads(pipe.config)["size"] == 48 and "Pipeline(" in repr(pipe)
    assert cfg.pipeline() is cfg.pipeline()  # cached per configuration
    with pytest.raises(TypeError, match="PreprocessConfig"):
        native.Pipeline(42)


def test_status_carries_the_stain_fallback_reason():
    pipe = PreprocessConfig(size=16).pipeline()
    black = np.zeros((40, 40, 3), np.uint8)
    uniform = np.full((60, 60, 3), (120, 80, 160), np.uint8)
    _, st = pipe.run([black, uniform] + _cells(1, 200))
    assert st[0]["stain_fallback"] and "foreground pixels" in st[0]["stain_reason"]
    assert st[1]["stain_fallback"] and "variance" in st[1]["stain_reason"]
    assert not st[2]["stain_fallback"] and st[2]["stain_reason"] is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=3), "size=3 must be between 8 and 4096"),
    (dict(crop="round"), "crop: unknown variant"),
    (dict(crop_margin=-1), "crop_margin"),
    (dict(max_pixels=0), "max_pixels"),
    (dict(std=(1.0, 0.0, 1.0)), "std > 0"),
    (dict(stain=dict(alpha=60.0)), "stain.alpha=60"),
    (dict(stain=dict(black_threshold=255)), "black_threshold"),
    (dict(stain=dict(black_threshold=100, white_threshold=50)), "--white-threshold"),
    (dict(stain=dict(fit_pixels=10)), "fit_pixels=10"),
    (dict(stain=dict(params={"method": "reinhard", "mean": [1, 2, 3], "std": [1, 1, 1]})), "fitted for method"),
])
def test_python_config_is_validated_by_the_core(kwargs, match):
    with pytest.raises(native.ConfigError, match=match):
        if "stain" in kwargs:
            PreprocessConfig(stain=StainConfig(**kwargs["stain"]))
        else:
            PreprocessConfig(**kwargs)


def test_non_finite_numbers_are_refused_before_json():
    with pytest.raises(ValueError, match="finite.*--stain-io"):
        StainConfig(io=float("nan"))
    with pytest.raises(ValueError, match="finite.*--mean"):
        PreprocessConfig(mean=(0.5, float("inf"), 0.5))


def test_apply_at_output_enters_the_pixel_hash_only_when_set(sample_cells):
    base = PreprocessConfig(crop="none", size=64, layout="nhwc", dtype="uint8")
    assert "apply_at_output" not in base.to_dict()["stain"]  # hashes of existing bundles stay valid
    late = dataclasses.replace(base, stain=StainConfig(apply_at_output=True))
    assert late.pixel_hash() != base.pixel_hash()
    assert PreprocessConfig.from_json(late.to_json()) == late
    assert json.loads(late.pipeline().config)["stain"]["apply_at_output"] is True
    # a different order of the same steps: close to the exact one on a real cell, not equal
    a, _ = base.pipeline().run(sample_cells[:2])
    b, _ = late.pipeline().run(sample_cells[:2])
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert 0 < d.mean() < 3, d.mean()


def test_fit_pixels_enters_the_pixel_hash_only_when_set():
    base = PreprocessConfig()
    assert "fit_pixels" not in base.to_dict()["stain"]  # hashes of existing bundles stay valid
    sub = PreprocessConfig(stain=StainConfig(fit_pixels=16384))
    assert sub.pixel_hash() != base.pixel_hash()
    assert PreprocessConfig.from_json(sub.to_json()) == sub
    assert json.loads(sub.pipeline().config)["stain"]["fit_pixels"] == 16384
