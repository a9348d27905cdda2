#!/usr/bin/env python
"""Inference benchmark: every available backend × batch size.

For each (backend, batch) it measures, on the same images:
  * preprocessing alone   (Rust ``Pipeline.run``, one batch at a time, into a preallocated array)
  * backend alone         (``backend.infer_timed`` on already preprocessed batches; compute / H2D / D2H on TensorRT)
  * end to end            (``leukedge.infer.run_inference``: discovery, pipelined preprocessing ∥ inference, results)
  * peer (ONNX Runtime rows, batch ``--peer-batch``): the typical user pipeline of ``peer_pipeline.py``
    (Pillow decode + NumPy crop/pad + Pillow resize + the same ONNX Runtime session), reported as
    ``end-to-end / peer`` (target >= 8x with the shipped model: ``--model leukedge/default_model``)
and reports throughput, per-batch latency percentiles (p50/p95/p99) and
``end-to-end / slower stage alone`` (target >= 0.90: pipelining hides the faster stage).
Stage-alone and end-to-end runs are repeated (``--repeats``, interleaved) and the median run is kept.

Threads: ``leukedge infer`` chooses them with ``leukedge.engines.threads.plan_threads``. With a CPU backend on
many cores it splits the cores between the two stages (rayon pool for preprocessing, intra-op threads
for the backend); when preprocessing's share is under one core (2 cores) both stages get every core and
overlap in the pipeline; on a GPU backend preprocessing keeps every core. "Preprocessing alone" and
"backend alone" are measured with exactly the thread counts the end-to-end run uses, so the ratio says
how well the pipeline overlaps the two stages. For reference each row also has the pipelined run with
both stages on every core ("shared") and the sequential run.

Usage: python benchmarks/bench_infer.py [--model BUNDLE] [--images DIR] [--n 256] [--batches 1,8,32,64]
       [--threads N] [--backend-threads M]   (0 = the automatic split of `leukedge infer`)
Writes benchmarks/results/infer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leukedge.infer import summarize_ms  # noqa: E402


def make_images(d: Path, n: int) -> Path:
    from leukedge.synth import make_cell, write_bmp

    (d / "all").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_bmp(d / "all" / f"UID_{i % 7 + 1}_{i + 1}_1_all.bmp", make_cell(i % 2, seed=i, size=450))
    return d


def make_bundle(d: Path, size: int, arch: str) -> Path:
    import torch

    from leukedge.config import PreprocessConfig
    from leukedge.models import build_model, save_bundle

    torch.manual_seed(0)
    m = build_model(arch, input_size=size)
    return save_bundle(d, m.eval(), arch=arch, config=PreprocessConfig(size=size), synthetic=True)


def bench_preprocess(paths: list[str], cfg, batch: int, threads: int, min_time: float = 1.0) -> dict:
    pipe = cfg.pipeline()
    buf = np.zeros((batch, 3, cfg.size, cfg.size), dtype=cfg.dtype)
    times, n = [], 0
    t0 = time.perf_counter()
    while True:
        for i in range(0, len(paths), batch):
            chunk = paths[i:i + batch]
            t = time.perf_counter()
            pipe.run(chunk, out=buf[:len(chunk)], threads=threads)
            times.append((time.perf_counter() - t) * 1e3)
            n += len(chunk)
        if time.perf_counter() - t0 >= min_time:
            break
    wall = time.perf_counter() - t0
    return {"throughput_img_s": n / wall, "latency_ms": summarize_ms(times)}


def bench_peer(backend, paths: list[str], cfg, batch: int, x_all: np.ndarray, e2e_runs: list[dict], pred, images,
               repeats: int) -> dict:
    """The typical user pipeline (peer_pipeline.py) on the same session, interleaved with extra end-to-end runs
    of `leukedge infer` so both see the same machine load; median of `repeats` each."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peer_pipeline

    from leukedge.infer import run_inference

    def infer(x: np.ndarray) -> np.ndarray:
        return backend.session.run([backend.output_name], {backend.input_name: x})[0]

    runs = []
    for _ in range(repeats):
        r = peer_pipeline.run(paths, cfg, infer, batch, cfg.dtype)
        runs.append(r)
        e2e_runs.append(run_inference(None, [images], None, predictor=pred, warmup=2, limit=len(paths)).stats)
    mid = sorted(runs, key=lambda r: r["throughput_img_s"])[(len(runs) - 1) // 2]
    # the two pipelines' inputs and outputs, side by side (not bit-identical: Pillow's resize vs fast_image_resize)
    x_peer = np.stack([peer_pipeline.preprocess_one(p, cfg) for p in paths[:64]])
    ours = infer(x_all[:64])
    return {"throughput_img_s": mid["throughput_img_s"], "throughput_runs": [r["throughput_img_s"] for r in runs],
            "batch": batch, "what": peer_pipeline.__doc__.splitlines()[0],
            "input_max_abs_diff": float(np.abs(x_peer - x_all[:64].astype(np.float32)).max()),
            "output_max_abs_diff": float(np.abs(mid["outputs"][:64].astype(np.float32) - ours.astype(np.float32)).max())}


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (its latencies stay consistent), with every run's throughput."""
    ordered = sorted(runs, key=lambda r: r["throughput_img_s"])
    return {**ordered[(len(ordered) - 1) // 2], "throughput_runs": [r["throughput_img_s"] for r in runs]}


def bench_backend(backend, x_all: np.ndarray, batch: int, warmup: int = 3, min_time: float = 1.0) -> dict:
    chunks = [x_all[i:i + batch] for i in range(0, len(x_all), batch)]
    chunks = [c for c in chunks if len(c) == batch] or chunks[:1]
    for _ in range(warmup):
        backend.infer(chunks[0])
    tot, comp, h2d, d2h, n = [], [], [], [], 0
    t0 = time.perf_counter()
    while True:
        for c in chunks:
            _, t = backend.infer_timed(c)
            tot.append(t.total_ms)
            if t.compute_ms is not None:
                comp.append(t.compute_ms)
            if t.h2d_ms is not None:
                h2d.append(t.h2d_ms)
            if t.d2h_ms is not None:
                d2h.append(t.d2h_ms)
            n += len(c)
        if time.perf_counter() - t0 >= min_time:
            break
    wall = time.perf_counter() - t0
    return {"throughput_img_s": n / wall, "latency_ms": summarize_ms(tot), "compute_ms": summarize_ms(comp),
            "h2d_ms": summarize_ms(h2d), "d2h_ms": summarize_ms(d2h)}


def bench_concurrent(backend, x_all: np.ndarray, paths: list[str], cfg, batch: int, threads: int,
                     min_time: float = 1.0) -> dict:
    """Both stages at once, flat out, with the thread counts of the end-to-end run (no pipeline bookkeeping):
    how much each slows down when the other runs. On an idle machine with disjoint cores both stay near 1.0; below that the cores are
    not really independent (shared by other processes' load, SMT siblings, memory bandwidth) and no pipeline
    can reach the stage-alone speed."""
    import threading

    pipe = cfg.pipeline()
    chunks = [x_all[i:i + batch] for i in range(0, len(x_all), batch)]
    chunks = [c for c in chunks if len(c) == batch] or chunks[:1]
    buf = np.zeros((batch, 3, cfg.size, cfg.size), dtype=cfg.dtype)
    stop = threading.Event()
    pre = {"n": 0}

    def prep_loop() -> None:
        t = time.perf_counter()
        while not stop.is_set():
            for i in range(0, len(paths), batch):
                chunk = paths[i:i + batch]
                pipe.run(chunk, out=buf[:len(chunk)], threads=threads)
                pre["n"] += len(chunk)
                if stop.is_set():
                    break
        pre["wall"] = time.perf_counter() - t

    th = threading.Thread(target=prep_loop, daemon=True)
    th.start()
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        for c in chunks:
            backend.infer(c)
            n += len(c)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    return {"backend_img_s": n / wall, "preprocess_img_s": pre["n"] / pre["wall"]}


def ratios(rows: list[dict]) -> dict[str, float]:
    """INT8 against FP32 (backend alone and end to end, per batch) and against the FP32 peer, from one run."""
    by = {(r["backend"], r["batch"]): r for r in rows}
    out: dict[str, float] = {}
    for (label, b), r in by.items():
        f = by.get(("onnxruntime-fp32", b))
        if label != "onnxruntime-int8" or f is None:
            continue
        out[f"int8/fp32 backend b={b}"] = r["backend_only"]["throughput_img_s"] / f["backend_only"]["throughput_img_s"]
        out[f"int8/fp32 e2e b={b}"] = r["end_to_end"]["throughput_img_s"] / f["end_to_end"]["throughput_img_s"]
        if "peer_pillow_numpy_ort" in f:
            out[f"int8 e2e / fp32 peer b={b}"] = (r["end_to_end"]["throughput_img_s"]
                                                  / f["peer_pillow_numpy_ort"]["throughput_img_s"])
    return out


def batch1_latency(exp: Path, images: Path, n: int, console, int8_state: str | None) -> int:
    """Batch 1: per image, preprocessing alone, backend alone and end to end, inline (the default below
    PIPELINE_MIN_BATCH) and forced through the pipeline's worker thread, in one process, interleaved."""
    from leukedge.engines import get_backend
    from leukedge.infer import BatchRunner, Predictor, run_inference

    rows = []
    variants = [("onnxruntime-fp32", exp, "fp32")] + ([("onnxruntime-int8", exp / "model_int8.onnx", "int8")]
                                                       if int8_state else [])
    for label, model, prec in variants:
        backend = get_backend("onnxruntime", model, device="cpu", precision=prec)
        pred = Predictor(spec=backend.spec, backend_obj=backend, batch=1, pipeline=True)
        piped = Predictor(spec=backend.spec, backend_obj=backend, batch=1, pipeline=True)
        piped.runner = BatchRunner(backend, backend.spec.config, batch=2, threads=piped.threads.preprocess)
        piped.runner.batch = 1  # the worker-thread pipeline at batch 1 (what `infer` ran before)
        runs: dict[str, list] = {"inline": [], "pipelined": []}
        for _ in range(3):
            for name, p in (("inline", pred), ("pipelined", piped)):
                runs[name].append(run_inference(None, [images], None, predictor=p, warmup=3, limit=n).stats)
        med = {k: sorted(v, key=lambda s: s["latency_ms"]["end_to_end"]["p50"])[1] for k, v in runs.items()}
        lat = med["inline"]["latency_ms"]
        stages = lat["preprocess"]["p50"] + lat["backend_total"]["p50"]
        row = {"backend": label, "int8_check": int8_state if prec == "int8" else None,
               "preprocess_p50_ms": lat["preprocess"]["p50"], "backend_p50_ms": lat["backend_total"]["p50"],
               "e2e_p50_ms_inline": lat["end_to_end"]["p50"], "e2e_p99_ms_inline": lat["end_to_end"]["p99"],
               "e2e_p50_ms_pipelined": med["pipelined"]["latency_ms"]["end_to_end"]["p50"],
               "img_s_inline": med["inline"]["throughput_img_s"], "img_s_pipelined": med["pipelined"]["throughput_img_s"],
               "e2e_p50_over_stages": lat["end_to_end"]["p50"] / stages, "target": "<= 1.2",
               "threads_inline": med["inline"]["threads"]}
        rows.append(row)
        console.print(f"{label} batch 1: preprocess p50 {row['preprocess_p50_ms']:.2f} ms + backend p50 "
                      f"{row['backend_p50_ms']:.2f} ms; e2e p50 inline {row['e2e_p50_ms_inline']:.2f} ms "
                      f"(= {row['e2e_p50_over_stages']:.2f} x the stages), pipelined {row['e2e_p50_ms_pipelined']:.2f} ms; "
                      f"{row['img_s_inline']:.0f} vs {row['img_s_pipelined']:.0f} img/s")
        backend.close()
    out = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "n_images": n,
           "loadavg": os.getloadavg(), "cores": os.cpu_count(),
           "note": "shared 2-core VM (other jobs running: see loadavg); median of 3 interleaved runs by e2e p50",
           "results": rows}
    path = ROOT / "benchmarks" / "results" / "infer_batch1.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model bundle (default: a fresh untrained bundle of --arch)")
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--size", type=int, default=224, help="input size for the generated bundle")
    ap.add_argument("--images", type=Path, help="image folder (default: --n synthetic 450x450 BMP cells)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32,64; +128,256 on GPU)")
    ap.add_argument("--backends", default="all", help="comma list of torch,onnxruntime-fp32,onnxruntime-fp16,tensorrt")
    ap.add_argument("--threads", type=int, default=0, help="preprocessing threads (0: automatic split)")
    ap.add_argument("--backend-threads", type=int, default=0, help="CPU backend intra-op threads (0: automatic split)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per stage-alone measurement")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved repetitions of stage-alone and end-to-end runs; the median-throughput run is kept")
    ap.add_argument("--peer-batch", type=int, default=32, help="batch size of the peer row (Pillow + NumPy + ORT)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "infer.json")
    ap.add_argument("--calibrate", type=Path, default=None, metavar="CACHE",
                    help="dataset cache with the model's pixel hash: also export and measure the INT8 Q/DQ graph "
                         "(rows onnxruntime-int8, measured even when it fails its bound; the row says so)")
    ap.add_argument("--batch1-latency", type=int, default=0, metavar="N",
                    help="only measure batch-1 latency over N images (inline vs pipelined, FP32 and INT8) and write "
                         "benchmarks/results/infer_batch1.json")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from leukedge.engines import get_backend
    from leukedge.engines.tensorrt_backend import gpu_info
    from leukedge.export import export_bundle
    from leukedge.infer import Predictor, run_inference

    try:
        import leukedge._native  # noqa: F401
    except ImportError:
        print("leukedge._native is not built (maturin develop --release); the benchmark needs the Rust core", file=sys.stderr)
        return 2
    console = Console() if sys.stdout.isatty() else Console(width=200)  # a log keeps the whole table
    gpu = gpu_info()
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 8, 32, 64] + ([128, 256] if gpu else [])
    work = Path(tempfile.mkdtemp(prefix="leukedge-bench-"))
    images = args.images or make_images(work / "cells", args.n)
    from leukedge.data import discover

    paths = [str(r.path) for r in discover([images])][: args.n]
    bundle = args.model or make_bundle(work / "bundle", args.size, args.arch)
    exp = work / "export"
    console.print(f"exporting {bundle} …")
    export_bundle(bundle, exp, fp16=True, io_dtype="float16", check=args.calibrate is not None, calibrate=args.calibrate,
                  n_synth=8)
    int8_state = None
    if (exp / "model_int8.onnx").is_file():
        int8_state = "passed its bound" if json.loads((exp / "export.json").read_text())["int8"]["passed"] else \
            "FAILED its bound (measured for speed only)"
        console.print(f"INT8 graph {int8_state}")
    if args.batch1_latency:
        return batch1_latency(exp, images, args.batch1_latency, console, int8_state)

    wanted = set(args.backends.split(",")) if args.backends != "all" else None
    specs = [("torch", dict(kind="torch", model=bundle)),
             ("onnxruntime-fp32", dict(kind="onnxruntime", model=exp, precision="fp32")),
             ("onnxruntime-fp16", dict(kind="onnxruntime", model=exp, precision="fp16"))]
    if int8_state is not None:  # the file itself, so a graph that failed its bound is still timed
        specs.append(("onnxruntime-int8", dict(kind="onnxruntime", model=exp / "model_int8.onnx", precision="int8")))
    engine = None
    if gpu:
        from leukedge.engines.build import build_engine, pick_flavour

        try:
            flavour, _ = pick_flavour("auto")
            engine = exp / "model.plan"
            build_engine(exp, engine, backend=flavour, min_batch=1, opt_batch=32, max_batch=max(batches))
            specs.append(("tensorrt", dict(kind=flavour, model=engine)))
        except Exception as exc:  # noqa: BLE001
            console.print(f"[yellow]no TensorRT engine: {exc}[/]")
    from leukedge.engines.threads import usable_cores

    cores = usable_cores()
    load_before = os.getloadavg()
    console.print(f"{cores} usable cores, load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    rows = []
    input_size = args.size
    pre_cache: dict[tuple[str, int, int], list[dict]] = {}  # preprocessing runs, shared by backends
    for label, kw in specs:
        if wanted and label not in wanted:
            continue
        try:
            backend = get_backend(kw.pop("kind"), kw.pop("model"), **kw)
        except Exception as exc:  # noqa: BLE001
            console.print(f"[yellow]skip {label}: {exc}[/]")
            continue
        cfg = backend.spec.config.replace(layout="nchw", dtype=backend.input_dtype)
        input_size = cfg.size
        x_all, _ = cfg.pipeline().run(paths, threads=args.threads)
        for b in batches:
            if backend.max_batch and b > backend.max_batch:
                continue
            # the thread plan `leukedge infer` uses; applied to `backend` by the Predictor
            pred = Predictor(spec=backend.spec, backend_obj=backend, batch=b, threads=args.threads,
                             backend_threads=args.backend_threads, pipeline=True)
            plan = pred.threads
            # This is a shared VM: single runs vary by +-15 % (more at batch 1). Each stage alone and the end-to-end
            # run are measured `--repeats` times, interleaved, and the run with the median throughput is kept.
            key = (cfg.dtype, b, plan.preprocess)
            pre_runs, eng_runs, e2e_runs = [], [], []
            for rep in range(args.repeats):
                if rep >= len(pre_cache.setdefault(key, [])):
                    pre_cache[key].append(bench_preprocess(paths, cfg, b, plan.preprocess, args.min_time))
                pre_runs.append(pre_cache[key][rep])
                eng_runs.append(bench_backend(backend, x_all, b, min_time=args.min_time))  # at plan.backend threads
                e2e_runs.append(run_inference(None, [images], None, predictor=pred, warmup=2, limit=len(paths)).stats)
            peer = None
            if label.startswith("onnxruntime") and b == args.peer_batch:
                peer = bench_peer(backend, paths, cfg, b, x_all, e2e_runs, pred, images, args.repeats)
            pre, eng, e2e = (median_run(r) for r in (pre_runs, eng_runs, e2e_runs))
            eng["threads"] = getattr(backend, "threads", plan.backend)
            conc = bench_concurrent(backend, x_all, paths, cfg, b, plan.preprocess, args.min_time)
            conc["backend_slowdown"] = conc["backend_img_s"] / eng["throughput_img_s"]
            conc["preprocess_slowdown"] = conc["preprocess_img_s"] / pre["throughput_img_s"]
            # reference runs: pipeline with both stages on every core (unless that is what e2e ran) and sequential
            all_cores = {"preprocess": cores, "backend": cores if backend.on_cpu else 0}
            if {k: e2e["threads"][k] for k in all_cores} == all_cores or not backend.on_cpu:
                shared = e2e
            else:
                shared_pred = Predictor(spec=backend.spec, backend_obj=backend, batch=b, threads=cores,
                                        backend_threads=all_cores["backend"], pipeline=True)
                shared = run_inference(None, [images], None, predictor=shared_pred, warmup=2, limit=len(paths)).stats
            pred_seq = Predictor(spec=backend.spec, backend_obj=backend, batch=b, threads=args.threads,
                                 backend_threads=args.backend_threads, pipeline=False)
            seq = run_inference(None, [images], None, predictor=pred_seq, warmup=0, limit=len(paths)).stats
            slower = min(pre["throughput_img_s"], eng["throughput_img_s"])
            shares_cores = e2e["threads"]["backend_on_cpu"] and not e2e["threads"]["partitioned"]
            # When both stages run on the same CPU cores, each image costs the sum of both stages' CPU time, so
            # no pipeline can beat 1 / (1/pre + 1/backend): the work bound. It is the fair target there.
            bound = (1.0 / (1.0 / pre["throughput_img_s"] + 1.0 / eng["throughput_img_s"])
                     if shares_cores else slower)
            row = {
                "backend": label, "backend_name": backend.name, "description": backend.description, "batch": b,
                **({"int8_check": int8_state} if label.endswith("int8") else {}),
                "threads": e2e["threads"],
                "preprocess": pre, "backend_only": eng, "both_stages_concurrently": conc,
                "end_to_end": {"throughput_img_s": e2e["throughput_img_s"], "latency_ms": e2e["latency_ms"],
                               "throughput_runs": e2e["throughput_runs"]},
                "shared_pipeline": {"throughput_img_s": shared["throughput_img_s"], "threads": shared["threads"]},
                "sequential_throughput_img_s": seq["throughput_img_s"],
                "sequential_threads": seq["threads"],
                "slower_stage_img_s": slower,
                "e2e_over_slower_stage": e2e["throughput_img_s"] / slower,
                "stages_share_cores": shares_cores,
                "work_bound_img_s": bound,
                "e2e_over_work_bound": e2e["throughput_img_s"] / bound,
            }
            if peer is not None:
                row["peer_pillow_numpy_ort"] = peer
                row["e2e_over_peer"] = e2e["throughput_img_s"] / peer["throughput_img_s"]
                console.print(f"peer (Pillow decode + NumPy crop/pad + Pillow resize + the same ORT session, batch {b}): "
                              f"{peer['throughput_img_s']:.1f} img/s; leukedge infer {e2e['throughput_img_s']:.1f} img/s = "
                              f"[bold]{row['e2e_over_peer']:.1f}x[/] (target >= 8x); peer vs leukedge inputs max |diff| "
                              f"{peer['input_max_abs_diff']:.3f}, model outputs (logits) max |diff| {peer['output_max_abs_diff']:.3f}")
            rows.append(row)
            th = e2e["threads"]
            console.print(f"{label} b={b} threads pre {th['preprocess']}/backend {th['backend'] or 'default'}"
                          f"{' (partitioned)' if th['partitioned'] else ''}: pre {pre['throughput_img_s']:.1f}, "
                          f"backend {eng['throughput_img_s']:.1f}, e2e {e2e['throughput_img_s']:.1f} "
                          f"(shared {shared['throughput_img_s']:.1f}, seq {seq['throughput_img_s']:.1f}) img/s, "
                          f"ratio {row['e2e_over_slower_stage']:.2f} (vs work bound {row['e2e_over_work_bound']:.2f}); both flat out at once: backend x"
                          f"{conc['backend_slowdown']:.2f}, preprocessing x{conc['preprocess_slowdown']:.2f}")
        backend.close()

    t = Table(title=f"leukedge inference — {len(paths)} cells {'on ' + gpu['name'] if gpu else 'on CPU'}")
    for c in ("backend", "batch", "threads pre/be", "preproc img/s", "backend img/s", "backend p50/p99 ms",
              "e2e img/s", "shared img/s", "seq img/s", "e2e p50/p99 ms", "concurrent slowdown be/pre",
              "e2e / slower", "e2e / bound"):
        t.add_column(c, justify="right")
    for r in rows:
        bl, el = r["backend_only"]["latency_ms"], r["end_to_end"]["latency_ms"]["end_to_end"]
        ratio = r["e2e_over_slower_stage"]
        th = r["threads"]
        t.add_row(r["backend"], str(r["batch"]), f"{th['preprocess']}/{th['backend'] or 'def'}",
                  f"{r['preprocess']['throughput_img_s']:.1f}",
                  f"{r['backend_only']['throughput_img_s']:.1f}", f"{bl['p50']:.2f}/{bl['p99']:.2f}",
                  f"{r['end_to_end']['throughput_img_s']:.1f}", f"{r['shared_pipeline']['throughput_img_s']:.1f}",
                  f"{r['sequential_throughput_img_s']:.1f}",
                  f"{el['p50']:.1f}/{el['p99']:.1f}",
                  f"{r['both_stages_concurrently']['backend_slowdown']:.2f}/{r['both_stages_concurrently']['preprocess_slowdown']:.2f}",
                  f"[{'green' if ratio >= 0.9 else 'yellow'}]{ratio:.2f}[/]",
                  f"[{'green' if r['e2e_over_work_bound'] >= 0.9 else 'yellow'}]{r['e2e_over_work_bound']:.2f}[/]")
    console.print(t)
    console.print("threads pre/be: preprocessing (rayon) / backend intra-op threads used by the end-to-end run and by"
                  " both stage-alone measurements; shared: pipelined with both stages on every core (no partition);"
                  " concurrent slowdown: each stage's speed while the other runs flat out on its own share of the cores"
                  " (1.00 = the cores are really independent; much lower = the machine is shared/loaded and no"
                  " pipeline can reach the stage-alone speed); e2e / bound: against the slower stage when the stages"
                  " have cores of their own, against 1/(1/pre + 1/backend) when they share every core (each image"
                  " then costs both stages' CPU time)")
    load_after = os.getloadavg()
    import onnxruntime
    import torch

    out = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "usable_cores": cores,
                    "loadavg_before": load_before, "loadavg_after": load_after, "platform": platform.platform(), "python": platform.python_version(),
                    "gpu": gpu, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "repeats": args.repeats,
        "images": {"n": len(paths), "source": str(args.images) if args.images else "synthetic 450x450 BMP"},
        "model": {"bundle": str(args.model) if args.model else f"untrained {args.arch}", "input_size": input_size},
        "target": "end to end >= 0.90 x the slower stage alone (stages alone measured with the thread counts of the end-to-end run); where both stages share every CPU core, also reported against the work bound 1/(1/pre + 1/backend)",
        "results": rows,
    }
    out["ratios"] = ratios(rows)
    for k, v in out["ratios"].items():
        console.print(f"{k}: {v:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
