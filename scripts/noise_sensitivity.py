#!/usr/bin/env python
"""How much a model's decisions move under a little pixel noise (the measurement behind the default recipe's
``noise`` setting, see leukedge/default_model/README.md).

For each fold bundle of ``leukedge cv --split official`` runs (``RUN/seed*/official{K}/bundle``, tested on
official fold K, which it never saw), it takes N cells of fold K from the preprocessed CACHE, adds Gaussian
noise of sigma grey levels to the cell's pixels (the black background stays black; rounded to uint8 like a
camera's output), and reports the median and 95th percentile of |dP(all)| against the clean cells and the
number of decisions that flip (the bundle's threshold is built into its output: 0.5 is its decision).

Usage::

    python scripts/noise_sensitivity.py CACHE RUN [RUN ...] [--n 256] [--sigmas 0.5,1,2]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from leukedge.models import load_bundle
from leukedge.training import normalize01, to_float01


def probs(bundle, x_u8: np.ndarray) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for s in range(0, len(x_u8), 64):
            x = normalize01(to_float01(torch.from_numpy(np.ascontiguousarray(x_u8[s:s + 64]))), bundle.config)
            out.append(torch.softmax(bundle.model(x), 1)[:, 1].numpy())
    return np.concatenate(out)


def sensitivity(bundle_dir: Path, images: np.ndarray, rows: np.ndarray, sigmas: list[float],
                rng: np.random.Generator) -> dict[float, tuple[float, float, int]]:
    """sigma -> (median |dP|, p95 |dP|, decision flips) on ``images[rows]``; the noise is drawn from ``rng``."""
    b = load_bundle(bundle_dir)
    x = np.asarray(images[rows]).astype(np.float32)
    p0 = probs(b, x.astype(np.uint8))
    fg = x.max(3, keepdims=True) > b.config.stain.black_threshold
    out = {}
    for s in sigmas:
        p = probs(b, np.clip(np.round(x + rng.normal(0, s, x.shape) * fg), 0, 255).astype(np.uint8))
        d = np.abs(p - p0)
        out[s] = (float(np.median(d)), float(np.quantile(d, 0.95)), int(((p >= 0.5) != (p0 >= 0.5)).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", type=Path, help="The preprocessed cache the runs were trained on (images.npy, manifest.csv).")
    ap.add_argument("runs", type=Path, nargs="+", help="`leukedge cv --split official` output folders.")
    ap.add_argument("--n", type=int, default=256, help="Test cells per direction (a fixed random subset).")
    ap.add_argument("--sigmas", default="0.5,1,2", help="Noise levels in grey levels (comma-separated).")
    args = ap.parse_args()
    torch.set_num_threads(2)
    images = np.load(args.cache / "images.npy", mmap_mode="r")
    with open(args.cache / "manifest.csv", newline="") as f:
        folds = np.array([int(r["fold"]) for r in csv.DictReader(f)])
    sigmas = [float(v) for v in args.sigmas.split(",")]
    for run in args.runs:
        for bundle_dir in sorted(run.glob("seed*/official*/bundle")):
            k = int(bundle_dir.parent.name.removeprefix("official"))
            pool = np.flatnonzero(folds == k)
            rng = np.random.default_rng(0)  # the same cells and the same noise for every run
            rows = np.sort(rng.choice(pool, min(args.n, len(pool)), replace=False))
            res = sensitivity(bundle_dir, images, rows, sigmas, rng)
            cols = "  ".join(f"sigma {s:g}: |dP| median {m:.3f} p95 {p:.3f}, {fl}/{len(rows)} flips"
                             for s, (m, p, fl) in res.items())
            print(f"{run.name} {bundle_dir.parent.parent.name} test fold {k}: {cols}", flush=True)


if __name__ == "__main__":
    main()
