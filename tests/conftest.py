"""Shared pytest fixtures and helpers.

* ``cnmc_sample`` / ``sample_cells``: the 52 real C-NMC cells in ``../shared/data/cnmc_sample``
  (relative to the repository root); tests using them are skipped when the folder is absent.
  The images are read in place, never copied into the repository.
* ``make_cell`` / ``make_tissue``: small deterministic synthetic images (a stained "cell" on a
  pure black background, or stained tissue with no background at all).
* ``reference``: ``benchmarks/reference.py`` (NumPy reference implementations).
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO.parent / "shared" / "data" / "cnmc_sample"

# H&E-like optical density vectors (R, G, B) used by the synthetic images.
_HAEM = np.array([0.65, 0.70, 0.29])
_EOS = np.array([0.07, 0.99, 0.11])


def sample_cell_paths() -> list[Path]:
    """The real sample BMPs (sorted), or ``[]`` when the sample is not present."""
    return sorted(SAMPLE_DIR.glob("C-NMC_Leukemia/training_data/fold_*/*/*.bmp"))


def tiny_exported_bundle(root: Path, size: int = 64, width: int = 8) -> Path:
    """A real (small, randomly initialised, seed 0) ``tiny`` model bundle at ``size`` px with its FP32 ONNX export."""
    import json

    import torch

    from leukedge.config import PreprocessConfig
    from leukedge.export import export_model
    from leukedge.models import build_model, save_bundle

    torch.manual_seed(0)
    cfg = PreprocessConfig(size=size)
    model = build_model("tiny", width=width).eval()
    bundle = save_bundle(root / "bundle", model, arch="tiny", arch_kwargs={"width": width}, config=cfg, synthetic=True)
    meta = json.loads((bundle / "bundle.json").read_text())
    export_model(model, cfg, bundle / "export", meta=meta, fp16=False, check=False, bundle_path=bundle)
    return bundle


def make_tissue(h: int, w: int, seed: int = 0, io: float = 240.0) -> np.ndarray:
    """Stained tissue-like ``(h, w, 3)`` uint8 image with no background pixels: a smooth random
    mixture of two stains plus a little noise (every pixel has max channel > 10)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    fx, fy, ph = rng.uniform(0.02, 0.15, 2), rng.uniform(0.02, 0.15, 2), rng.uniform(0, 6.28, 2)
    ch = 0.75 + 0.6 * np.sin(fx[0] * xx + ph[0]) * np.cos(fy[0] * yy) + 0.15 * rng.standard_normal((h, w))
    ce = 0.40 + 0.3 * np.cos(fx[1] * xx) * np.sin(fy[1] * yy + ph[1]) + 0.10 * rng.standard_normal((h, w))
    od = np.clip(ch, 0.05, None)[..., None] * _HAEM + np.clip(ce, 0.02, None)[..., None] * _EOS
    img = io * np.exp(-od) - 1 + rng.normal(0, 1.0, (h, w, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    dark = img.max(axis=-1) <= 10
    img[dark, 0] = 11
    return img


def make_cell(h: int = 96, w: int | None = None, seed: int = 0, radius: float = 0.38) -> np.ndarray:
    """A round stained "cell" (with a darker nucleus) on a pure black background."""
    w = h if w is None else w
    rng = np.random.default_rng(seed + 1000)
    img = make_tissue(h, w, seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h / 2 + rng.uniform(-0.05, 0.05) * h, w / 2 + rng.uniform(-0.05, 0.05) * w
    r = np.hypot((yy - cy) / max(h, 1), (xx - cx) / max(w, 1))
    nucleus = r < radius * 0.6
    img[nucleus] = (img[nucleus] * 0.6).astype(np.uint8)
    dark = nucleus & (img.max(axis=-1) <= 10)
    img[dark, 2] = 40
    img[r >= radius] = 0
    return img


@pytest.fixture(scope="session")
def cnmc_sample() -> Path:
    if not SAMPLE_DIR.is_dir() or not sample_cell_paths():
        pytest.skip(f"real C-NMC sample not present at {SAMPLE_DIR}")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_cells(cnmc_sample) -> list[Path]:
    return sample_cell_paths()


@pytest.fixture(scope="session")
def native():
    return pytest.importorskip("leukedge._native", reason="the Rust extension is not built (pip install -e .)")


@pytest.fixture(scope="session")
def reference():
    spec = importlib.util.spec_from_file_location("leukedge_bench_reference", REPO / "benchmarks" / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def infer_cells(tmp_path_factory):
    """23 synthetic PNG cells in a class folder, with 3 broken files in the middle (read-only:
    shared by the infer and Ray infer tests)."""
    from leukedge.synth import make_cell, write_png

    d = tmp_path_factory.mktemp("cells")
    (d / "all").mkdir()
    for i in range(23):
        write_png(d / "all" / f"UID_{i % 3 + 1}_{i + 1}_1_all.png", make_cell(1, seed=i, size=96))
    (d / "all" / "UID_1_90_1_all.png").write_bytes(b"this is not an image")
    (d / "all" / "UID_2_91_1_all.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "all" / "UID_3_92_1_all.bmp").write_bytes(b"BM" + b"\0" * 10)
    return d


# --------------------------------------------------------------------------------------------
# a faked GPU (test-only: the library's seam is leukedge.engines.gpu.OVERRIDES)
@contextlib.contextmanager
def fake_gpu(info, reason: str = "no CUDA GPU (faked)"):
    """Make ``leukedge.engines.gpu.detect_gpu`` report ``info`` (a GpuInfo; ``None``: no GPU) inside the block."""
    from leukedge.engines import gpu

    probe = gpu.GpuProbe(None, "no-gpu", reason) if info is None else gpu.classify(
        info if info.fake else gpu.GpuInfo(**{**info.to_dict(), "fake": True}))
    gpu.OVERRIDES.append(probe)
    try:
        yield probe
    finally:
        gpu.OVERRIDES.remove(probe)
