"""The portable paths (what a Jetson's Arm cores run) give the SIMD paths' bits on the real sample cells.

A child process with ``LEUKEDGE_PORTABLE=1`` (read once by the Rust core) preprocesses the 52 sample cells and
generated cells in every output dtype and layout, with each stain method; this process does the same on the
SIMD paths; outputs must be bit-identical (the kernels promise it: same float operations in the same order,
fast_image_resize's integer convolution is the same in every CPU extension). Run the whole suite under
``LEUKEDGE_PORTABLE=1`` too (``make test-portable``, in CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

native = pytest.importorskip("leukedge._native")

from leukedge.config import PreprocessConfig, StainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    PreprocessConfig(size=96, stain=StainConfig(method=m), dtype=dt, layout=lay)
    for m in ("macenko", "reinhard", "none")
    for dt in ("uint8", "float32", "float16")
    for lay in ("nchw", "nhwc")
] + [PreprocessConfig(size=64, filter="lanczos3", dtype="float16")]

CHILD = r"""
import json, sys, numpy as np
from leukedge import _native
from leukedge.config import PreprocessConfig
from leukedge.synth import make_cell
paths, cfgs, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
items = paths + [make_cell(i % 2, seed=i, size=211) for i in range(6)]
res = {"paths": _native.cpu_paths()}
arrays = {}
for k, c in enumerate(cfgs):
    x, st = _native.preprocess_batch(items, PreprocessConfig.from_json(c).to_native_json())
    arrays[f"x{k}"] = x
    res[f"st{k}"] = [[s["ok"], s.get("error"), s.get("stain_fallback")] for s in st]
np.savez(out, **arrays)
print(json.dumps(res))
"""


def _run(paths: list[str], env_portable: str | None, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LEUKEDGE_PORTABLE"}
    if env_portable is not None:
        env["LEUKEDGE_PORTABLE"] = env_portable
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths), json.dumps([c.to_json() for c in CONFIGS]),
                        str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_portable_outputs_equal_simd_outputs(sample_cells, tmp_path):
    paths = [str(p) for p in sample_cells]
    simd = _run(paths, None, tmp_path / "simd.npz")
    port = _run(paths, "1", tmp_path / "portable.npz")
    assert port["paths"]["portable"] is True
    assert not any(v for k, v in port["paths"].items() if k != "portable"), port["paths"]
    if os.environ.get("LEUKEDGE_PORTABLE", "") in ("", "0"):
        assert simd["paths"]["portable"] is False
    a, b = np.load(tmp_path / "simd.npz"), np.load(tmp_path / "portable.npz")
    for k, cfg in enumerate(CONFIGS):
        assert simd[f"st{k}"] == port[f"st{k}"], cfg
        assert all(s[0] for s in simd[f"st{k}"]), cfg
        x, y = a[f"x{k}"], b[f"x{k}"]
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), f"{cfg.stain.method} {cfg.dtype} {cfg.layout}: portable != SIMD"


def test_switch_values_are_read_once(tmp_path):
    code = ("import os; from leukedge import _native; a = _native.cpu_paths()['portable']; "
            "os.environ['LEUKEDGE_PORTABLE'] = '1'; print(a, _native.cpu_paths()['portable'])")
    for value, want in (("0", "False False"), ("off", "False False"), ("1", "True True"), ("yes", "True True")):
        env = {**os.environ, "LEUKEDGE_PORTABLE": value, "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == want.split(), (value, r.stdout)
