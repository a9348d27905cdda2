"""What the station's screen shows, read from the station database (read-only) and the reviews file.

Plain functions over SQLite connections, with no web framework: :mod:`leukedge.station.web` serves
them, ``leukedge station status`` prints the same station state. Status values are counted
generically (``ok``, ``error``, and any other the station writes, e.g. ``rejected`` by the quality
gate); optional result columns (an out-of-distribution flag) are used where present.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from typing import Any

from . import db as sdb
from . import reviews as rv
from .db import display_text, fs_path

#: |probability - 0.5| at most this: "near the decision threshold", shown first for review.
BORDERLINE_BAND = 0.15
DECISION_THRESHOLD = 0.5
#: Result columns that flag a cell as out of distribution, whichever the database has.
OOD_COLUMNS = ("ood", "is_ood", "ood_flag", "out_of_distribution")
STAIN_FALLBACK_COLUMNS = ("stain_fallback",)


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion ``k / n`` (None for n = 0)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def result_columns(conn: sqlite3.Connection) -> set[str]:
    return {r[1] for r in conn.execute("PRAGMA table_info(results)")}


def _first_col(cols: set[str], names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in cols), None)


# -- station state ------------------------------------------------------------------------------------
def station_state(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any] | None:
    """The latest run and its heartbeat: running or not (heartbeat fresher than 5 heartbeats, at least
    5 s), queue, settling, throughput, latency, model, backend, uptime. None before the first run."""
    now = time.time() if now is None else now
    run = sdb.latest_run(conn)
    if run is None:
        return None
    hb_age = now - (run.get("hb_updated_at") or run["started_at"])
    try:
        settings = json.loads(run.get("settings") or "{}")
    except ValueError:
        settings = {}
    stale_after = max(5.0, 5 * float(settings.get("heartbeat_s", 1.0) or 1.0))
    running = run.get("hb_state") in ("starting", "running", "stopping") and hb_age <= stale_after
    return {
        "running": running, "state": run.get("hb_state") if running or run.get("stopped_at") else "not responding",
        "run_id": run["id"], "pid": run["pid"], "host": run["host"], "watch_dir": run["watch_dir"],
        "model": run.get("model"), "model_id": run["model_id"], "backend": run["backend"],
        "started_at": run["started_at"], "stopped_at": run["stopped_at"], "exit_reason": run["exit_reason"],
        "heartbeat_age_s": hb_age, "stale_after_s": stale_after,
        "uptime_s": (now - run["started_at"]) if running else None,
        "queue_len": run.get("queue_len") if running else 0, "settling": run.get("settling") if running else 0,
        "processed_this_run": run.get("processed"), "errors_this_run": run.get("errors"),
        "throughput_1m_heartbeat": run.get("throughput_1m") if running else 0.0,
        "latency_p50_ms": run.get("latency_p50_ms"), "latency_p95_ms": run.get("latency_p95_ms"),
        "batches_this_run": run.get("batches"),
    }


def status_data(conn: sqlite3.Connection) -> dict[str, Any]:
    """What ``leukedge station status`` prints (and ``--json`` writes)."""
    now = time.time()
    live = station_state(conn, now)
    since = live["started_at"] if live and live.get("running") else None  # this run's rate, not a previous one's
    return {
        "station": live,
        "throughput_1m": sdb.recent_throughput(conn, 60.0, now, since=since),
        "totals": sdb.totals(conn),
        "samples": sdb.sample_totals(conn),
    }


# -- per sample ---------------------------------------------------------------------------------------------
def samples(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per sample over the current results: counts by status (any status), blasts among the classified
    (``ok``) cells, blast fraction with its 95 % Wilson interval, last update."""
    by: dict[Any, dict[str, Any]] = {}
    for r in conn.execute(
        "SELECT sample_id, status, COUNT(*) AS n, SUM(CASE WHEN status = 'ok' AND is_blast = 1 THEN 1 ELSE 0 END) AS b, "
        "MAX(done_at) AS last FROM results WHERE superseded = 0 GROUP BY sample_id, status"
    ):
        s = by.setdefault(r["sample_id"], {"sample_id": display_text(r["sample_id"]), "counts": {}, "n_blasts": 0,
                                           "last_result_at": None})
        s["counts"][str(r["status"])] = int(r["n"])
        s["n_blasts"] += int(r["b"] or 0)
        if r["last"] is not None and (s["last_result_at"] is None or r["last"] > s["last_result_at"]):
            s["last_result_at"] = r["last"]
    out = []
    for key in sorted(by, key=lambda k: (k is None, str(k))):
        s = by[key]
        n_ok = s["counts"].get("ok", 0)
        s.update(n_ok=n_ok, n_rejected=s["counts"].get("rejected", 0), n_error=s["counts"].get("error", 0),
                 n_files=sum(s["counts"].values()))
        s["blast_fraction"] = s["n_blasts"] / n_ok if n_ok else None
        ci = wilson_interval(s["n_blasts"], n_ok)
        s["blast_ci95"] = list(ci) if ci else None
        out.append(s)
    return out


# -- cells ----------------------------------------------------------------------------------------------------
CELL_FIELDS = ("id", "path", "sha256", "sample_id", "status", "error", "probability", "label", "is_blast",
               "model_id", "done_at")


def _ood_expr(cols: set[str]) -> str:
    """SQL that is true for a cell flagged out of distribution: a flag column, or a cell the station
    rejected as out of distribution (status ``rejected``, reason "out of distribution ...")."""
    parts = []
    flag = _first_col(cols, OOD_COLUMNS)
    if flag:
        parts.append(f"COALESCE({flag}, 0) != 0")
    if "reason" in cols:
        parts.append("(status = 'rejected' AND reason LIKE 'out of distribution%')")
    return "(" + " OR ".join(parts) + ")" if parts else "0"


