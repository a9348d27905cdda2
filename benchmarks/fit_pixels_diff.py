#!/usr/bin/env python
"""How much the non-default stain options change pixels, on the real C-NMC sample cells.

* ``stain.fit_pixels = N`` (fit on a fixed subsample of the foreground) against the exact default,
  for several N: max / mean absolute difference of the Macenko-normalised 450x450 images (uint8),
  share of pixels that differ by more than 1 level, and the time of one ``Pipeline.run`` per image.
* ``stain.apply_at_output`` (transform the resized output pixels instead of the full-resolution
  foreground) against the exact default, on the pipeline output (crop "none", bilinear 224, uint8),
  with the exact fit and with ``fit_pixels = 16384``.
* ``--dump FILE``: write the default pipeline's uint8 output (decode + Macenko + resize 224, crop
  "none", NHWC) of every sample cell to FILE, so two builds can be compared
  (``--compare A.npy B.npy``; e.g. this tree against the previous release: ``PYTHONPATH=/old/tree``).

Usage: python benchmarks/fit_pixels_diff.py [--sizes 4096,8192,16384] [--out benchmarks/results/fit_pixels.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent.parent / "shared" / "data" / "cnmc_sample"


def _paths() -> list[str]:
    paths = sorted(str(p) for p in SAMPLE.glob("C-NMC_Leukemia/training_data/fold_*/*/*.bmp"))
    if not paths:
        sys.exit(f"no sample cells under {SAMPLE}")
    return paths


def _diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_abs": int(d.max()), "mean_abs": float(d.mean()), "share_above_1": float((d > 1).mean()),
            "share_nonzero": float((d > 0).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,8192,16384")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dump", type=Path)
    ap.add_argument("--compare", type=Path, nargs=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fit_pixels.json")
    args = ap.parse_args()
    if args.compare:
        a, b = (np.load(p) for p in args.compare)
        print(json.dumps(_diff(a, b)))
        return 0

    from leukedge.config import PreprocessConfig, StainConfig

    paths = _paths()
    if args.dump:
        import leukedge._native as native  # preprocess_batch: present in older builds too

        cfg = PreprocessConfig(crop="none", size=224, layout="nhwc", dtype="uint8")
        out, st = native.preprocess_batch(paths, cfg.to_native_json(), threads=1)
        assert all(s["ok"] for s in st)
        np.save(args.dump, out)
        print(f"wrote {args.dump} {out.shape}")
        return 0

    import leukedge._native as native

    imgs = [native.decode(p) for p in paths]

    def stained(fit_pixels):
        cfg = PreprocessConfig(stain=StainConfig(fit_pixels=fit_pixels))
        j = cfg.to_native_json()
        return np.stack([native.normalize_stain(i, j)[0] for i in imgs])

    def timed(fit_pixels):
        return timed_cfg(fit_pixels=fit_pixels)

    def timed_cfg(**stain):
        cfg = PreprocessConfig(crop="none", size=224, dtype="float16", stain=StainConfig(**stain))
        p = cfg.pipeline()
        out = np.empty(p.output_shape(len(paths)), np.float16)
        p.run(paths, out=out, threads=1)
        best = float("inf")
        for _ in range(args.rounds):
            t = time.perf_counter()
            p.run(paths, out=out, threads=1)
            best = min(best, time.perf_counter() - t)
        return 1e3 * best / len(paths)

    exact = stained(None)
    res = {"images": len(paths), "exact_ms_per_image": timed(None), "fit_pixels": {}}
    for n in [int(v) for v in args.sizes.split(",")]:
        res["fit_pixels"][n] = {**_diff(exact, stained(n)), "ms_per_image": timed(n)}
        print(n, res["fit_pixels"][n])

    # stain.apply_at_output: compared on the pipeline output (crop "none", bilinear 224, uint8 NHWC),
    # the only place where it differs; the share of foreground output pixels is reported too
    def output(**stain):
        cfg = PreprocessConfig(crop="none", size=224, layout="nhwc", dtype="uint8", stain=StainConfig(**stain))
        out, st = cfg.pipeline().run(paths, threads=1)
        assert all(s["ok"] for s in st)
        return out

    exact224 = output()
    fg = exact224.any(axis=-1)
    res["apply_at_output"] = {}
    for label, kw in (("exact fit", {}), ("fit_pixels 16384", {"fit_pixels": 16384})):
        late = output(apply_at_output=True, **kw)
        d = np.abs(exact224.astype(np.int16) - late.astype(np.int16))
        res["apply_at_output"][label] = {
            **_diff(exact224, late),
            "mean_abs_foreground": float(d[fg].mean()),
            "share_above_1_foreground": float((d[fg] > 1).mean()),
            "share_above_8_foreground": float((d[fg] > 8).mean()),
            "foreground_output_share": float(fg.mean()),
            "ms_per_image": timed_cfg(apply_at_output=True, **kw),
        }
        print("apply_at_output", label, res["apply_at_output"][label])
    print("exact", res["exact_ms_per_image"], "ms/img (decode + Macenko + resize 224 + NCHW f16, 1 thread)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
