#!/usr/bin/env python
"""Preprocessing benchmark: leukedge's Rust core vs the usual Python stacks.

Full work per image (identical in all three): decode a 450x450 BMP -> Macenko stain
normalisation (Io=240, alpha=1, beta=0.15, torchstain's reference) -> bilinear resize to
224x224 -> NCHW float16 ``(x/255 - mean)/std``.

* leukedge:  ``PreprocessConfig(...).pipeline().run(paths)`` (``leukedge._native.Pipeline``) with ``crop="none"`` (so the
  work matches the baselines), threads=1, 2 and all cores.
* (a) Pillow decode + torchstain NumPy Macenko (no masking, as torchstain does) + Pillow resize.
* (b) cv2.imread + the vectorised NumPy Macenko of benchmarks/reference.py (same black-background
  masking as leukedge) + cv2.resize (INTER_LINEAR).

Baselines run single-threaded (BLAS / OpenMP / OpenCV thread pools limited to 1 before import)
and are compared with leukedge single-threaded. Images: the real C-NMC sample cells
(../shared/data/cnmc_sample) when present, else synthetic 450x450 cells on black.

Usage:  python benchmarks/bench_preprocess.py [--rounds 3] [--n 52] [--out benchmarks/results/preprocess.json]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO.parent / "shared" / "data" / "cnmc_sample"
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _load_reference():
    spec = importlib.util.spec_from_file_location("bench_reference", HERE / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _to_nchw_f16(u8: np.ndarray) -> np.ndarray:
    x = (u8.astype(np.float32) / np.float32(255) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float16)


def _images(n: int, tmp: Path) -> tuple[list[str], str]:
    paths = sorted(SAMPLE.glob("C-NMC_Leukemia/training_data/fold_*/*/*.bmp"))
    if paths:
        reps = (n + len(paths) - 1) // len(paths)
        return [str(p) for p in (paths * reps)[:n]], f"real C-NMC sample cells ({len(paths)} distinct)"
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_cell  # synthetic cell on black

    out = []
    for i in range(n):
        p = tmp / f"cell_{i}.bmp"
        Image.fromarray(make_cell(450, seed=i)).save(p)
        out.append(str(p))
    return out, "synthetic 450x450 cells on black"


def _time(fn, rounds: int) -> list[float]:
    fn()  # warm-up (page cache, pools, imports)
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=52, help="images per round (default 52)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per method (best is reported)")
    ap.add_argument("--baseline-n", type=int, default=None, help="images per round for the slow baseline (a)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "preprocess.json")
    args = ap.parse_args(argv)

    import cv2
    from PIL import Image
    from rich.console import Console
    from rich.table import Table

    import leukedge._native as native
    from leukedge.config import PreprocessConfig

    cv2.setNumThreads(1)
    ref = _load_reference()
    console = Console()
    try:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer
    except ImportError:  # pragma: no cover
        NumpyMacenkoNormalizer = None

    with tempfile.TemporaryDirectory() as td:
        paths, source = _images(args.n, Path(td))
        n = len(paths)
        nb = min(args.baseline_n or n, n)
        cfg = PreprocessConfig(crop="none", size=SIZE, filter="bilinear", layout="nchw", dtype="float16")
        cj = cfg.to_native_json()
        pipe = native.Pipeline(cj)  # parsed, validated, tables built: once
        out = np.empty((n, 3, SIZE, SIZE), np.float16)
        cores = native.default_threads()

        # sanity: leukedge output == (b) pipeline on the first image (within resize rounding)
        le, st = pipe.run(paths[:1])
        assert st[0]["ok"], st[0]

        results: dict[str, dict] = {}

        def record(name, ts, count, note):
            best = min(ts)
            results[name] = {
                "ms_per_image": 1e3 * best / count,
                "images_per_s": count / best,
                "median_ms_per_image": 1e3 * statistics.median(ts) / count,
                "images": count,
                "rounds": len(ts),
                "note": note,
            }

        with console.status("leukedge ..."):
            for t in sorted({1, 2, cores}):
                ts = _time(lambda t=t: pipe.run(paths, out=out, threads=t), args.rounds)
                record(f"leukedge threads={t}", ts, n, "Rust: decode + Macenko (masked) + resize + NCHW f16, one call")
            # the named approximate settings (they change pixels; measured differences in their docstrings)
            from leukedge.config import StainConfig
            for label, stain in (("stain.apply_at_output", StainConfig(apply_at_output=True)),
                                 ("stain.apply_at_output + fit_pixels=16384",
                                  StainConfig(apply_at_output=True, fit_pixels=16384))):
                ap_pipe = PreprocessConfig(crop="none", size=SIZE, filter="bilinear", layout="nchw", dtype="float16",
                                           stain=stain).pipeline()
                ts = _time(lambda p=ap_pipe: p.run(paths, out=out, threads=1), args.rounds)
                record(f"leukedge threads=1, {label}", ts, n, "named setting, changes pixels (see its docstring)")
            # thread scaling on batches of 32 (as `leukedge infer` calls it), Macenko and the shipped model's setting
            shipped = PreprocessConfig.load(REPO / "leukedge" / "default_model" / "export" / "preprocess.json") \
                if (REPO / "leukedge" / "default_model" / "export" / "preprocess.json").exists() else \
                PreprocessConfig(stain=cfg.stain.__class__(method="none"), size=128)
            for label, c in (("macenko 224 f16", cfg), ("shipped model", shipped)):
                bp = c.pipeline()
                buf = np.empty(bp.output_shape(32), np.float16 if c.dtype == "float16" else np.float32 if c.dtype == "float32" else np.uint8)
                chunks = [paths[i:i + 32] for i in range(0, n - n % 32 or n, 32)]
                for t in (1, 2):
                    ts = _time(lambda t=t, bp=bp, buf=buf, chunks=chunks: [bp.run(ch, out=buf[:len(ch)], threads=t) for ch in chunks], args.rounds)
                    record(f"{label} batches of 32, threads={t}", ts, sum(map(len, chunks)), "Pipeline.run per batch of 32")

        def pipe_b():
            for p in paths[:nb]:
                bgr = cv2.imread(p, cv2.IMREAD_COLOR)
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                norm, _ = ref.macenko_normalize(rgb)
                _to_nchw_f16(cv2.resize(norm, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))

        with console.status("(b) cv2 + NumPy Macenko (masked) + cv2.resize ..."):
            record("(b) cv2 + NumPy Macenko + cv2.resize", _time(pipe_b, args.rounds), nb,
                   "single thread; same black masking as leukedge")

        if NumpyMacenkoNormalizer is not None:
            norm = NumpyMacenkoNormalizer()

            def pipe_a():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for p in paths[:nb]:
                        with Image.open(p) as im:
                            rgb = np.asarray(im.convert("RGB"))
                        inorm, _, _ = norm.normalize(rgb, stains=False)
                        small = Image.fromarray(inorm).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
                        _to_nchw_f16(np.asarray(small))

            with console.status("(a) Pillow + torchstain NumPy Macenko + Pillow resize ..."):
                record("(a) Pillow + torchstain + Pillow", _time(pipe_a, max(1, min(args.rounds, 2))), nb,
                       "single thread; torchstain does not mask the black background")

        # stage breakdown of the Rust core (separate calls, single thread, includes call overhead)
        imgs = [native.decode(p) for p in paths[:16]]
        stained = [native.normalize_stain(i, cj)[0] for i in imgs]
        stages = {
            "decode": lambda: [native.decode(p) for p in paths[:16]],
            "macenko": lambda: [native.normalize_stain(i, cj) for i in imgs],
            "resize": lambda: [native.resize(i, SIZE, SIZE, "bilinear") for i in stained],
        }
        stage_ms = {k: 1e3 * min(_time(f, args.rounds)) / 16 for k, f in stages.items()}

    le1 = results["leukedge threads=1"]["ms_per_image"]
    ratios = {}
    for k in ("(a) Pillow + torchstain + Pillow", "(b) cv2 + NumPy Macenko + cv2.resize"):
        if k in results:
            ratios[f"{k} / leukedge 1 thread"] = results[k]["ms_per_image"] / le1
    for label in ("stain.apply_at_output", "stain.apply_at_output + fit_pixels=16384"):
        r = results.get(f"leukedge threads=1, {label}")
        for k in ("(a) Pillow + torchstain + Pillow", "(b) cv2 + NumPy Macenko + cv2.resize"):
            if r and k in results:
                ratios[f"{k} / leukedge 1 thread, {label}"] = results[k]["ms_per_image"] / r["ms_per_image"]
    if "leukedge threads=2" in results:
        ratios["scaling 1 -> 2 threads"] = le1 / results["leukedge threads=2"]["ms_per_image"]
    for label in ("macenko 224 f16", "shipped model"):
        a, b = results.get(f"{label} batches of 32, threads=1"), results.get(f"{label} batches of 32, threads=2")
        if a and b:
            ratios[f"scaling 1 -> 2 threads, {label}, batches of 32"] = a["ms_per_image"] / b["ms_per_image"]
    ratios[f"scaling 1 -> {cores} threads (all cores)"] = le1 / results[f"leukedge threads={cores}"]["ms_per_image"]

    table = Table(title=f"Preprocessing 450x450 -> 224 NCHW float16 ({source}, n={n})")
    for col in ("method", "ms / image", "images / s", "time / leukedge 1-thread time"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for k, r in results.items():
        table.add_row(k, f"{r['ms_per_image']:.2f}", f"{r['images_per_s']:.0f}", f"{r['ms_per_image'] / le1:.1f}x")
    console.print(table)
    st_table = Table(title="leukedge stages (separate single-thread calls)")
    st_table.add_column("stage")
    st_table.add_column("ms / image", justify="right")
    for k, v in stage_ms.items():
        st_table.add_row(k, f"{v:.3f}")
    console.print(st_table)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None and load[0] > 0.75 * (os.cpu_count() or 1):
        console.print(f"[yellow]note: load average {load[0]:.1f} on {os.cpu_count()} CPUs - other work was running; "
                      "absolute times and thread scaling are unreliable[/yellow]")
    for k, v in ratios.items():
        console.print(f"{k}: [bold]{v:.1f}x[/bold]")

    report = {
        "benchmark": "preprocess",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "images": source,
        "n": n,
        "work": "decode 450x450 BMP + Macenko (Io=240, alpha=1, beta=0.15) + bilinear resize 224 + NCHW float16",
        "results": results,
        "ratios": ratios,
        "leukedge_stage_ms": stage_ms,
        "targets": {"vs (a)": ">= 100x", "vs (b)": ">= 20x", "scaling 2 cores (batches of 32)": ">= 1.8x"},
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads_all_cores": cores,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": load,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
