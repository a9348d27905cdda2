#!/usr/bin/env python3
"""Station benchmark: latency from a file appearing in the watch folder to its committed result,
at several arrival rates, and the highest sustained rate before the queue grows.

A writer drops cells (real C-NMC sample cells from ../shared/data/cnmc_sample if present, else
synthetic ones) into a fresh watch folder at a fixed rate, each written to a temporary name and
renamed into place; the file "appears" at the rename.  The station runs in this process with the
real stack (Rust preprocessing + the chosen backend, ONNX Runtime on the CPU by default).

    python benchmarks/bench_station.py                       # default model, default station settings
    python benchmarks/bench_station.py --rates 5,10,20,40 --duration 8 --model path/to/bundle
    python benchmarks/bench_station.py --arch efficientnet_lite0 --size 224   # random weights, speed only

Prints a table and writes benchmarks/results/station.json.  Numbers depend on the machine and the
model; the JSON records both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from leukedge.cli.station import open_predictor, predict_fn  # noqa: E402
from leukedge.station import Station, StationSettings  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "cnmc_sample"


def source_cells(n_synth: int = 24) -> tuple[list[bytes], str]:
    if SAMPLE.is_dir():
        files = sorted(SAMPLE.rglob("*.bmp"))
        if files:
            return [p.read_bytes() for p in files], f"{len(files)} real C-NMC sample cells (450x450 BMP)"
    from leukedge.synth import make_cell, write_bmp

    out = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(n_synth):
            p = Path(d) / f"{i}.bmp"
            write_bmp(p, make_cell(i % 2, seed=i))
            out.append(p.read_bytes())
    return out, f"{n_synth} synthetic cells (450x450 BMP)"


def random_model(dest: Path, arch: str, size: int) -> Path:
    """A randomly initialised bundle + ONNX export of ``arch`` (used when no model is given and the
    packaged default model is missing). Speed only; its predictions mean nothing."""
    import torch

    from leukedge.config import PreprocessConfig
    from leukedge.export import export_model
    from leukedge.models import build_model, default_arch_kwargs, save_bundle

    torch.manual_seed(0)
    cfg = PreprocessConfig(size=size)
    kw = {"width": 8} if arch == "tiny" else default_arch_kwargs(arch)
    m = build_model(arch, input_size=size, pretrained=False, **kw).eval()
    b = save_bundle(dest / f"{arch}_bundle", m, arch=arch, arch_kwargs=kw, config=cfg, synthetic=True)
    export_model(m, cfg, b / "export", meta=json.loads((b / "bundle.json").read_text()), fp16=False, check=False,
                 bundle_path=b)
    return b


def pick_model(arg: str | None, work: Path, arch: str | None, size: int) -> tuple[str, str]:
    if arg:
        return arg, "given"
    if arch:
        return str(random_model(work, arch, size)), f"randomly initialised {arch} at {size} px (speed only)"
    try:
        from leukedge.models import default_bundle_path

        p = default_bundle_path()
        if (p / "bundle.json").is_file():
            # the package ships weights only; export a copy so ONNX Runtime can run it
            from leukedge.export import export_bundle

            copy = work / "default_model"
            shutil.copytree(p, copy)
            export_bundle(copy, copy / "export", fp16=True, check=False)
            return str(copy), "packaged default model"
    except Exception as exc:  # noqa: BLE001
        print(f"packaged default model unusable ({exc}); using a random tiny CNN", file=sys.stderr)
    return str(random_model(work, "tiny", 64)), "randomly initialised tiny CNN at 64 px (default model unavailable)"


def run_rate(pred, info, cells: list[bytes], rate: float, duration: float, work: Path, opts) -> dict:
    watch = work / f"watch_{rate:g}"
    if watch.exists():
        shutil.rmtree(watch)
    (watch / "sample").mkdir(parents=True)
    stage = work / "stage"
    stage.mkdir(exist_ok=True)
    db = work / f"station_{rate:g}.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    s = StationSettings(watch_dir=watch, db_path=db, batch_size=opts.batch, max_wait_ms=opts.max_wait_ms,
                        settle_ms=opts.settle_ms, poll_ms=opts.poll_ms, heartbeat_s=0.5)
    st = Station(s, predict_fn(pred), info, install_signal_handlers=False)
    th = threading.Thread(target=st.run, name="station", daemon=True)
    th.start()
    while st.scanner is None or st.scanner.stats.scans < 1:
        time.sleep(0.01)

    n = max(int(rate * duration), 4)
    appeared: dict[str, float] = {}
    queue_samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for i in range(n):
        target = t0 + i / rate
        while True:
            now = time.perf_counter()
            if now >= target:
                break
            time.sleep(min(target - now, 0.005))
        name = f"cell{i:05d}.bmp"
        tmp = watch / "sample" / (name + ".tmp")
        data = cells[i % len(cells)]
        # unique content per file (same pixels, one padding byte in the header's reserved field)
        data = data[:6] + (i % 65536).to_bytes(2, "little") + data[8:]
        tmp.write_bytes(data)
        final = watch / "sample" / name
        os.rename(tmp, final)
        appeared[str(final)] = time.time()
        if i % max(int(rate / 10), 1) == 0:
            queue_samples.append((time.perf_counter() - t0, len(st.batcher) + st.scanner.stats.settling))
    offered_s = time.perf_counter() - t0
    # wait for the backlog to drain (bounded)
    drain_deadline = time.monotonic() + max(30.0, duration * 3)
    while time.monotonic() < drain_deadline:
        if st.summary is not None and st.summary.processed >= n:
            break
        time.sleep(0.05)
    drained_after = time.perf_counter() - t0 - offered_s
    st.request_stop("benchmark done")
    th.join(timeout=30)

    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT path, done_at, status, batch_id, queued_ms, preprocess_ms, compute_ms FROM results").fetchall()
    batches = conn.execute("SELECT size, reason FROM batches WHERE state = 'done'").fetchall()
    conn.close()
    lat = np.array([(done - appeared[p]) * 1000 for p, done, *_ in rows if p in appeared], np.float64)
    done_times = sorted(r[1] for r in rows)
    achieved = (len(done_times) - 1) / (done_times[-1] - done_times[0]) if len(done_times) > 1 else 0.0
    # the queue grows when the station cannot keep up: compare latency at the start and end of the window
    order = np.argsort([appeared[p] for p, *_ in rows if p in appeared])
    lat_sorted = lat[order]
    third = max(len(lat_sorted) // 3, 1)
    first, last = float(np.median(lat_sorted[:third])), float(np.median(lat_sorted[-third:]))
    actual_rate = n / offered_s if offered_s > 0 else float("inf")
    writer_kept_up = actual_rate >= 0.9 * rate
    slack_s = (opts.settle_ms + opts.max_wait_ms + 2 * opts.poll_ms) / 1000 + 1.0
    # Sustained: the writer really offered the rate, everything was classified, the backlog drained
    # within one settle + deadline (+1 s) of the last file, and latency did not climb over the window.
    sustained = (writer_kept_up and len(rows) == n and drained_after <= slack_s
                 and achieved >= 0.93 * actual_rate and last <= max(1.5 * first, first + 300.0))
    reasons: dict[str, int] = {}
    for _, r in batches:
        reasons[r] = reasons.get(r, 0) + 1
    return {
        "offered_rate": rate,
        "actual_offered_rate": round(actual_rate, 2),
        "writer_kept_up": bool(writer_kept_up),
        "files": n,
        "results": len(rows),
        "errors": sum(1 for r in rows if r[2] != "ok"),
        "offered_seconds": round(offered_s, 3),
        "achieved_rate": round(achieved, 2),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 1),
            "p95": round(float(np.percentile(lat, 95)), 1),
            "p99": round(float(np.percentile(lat, 99)), 1),
            "max": round(float(lat.max()), 1),
            "mean": round(float(lat.mean()), 1),
        },
        "latency_first_third_p50_ms": round(first, 1),
        "latency_last_third_p50_ms": round(last, 1),
        "queued_ms_p50": round(float(np.median([r[4] for r in rows])), 1),
        "preprocess_ms_p50": round(float(np.median([r[5] or 0 for r in rows])), 1),
        "compute_ms_p50": round(float(np.median([r[6] or 0 for r in rows])), 1),
        "batches": len(batches),
        "mean_batch_size": round(float(np.mean([b[0] for b in batches])), 2) if batches else 0,
        "batch_reasons": reasons,
        "max_backlog": max((q for _, q in queue_samples), default=0),
        "drain_seconds_after_last_file": round(drained_after, 3),
        "sustained": bool(sustained),
    }


PROFILES = {
    # the station's defaults: safe for writers that do not rename (settle 500 ms)
    "default": {"settle_ms": 500.0, "poll_ms": 100.0, "max_wait_ms": 250.0},
    # for acquisition software that writes complete files (or renames them into place)
    "low-latency": {"settle_ms": 150.0, "poll_ms": 25.0, "max_wait_ms": 50.0},
}


def sweep(pred, info, cells, work: Path, prof: argparse.Namespace, rates: list[float], refine: int,
          console: Console) -> dict:
    results = []

    def one(rate: float) -> dict:
        r = run_rate(pred, info, cells, rate, prof.duration, work, prof)
        results.append(r)
        verdict = "sustained" if r["sustained"] else ("QUEUE GROWS" if r["writer_kept_up"] else "writer too slow")
        console.print(f"  ({prof.name}) {rate:g}/s: p50 {r['latency_ms']['p50']:.0f} ms, p95 {r['latency_ms']['p95']:.0f} ms, "
                      f"p99 {r['latency_ms']['p99']:.0f} ms, achieved {r['achieved_rate']:.1f}/s, "
                      f"mean batch {r['mean_batch_size']:.1f}, {verdict}")
        return r

    for rate in rates:
        if not one(rate)["sustained"]:
            break  # higher rates only saturate further
    # bisect between the highest sustained and the lowest saturated rate
    for _ in range(refine):
        good = [r["offered_rate"] for r in results if r["sustained"]]
        bad = [r["offered_rate"] for r in results if not r["sustained"]]
        if not good or not bad:
            break
        lo = max(good)
        above = [b for b in bad if b > lo]
        if not above:
            break
        hi = min(above)
        if hi - lo < max(1.0, 0.1 * lo):
            break
        one(round((lo + hi) / 2, 1))
    results.sort(key=lambda r: r["offered_rate"])
    good = [r["offered_rate"] for r in results if r["sustained"]]
    bad = [r["offered_rate"] for r in results if not r["sustained"]]
    max_sustained = max(good) if good else None
    # a rate the writer itself could not offer says nothing about the station
    saturated = [r["offered_rate"] for r in results if not r["sustained"] and r["writer_kept_up"]]
    first_bad = min((b for b in saturated if max_sustained is None or b > max_sustained), default=None)
    writer_limited = any(not r["writer_kept_up"] for r in results)
    return {"writer_limited": writer_limited, "name": prof.name, "settings": {"batch": prof.batch, "max_wait_ms": prof.max_wait_ms,
                                              "settle_ms": prof.settle_ms, "poll_ms": prof.poll_ms,
                                              "duration_s": prof.duration},
            "rates": results, "max_sustained_rate": max_sustained, "first_saturated_rate": first_bad}


def print_table(console: Console, prof: dict) -> None:
    st = prof["settings"]
    table = Table(title=f"station ({prof['name']}): file appears -> result committed (batch {st['batch']}, "
                        f"max wait {st['max_wait_ms']:g} ms, settle {st['settle_ms']:g} ms, poll {st['poll_ms']:g} ms)")
    for col in ("rate /s", "offered /s", "files", "achieved /s", "p50 ms", "p95 ms", "p99 ms", "queued p50",
                "compute p50", "mean batch", "max backlog", "sustained"):
        table.add_column(col, justify="right")
    for r in prof["rates"]:
        L = r["latency_ms"]
        table.add_row(f"{r['offered_rate']:g}", f"{r['actual_offered_rate']:.1f}", str(r["files"]),
                      f"{r['achieved_rate']:.1f}", f"{L['p50']:.0f}", f"{L['p95']:.0f}", f"{L['p99']:.0f}",
                      f"{r['queued_ms_p50']:.0f}", f"{r['compute_ms_p50']:.0f}", f"{r['mean_batch_size']:.1f}",
                      str(r["max_backlog"]), "yes" if r["sustained"] else "[red]no[/]")
    console.print(table)
    ms, fb = prof["max_sustained_rate"], prof["first_saturated_rate"]
    tail = f" (queue grows at {fb:g}/s)" if fb is not None else " (no tested rate saturated the station)"
    if prof.get("writer_limited") and fb is None:
        tail += "; the benchmark's writer could not offer the higher rates"
    console.print(f"({prof['name']}) highest sustained rate: [bold]{ms if ms is not None else 'none'}[/] files/s" + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundle / export / .onnx / engine (default: packaged default model)")
    ap.add_argument("--arch", default=None,
                    help="instead of --model: benchmark a randomly initialised ARCH (tiny, efficientnet_lite0, ...)")
    ap.add_argument("--size", type=int, default=224, help="input size for --arch")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rates", default="2,5,10,20,40,80,160,320",
                    help="arrival rates to test in increasing order (files/s); stops at the first saturated one")
    ap.add_argument("--refine", type=int, default=2, help="bisection steps between the last sustained and first saturated rate")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per rate")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--profiles", default="default,low-latency", help=f"station settings to test: {', '.join(PROFILES)}")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "station.json"))
    opts = ap.parse_args()
    console = Console(width=max(Console().width, 120))
    rates = [float(r) for r in opts.rates.split(",") if r.strip()]

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="leukedge-bench-station-"))
    profiles = []
    try:
        cells, cells_desc = source_cells()
        model, model_desc = pick_model(opts.model, work, opts.arch, opts.size)
        pred, info = open_predictor(model, opts.backend, fallback=False, device=opts.device, threads=opts.threads,
                                    batch_size=opts.batch, console=console)
        # warm up the backend once so the first rate does not pay for session initialisation
        warm = work / "warm.bmp"
        warm.write_bytes(cells[0])
        pred.predict([str(warm)] * min(opts.batch, 4))
        console.print(f"[bold]station benchmark[/]: model {model_desc} ({info.model_id}) on {info.backend}; {cells_desc}; "
                      f"{opts.duration:g} s of arrivals per rate, files written to a temporary name and renamed")
        for name in [p.strip() for p in opts.profiles.split(",") if p.strip()]:
            if name not in PROFILES:
                raise SystemExit(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
            prof = argparse.Namespace(name=name, batch=opts.batch, duration=opts.duration, **PROFILES[name])
            profiles.append(sweep(pred, info, cells, work, prof, rates, opts.refine, console))
        pred.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for prof in profiles:
        print_table(console, prof)
    out = {
        "benchmark": "station",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.processor(),
                    "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                    "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
        "model": {"path": model, "description": model_desc, "model_id": info.model_id, "backend": info.backend},
        "cells": cells_desc,
        "write_mode": "temporary name + rename",
        "latency_definition": "wall time from the rename that makes the file visible to the commit of its result row",
        "sustained_definition": "the writer offered >= 90% of the rate, every file was classified, results came at >= 93% "
                                "of the offered rate, the backlog drained "
                                "within settle + max wait + 2 polls + 1 s of the last file, and the median latency of the "
                                "last third of files was <= max(1.5x, +300 ms) that of the first third",
        "profiles": profiles,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(opts.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, opts.out)
    console.print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