def _cell_select(cols: set[str]) -> str:
    stain = _first_col(cols, STAIN_FALLBACK_COLUMNS)
    optional = [f"{_ood_expr(cols)} AS ood", f"{stain} AS stain_fallback" if stain else "NULL AS stain_fallback"]
    optional += [f"{c} AS {c}" if c in cols else f"NULL AS {c}" for c in ("reason", "ood_score", "path_bytes")]
    return ", ".join((*CELL_FIELDS, *optional))


def result_by_id(conn: sqlite3.Connection, result_id: int) -> dict[str, Any] | None:
    r = conn.execute(f"SELECT {_cell_select(result_columns(conn))} FROM results WHERE id = ?", (int(result_id),)).fetchone()
    return dict(r) if r else None


def current_cells(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every current (not superseded) result, with the fields the page, reviews and exports use."""
    sel = _cell_select(result_columns(conn))
    return [dict(r) for r in conn.execute(f"SELECT {sel} FROM results WHERE superseded = 0 ORDER BY sample_id, path")]


def _public_cell(c: dict[str, Any], review: dict[str, Any] | None) -> dict[str, Any]:
    p = c.get("probability")
    return {
        "id": c["id"], "sample_id": display_text(c.get("sample_id")), "name": display_text(os.path.basename(fs_path(c["path"]))),
        "status": c.get("status"), "error": display_text(c.get("error")), "reason": display_text(c.get("reason")),
        "probability": p, "ood_score": c.get("ood_score"),
        "label": display_text(c.get("label")), "is_blast": c.get("is_blast"), "done_at": c.get("done_at"),
        "ood": bool(c.get("ood")), "stain_fallback": bool(c.get("stain_fallback")),
        "borderline": p is not None and abs(p - DECISION_THRESHOLD) <= BORDERLINE_BAND,
        "review": None if review is None else {"label": review["label"], "reviewer": display_text(review["reviewer"]),
                                               "reviewed_at": review["reviewed_at"]},
    }


def recent_cells(conn: sqlite3.Connection, reviews: dict[tuple[str, str], dict[str, Any]], *,
                 sample: str | None = None, limit: int = 60, unreviewed_only: bool = False,
                 order: str = "priority") -> list[dict[str, Any]]:
    """The newest cells (of one sample, if given); with ``order="priority"`` those flagged out of
    distribution first, then those near the decision threshold, then the rest, newest first within
    each group (``"newest"``: simply newest first). Thumbnails are addressed by ``id`` (the result's row id)."""
    if order not in ("priority", "newest"):
        raise ValueError("order must be 'priority' or 'newest'")
    cols = result_columns(conn)
    prio = f"CASE WHEN {_ood_expr(cols)} THEN 0 " + (
        f"WHEN probability IS NOT NULL AND ABS(probability - {DECISION_THRESHOLD}) <= {BORDERLINE_BAND} THEN 1 ELSE 2 END")
    if order == "newest":
        prio = "'newest'"  # a constant (a bare integer would name a column)
    where, args = "superseded = 0", []
    if sample is not None:
        where += " AND sample_id = ?"
        args.append(sample)
    # over-fetch when unreviewed cells are asked for: reviewed ones are dropped after the query
    n = max(1, min(int(limit), 1000))
    fetch = n * 4 + len(reviews) if unreviewed_only else n
    q = f"SELECT {_cell_select(cols)} FROM results WHERE {where} ORDER BY {prio}, done_at DESC, id DESC LIMIT ?"
    out = []
    for r in conn.execute(q, (*args, fetch)):
        c = dict(r)
        review = reviews.get((c["path"], c["sha256"]))
        if unreviewed_only and review is not None:
            continue
        out.append(_public_cell(c, review))
        if len(out) >= n:
            break
    return out


def live(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    """The live panel: station state plus throughput over the last minute from the results."""
    now = time.time() if now is None else now
    st = station_state(conn, now)
    if st is not None:
        for k in ("watch_dir", "host", "model", "model_id", "backend", "exit_reason"):
            st[k] = display_text(st[k])
    return {"station": st, "throughput_1m": sdb.recent_throughput(conn, 60.0, now), "now": now}


def overview(conn: sqlite3.Connection, rconn: sqlite3.Connection | None) -> dict[str, Any]:
    """Everything the page polls, from one read snapshot: live panel, per-sample table, totals by
    status, review agreement."""
    with sdb.snapshot(conn):
        data = live(conn)
        data["samples"] = samples(conn)
        data["status_counts"] = {str(r[0]): int(r[1]) for r in conn.execute(
            "SELECT status, COUNT(*) FROM results WHERE superseded = 0 GROUP BY status")}
        reviews = rv.latest_reviews(rconn)
        cells = reviewed_cells(conn, reviews)
    data["agreement"] = rv.agreement(cells, reviews).as_dict()
    return data


def reviewed_cells(conn: sqlite3.Connection, reviews: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """The current results that have a review (path, sha256, status, is_blast): plain tuples are scanned,
    dicts made only for the reviewed ones (5,000 cells: ~2 ms instead of ~30 ms)."""
    if not reviews:
        return []
    cur = conn.cursor()
    cur.row_factory = None
    return [{"path": p, "sha256": h, "status": st, "is_blast": b}
            for p, h, st, b in cur.execute("SELECT path, sha256, status, is_blast FROM results WHERE superseded = 0")
            if (p, h) in reviews]
