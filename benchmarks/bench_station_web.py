#!/usr/bin/env python3
"""Station page benchmark: response times of the page, the JSON API and /metrics on a station
database holding 5,000 cells (the issue's load target: the page and /api/samples under 200 ms each).

The database is written through the station's own store (``leukedge.station.db``: runs, batches of
16, results with realistic timings) over 20 samples, with 300 reviews; the server is the real
Starlette app on a real socket (uvicorn in a thread, HTTP/1.1 keep-alive from ``http.client``),
so each time includes HTTP parsing, the read-only SQLite open and the JSON encoding.

    python benchmarks/bench_station_web.py                 # 5,000 cells, 50 requests per URL
    python benchmarks/bench_station_web.py --cells 50000 --requests 20

Prints a table and writes benchmarks/results/station_web.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from leukedge.station import db as sdb  # noqa: E402
from leukedge.station import reviews as rv  # noqa: E402
from leukedge.station.web import WebSettings, create_app  # noqa: E402

URLS = ("/", "/static/app.js", "/api/samples", "/api/overview", "/api/live", "/api/cells?limit=60",
        "/api/cells?limit=60&unreviewed=1", "/metrics", "/healthz")


def fill(db: Path, n_cells: int, n_samples: int, n_reviews: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    conn = sdb.connect(db)
    run = sdb.start_run(conn, watch_dir="/srv/incoming", model="bench", model_id="bench@000000000000",
                        preprocess_hash="x", backend="onnxruntime-cpu-fp32", settings={"heartbeat_s": 1.0})
    t0 = time.time() - n_cells * 0.05
    rows: list[sdb.ResultRow] = []
    for i in range(n_cells):
        p = float(rng.beta(0.6, 0.6))
        err = rng.random() < 0.01
        t = t0 + i * 0.05
        rows.append(sdb.ResultRow(
            path=f"/srv/incoming/slide_{i % n_samples:02d}/cell_{i:06d}.bmp", sha256=f"{i:064x}", size=607_554,
            mtime_ns=int(t * 1e9), sample_id=f"slide_{i % n_samples:02d}", status="error" if err else "ok",
            error="decode error: truncated" if err else None, probability=None if err else p,
            label=None if err else ("all" if p >= 0.5 else "hem"), is_blast=None if err else int(p >= 0.5),
            model_id="bench@000000000000", preprocess_hash="x", backend="onnxruntime-cpu-fp32", run_id=run, batch_id=0,
            detected_at=t, ready_at=t + 0.5, started_at=t + 0.6, done_at=t + 0.8, queued_ms=100.0,
            preprocess_ms=20.0, compute_ms=30.0, latency_ms=float(rng.normal(800, 100))))
    for k in range(0, n_cells, 16):
        chunk = rows[k:k + 16]
        bid = sdb.open_batch(conn, run_id=run, size=len(chunk), reason="full", opened_at=chunk[0].ready_at,
                             started_at=chunk[0].started_at)
        for r in chunk:
            r.batch_id = bid
        sdb.insert_batch(conn, bid, chunk, preprocess_ms=20.0, compute_ms=30.0, total_ms=60.0)
    sdb.write_heartbeat(conn, run, state="running", queue_len=3, settling=1, processed=n_cells, errors=0,
                        throughput_1m=20.0, latency_p50_ms=800.0, latency_p95_ms=960.0, batches=n_cells // 16)
    ids = conn.execute("SELECT id, path, sha256, sample_id, label, probability, model_id FROM results "
                       "WHERE status = 'ok' LIMIT ?", (n_reviews,)).fetchall()
    conn.close()
    rconn = rv.connect(rv.default_reviews_path(db))
    assert rconn is not None
    for r in ids:
        rv.add_review(rconn, dict(r), ("all", "hem", "not_a_cell")[r["id"] % 3], "bench")
    rconn.close()


def serve(settings: WebSettings) -> tuple[object, int]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--reviews", type=int, default=300)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "station_web.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "station.sqlite"
        t = time.perf_counter()
        fill(db, a.cells, a.samples, a.reviews)
        print(f"filled {db.name}: {a.cells:,} cells, {a.samples} samples, {a.reviews} reviews "
              f"in {time.perf_counter() - t:.1f} s")
        server, port = serve(WebSettings(db_path=db, reviews_path=rv.default_reviews_path(db)))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        results = {}
        for url in URLS:
            times, cpu = [], []
            for i in range(a.requests + 2):
                t, c = time.perf_counter(), time.process_time()
                conn.request("GET", url)
                r = conn.getresponse()
                body = r.read()
                dt = (time.perf_counter() - t) * 1000
                dc = (time.process_time() - c) * 1000
                assert r.status == 200, (url, r.status, body[:200])
                if i >= 2:  # two warm-up requests
                    times.append(dt)
                    cpu.append(dc)
            results[url] = {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
                            "max_ms": float(max(times)), "cpu_p50_ms": float(np.percentile(cpu, 50)),
                            "bytes": len(body)}
        server.should_exit = True  # type: ignore[attr-defined]
    # cpu: CPU time of this process (server and client together) per request -- what the request
    # costs on an idle machine; the wall times also hold waiting for a shared CPU.
    print(f"{'URL':40s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s} {'cpu ms':>8s} {'bytes':>9s}")
    for url, r in results.items():
        print(f"{url:40s} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['max_ms']:8.1f} {r['cpu_p50_ms']:8.1f} {r['bytes']:9,d}")
    out = {"cells": a.cells, "samples": a.samples, "reviews": a.reviews, "requests_per_url": a.requests,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_avg": os.getloadavg()},
           "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
