#!/usr/bin/env python
"""Throughput of `leukedge infer --ray local` (a Ray Data job) against plain `leukedge infer`, one machine.

The same N synthetic 450x450 BMP cells (like C-NMC's) and the same model (the shipped default, ONNX Runtime
on the CPU) go through:
  * plain     ``leukedge.infer.run_inference`` (pipelined Rust preprocessing ∥ backend), timed around the
              whole call (model load, discovery, inference, results file);
  * ray warm  ``leukedge.infer.ray.run_ray_inference`` on an already running local Ray instance, timed around
              the whole call (job planning, actor start with model load, both map_batches stages, results);
  * ray cold  the same with ``address="local"``: Ray's start and shutdown included (what one CLI call costs).
Each is repeated (``--repeats``, interleaved) and the median is kept. Prints the ratios and the overhead
(``1 - ray warm / plain`` throughput, and the fixed start-up seconds of a cold call) and writes
benchmarks/results/ray_infer.json.

Usage: python benchmarks/bench_ray_infer.py [--n 1024] [--repeats 3] [--batch 32] [--model BUNDLE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_infer import make_images  # noqa: E402  (the same synthetic cells as the plain infer benchmark)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default=None, help="model bundle / export (default: the shipped default model)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_infer.json"))
    args = ap.parse_args()

    import ray

    from leukedge.infer import default_model_path, run_inference
    from leukedge.infer.ray import run_ray_inference

    model = args.model or str(default_model_path())
    load0 = os.getloadavg()
    runs: dict[str, list[dict]] = {"plain": [], "ray_warm": [], "ray_cold": []}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        src = make_images(t / "cells", args.n)
        ref = None
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            res = run_inference(model, [src], t / "plain.csv", batch=args.batch, backend="onnxruntime")
            runs["plain"].append({"seconds": time.perf_counter() - t0, "inner_img_s": res.stats["throughput_img_s"]})
            ref = [(r.path, r.status, r.probability) for r in res.results]

            t0 = time.perf_counter()
            res = run_ray_inference(model, [src], t / "cold.csv", address="local", batch=args.batch, backend="onnxruntime")
            runs["ray_cold"].append({"seconds": time.perf_counter() - t0, "job_s": res.stats["wall_s"]})

            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="warning",
                     object_store_memory=1 << 30)
            try:
                t0 = time.perf_counter()
                res = run_ray_inference(model, [src], t / "warm.csv", address="local", batch=args.batch,
                                        backend="onnxruntime")
                runs["ray_warm"].append({"seconds": time.perf_counter() - t0, "job_s": res.stats["wall_s"],
                                         "ray": res.stats["ray"]})
            finally:
                ray.shutdown()
            got = [(r.path, r.status, r.probability) for r in res.results]
            assert [g[:2] for g in got] == [r[:2] for r in ref]
            assert max(abs(a[2] - b[2]) for a, b in zip(got, ref) if a[2] is not None) <= 1e-6
            print(f"repeat {rep + 1}: plain {runs['plain'][-1]['seconds']:.2f}s, ray warm {runs['ray_warm'][-1]['seconds']:.2f}s, "
                  f"ray cold {runs['ray_cold'][-1]['seconds']:.2f}s", flush=True)

    def med(key: str) -> float:
        return statistics.median(r["seconds"] for r in runs[key])

    n = args.n
    plain_s, warm_s, cold_s = med("plain"), med("ray_warm"), med("ray_cold")
    summary = {
        "plain_img_s": n / plain_s,
        "plain_inner_img_s": statistics.median(r["inner_img_s"] for r in runs["plain"]),
        "ray_warm_img_s": n / warm_s,
        "ray_cold_img_s": n / cold_s,
        "ray_warm_vs_plain": plain_s / warm_s,
        "ray_cold_vs_plain": plain_s / cold_s,
        "overhead_warm_fraction": 1.0 - plain_s / warm_s,
        "ray_start_stop_seconds": cold_s - warm_s,
        "per_image_overhead_ms_warm": (warm_s - plain_s) / n * 1e3,
    }
    out = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                    "platform": platform.platform(), "python": platform.python_version(), "ray": ray.__version__},
        "images": {"n": n, "source": "synthetic 450x450 BMP cells (leukedge.synth)"},
        "model": model if args.model else "leukedge/default_model (ONNX Runtime CPU fp32)",
        "batch": args.batch,
        "repeats": args.repeats,
        "note": "one machine, so Ray adds work (object-store transfers, a task/actor per stage, job planning) and no "
                "hardware; its gain is on a cluster. Rows were checked equal to plain infer (probabilities to 1e-6).",
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"plain infer        {summary['plain_img_s']:7.1f} img/s (whole call; {summary['plain_inner_img_s']:.1f} img/s "
          "inference loop alone)")
    print(f"ray local, warm    {summary['ray_warm_img_s']:7.1f} img/s = {summary['ray_warm_vs_plain']:.2f}x plain "
          f"(overhead {100 * summary['overhead_warm_fraction']:.0f}%, {summary['per_image_overhead_ms_warm']:.2f} ms/img)")
    print(f"ray local, cold    {summary['ray_cold_img_s']:7.1f} img/s = {summary['ray_cold_vs_plain']:.2f}x plain "
          f"(Ray start + stop {summary['ray_start_stop_seconds']:.1f} s)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
