"""The station's screen: a web page, a JSON API, Prometheus metrics (``leukedge station serve``).

A Starlette application (extra ``leukedge[station-ui]``), served by uvicorn. It runs in its own
process next to ``leukedge station run`` and opens the station database **read-only** for every
request (SQLite WAL: readers never block the writer), so the classifying loop never waits for the
page. Reviews go to their own file (:mod:`leukedge.station.reviews`).

Routes::

    GET  /                             the page (static, offline: its script and style are in the package)
    GET  /static/app.js, /static/app.css
    GET  /api/overview                 live panel + per-sample table + status totals + agreement
    GET  /api/samples                  per-sample counts, blasts, blast fraction with 95 % Wilson interval
    GET  /api/live                     station state (queue, settling, throughput, latency, model, uptime)
    GET  /api/cells?sample=&limit=&unreviewed=1&order=priority|newest   recent cells, OOD and borderline first
    GET  /api/cells/{id}/thumbnail.png a cell's thumbnail, by result id (never by a path from the URL)
    GET  /api/reviews?limit=           newest reviews
    POST /api/reviews                  {"result_id", "label": all|hem|not_a_cell, "reviewer"} (token if set)
    GET  /api/config                   whether writes need a token, review labels
    GET  /metrics                      Prometheus text format
    GET  /healthz                      200 when the database is readable, 503 otherwise

Safe by default: the CLI binds loopback; requests must name a loopback host (DNS rebinding) unless
the server was opened to other interfaces on purpose; writes need ``application/json``, a same-origin
``Origin`` (if sent) and, when a token is set, ``Authorization: Bearer <token>``; every response
carries a strict Content-Security-Policy, and the page inserts data only as text.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._version import __version__
from . import dashboard as dash
from . import db as sdb
from . import reviews as rv

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
THUMB_PX = 128
THUMB_CACHE = 512
THUMB_MAX_BYTES = 64 * 1024 * 1024      # a cell image is well under 1 MB: never read more for a thumbnail
THUMB_MAX_PIXELS = 16_000_000           # nor decode more (a decompression bomb gets no thumbnail)
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def is_loopback(host: str) -> bool:
    import ipaddress

    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass
class WebSettings:
    db_path: Path
    reviews_path: Path
    token: str | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS   # ("*",) when opened to other interfaces
    started_at: float = field(default_factory=time.time)


class _NotReadable(Exception):
    """The station database is missing or damaged; the message says which and what to do."""


class _Thumbnails:
    """Small PNGs of cells, cached by (result id, sha256)."""

    def __init__(self, size: int = THUMB_PX, capacity: int = THUMB_CACHE) -> None:
        self.size, self.capacity = size, capacity
        self._cache: collections.OrderedDict[tuple[int, str], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, cell: dict[str, Any], watch_dirs: list[str]) -> bytes | None:
        key = (int(cell["id"]), str(cell["sha256"]))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        png = self._render(cell, watch_dirs)
        if png is not None:
            with self._lock:
                self._cache[key] = png
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return png

    def _render(self, cell: dict[str, Any], watch_dirs: list[str]) -> bytes | None:
        """Read the stored path of the result (only below a watch folder the station ran on), check the
        content is still what was classified, decode, shrink to ``size`` px on the long side."""
        import hashlib

        from .. import _native
        from .._util import open_regular
        from ..synth import encode_png

        path = os.path.abspath(sdb.cell_fs_path(cell))
        if not any(path.startswith(os.path.join(w, "")) for w in watch_dirs):
            return None
        try:
            with open_regular(path, THUMB_MAX_BYTES) as f:
                data = f.read()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != cell["sha256"]:
            return None  # replaced since it was classified: not the cell the result is about
        try:
            img = _native.decode(data, THUMB_MAX_PIXELS)
        except Exception:  # noqa: BLE001 - any undecodable file simply has no thumbnail
            return None
        h, w = img.shape[:2]
        s = self.size / max(h, w)
        if s < 1:
            img = _native.resize(img, max(1, round(w * s)), max(1, round(h * s)), "box")
        return encode_png(img)


class StationCollector:
    """Prometheus metrics read from the station database on every scrape."""

    def __init__(self, web: "StationWeb") -> None:
        self.web = web

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("leukedge_station_database_readable", "1 when the station database can be read")
        try:
            with self.web.reading() as conn:
                metrics = list(self._from_db(conn))
        except _NotReadable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metrics
        rconn = rv.connect(self.web.s.reviews_path, readonly=True)
        g = GaugeMetricFamily("leukedge_station_reviews", "Reviewed cells by reviewed label (newest review)", labels=["label"])
        counts = collections.Counter(r["label"] for r in rv.latest_reviews(rconn).values())
        for lab in rv.REVIEW_LABELS:
            g.add_metric([lab], counts.get(lab, 0))
        if rconn is not None:
            rconn.close()
        yield g

    def _from_db(self, conn: sqlite3.Connection) -> Iterator[Any]:
        live = dash.live(conn)
        st = live["station"] or {}
        yield _gauge("leukedge_station_up", "1 while the station's heartbeat is fresh", 1 if st.get("running") else 0)
        info = GaugeMetricFamily("leukedge_station_info", "The latest station run", labels=["model_id", "backend", "run_id"])
        if st:
            info.add_metric([str(st.get("model_id") or ""), str(st.get("backend") or ""), str(st.get("run_id"))], 1)
        yield info
        yield _gauge("leukedge_station_queue_length", "Complete files waiting for a batch", st.get("queue_len") or 0)
        yield _gauge("leukedge_station_settling", "Files seen but not yet complete", st.get("settling") or 0)
        yield _gauge("leukedge_station_heartbeat_age_seconds", "Seconds since the last heartbeat",
                     float(st["heartbeat_age_s"]) if st else float("nan"))
        yield _gauge("leukedge_station_throughput_cells_per_second", "Results per second over the last minute",
                     live["throughput_1m"])
        cells = GaugeMetricFamily("leukedge_station_cells", "Current results (one per file) by status, label and model",
                                  labels=["status", "label", "model_id"])
        for r in conn.execute("SELECT status, COALESCE(label, ''), COALESCE(model_id, ''), COUNT(*) FROM results "
                              "WHERE superseded = 0 GROUP BY 1, 2, 3"):
            cells.add_metric([str(r[0]), str(r[1]), str(r[2])], int(r[3]))
        yield cells
        yield _histogram(conn, "leukedge_station_latency_seconds", "File first seen -> result committed",
                         "SELECT COALESCE(model_id, '') AS m, latency_ms / 1000.0 AS x FROM results WHERE latency_ms IS NOT NULL",
                         LATENCY_BUCKETS_S, "model_id")
        yield _histogram(conn, "leukedge_station_batch_size", "Files per batch sent to the engine",
                         "SELECT '' AS m, size AS x FROM batches WHERE state = 'done'", BATCH_BUCKETS, None)


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """Errors that mean the file is not (or no longer) a readable station database."""
    if not isinstance(exc, sqlite3.OperationalError):
        return True  # "file is not a database", "database disk image is malformed"
    msg = str(exc).lower()
    return any(m in msg for m in ("no such table", "no such column", "malformed", "not a database", "disk i/o",
                                  "unable to open"))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], float(value))
    return g


def _histogram(conn: sqlite3.Connection, name: str, doc: str, select: str, buckets: tuple[float, ...],
               label: str | None) -> HistogramMetricFamily:
    """A Prometheus histogram of ``x`` from ``select`` (columns ``m``, ``x``), one series per ``m``, counted in SQL."""
    sums = ", ".join(f"SUM(x <= {float(b)!r})" for b in buckets)
    h = HistogramMetricFamily(name, doc, labels=[label] if label else None)
    for r in conn.execute(f"SELECT m, {sums}, COUNT(*), SUM(x) FROM ({select}) GROUP BY m"):
        cum = [(repr(float(b)), int(r[i + 1] or 0)) for i, b in enumerate(buckets)]
        cum.append(("+Inf", int(r[len(buckets) + 1])))
        h.add_metric([str(r[0])] if label else [], cum, float(r[len(buckets) + 2] or 0.0))
    return h


class StationWeb:
    """Request handlers over one station database (read-only) and its reviews file."""

    def __init__(self, settings: WebSettings) -> None:
        self.s = settings
        self.thumbs = _Thumbnails()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StationCollector(self))
        self._rw_lock = threading.Lock()

    # -- database ---------------------------------------------------------------------------------------
    def reading(self) -> "contextlib.AbstractContextManager[sqlite3.Connection]":
        """``with web.reading() as conn``: the station database, read-only, closed afterwards; a missing or
        damaged database raises :class:`_NotReadable` with the station's one-line explanation."""
        @contextlib.contextmanager
        def cm() -> Iterator[sqlite3.Connection]:
            try:
                conn = sdb.connect(self.s.db_path, readonly=True, timeout=2.0)
            except FileNotFoundError as exc:
                raise _NotReadable(f"{exc}; the page fills in once the station has started") from exc
            except sdb.DatabaseDamaged as exc:
                raise _NotReadable(self._creating(exc) or str(exc)) from exc
            try:
                yield conn
            except sqlite3.DatabaseError as exc:
                if not _is_damage(exc):
                    raise  # a plain error (a bug, a lock) is a 500, not "damaged"
                raise _NotReadable(self._creating(exc) or str(sdb.damaged(self.s.db_path, exc))) from exc
            finally:
                conn.close()

        return cm()

    def _creating(self, exc: BaseException) -> str | None:
        """A database that lacks tables and changed in the last 30 s is being created by a starting
        station, not damaged: the message says so."""
        if "no such table" not in str(exc):
            return None
        p = self.s.db_path
        newest = max((os.stat(f).st_mtime for f in (p, Path(f"{p}-wal")) if os.path.exists(f)), default=0.0)
        if time.time() - newest > 30:
            return None
        return f"station database {p} is being created by a starting station; the page fills in in a moment"

    def _json(self, fn: Callable[[sqlite3.Connection], Any]) -> Response:
        try:
            with self.reading() as conn:
                return _json_response(fn(conn))
        except _NotReadable as exc:
            return _json_response({"error": str(exc), "database": str(self.s.db_path)}, 503)

    def _reviews(self) -> dict[tuple[str, str], dict[str, Any]]:
        rconn = rv.connect(self.s.reviews_path, readonly=True)
        try:
            return rv.latest_reviews(rconn)
        finally:
            if rconn is not None:
                rconn.close()

    # -- pages ------------------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return _static("index.html", "text/html; charset=utf-8")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:  # a fixed list: nothing from the URL ever reaches the file system
            return _json_response({"error": "not found"}, 404)
        return _static(name, STATIC_FILES[name])

    # -- API --------------------------------------------------------------------------------------------
    def api_overview(self, request: Request) -> Response:
        def fn(conn: sqlite3.Connection) -> Any:
            rconn = rv.connect(self.s.reviews_path, readonly=True)
            try:
                data = dash.overview(conn, rconn)
            finally:
                if rconn is not None:
                    rconn.close()
            data["database"] = sdb.display_text(str(self.s.db_path))
            data["note"] = getattr(conn, "note", "")
            data["server_uptime_s"] = time.time() - self.s.started_at
            return data
        return self._json(fn)

    def api_samples(self, request: Request) -> Response:
        return self._json(lambda conn: {"samples": dash.samples(conn)})

    def api_live(self, request: Request) -> Response:
        return self._json(dash.live)

    def api_cells(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "60"))
        except ValueError:
            return _json_response({"error": "limit must be a number"}, 400)
        sample = q.get("sample") or None
        unreviewed = q.get("unreviewed", "") in ("1", "true", "yes")
        order = q.get("order", "priority")
        if order not in ("priority", "newest"):
            return _json_response({"error": "order must be priority or newest"}, 400)
        reviews = self._reviews()
        return self._json(lambda conn: {"cells": dash.recent_cells(conn, reviews, sample=sample, limit=limit,
                                                                   unreviewed_only=unreviewed, order=order)})

    def api_thumbnail(self, request: Request) -> Response:
        rid = int(request.path_params["result_id"])
        try:
            with self.reading() as conn:
                cell = dash.result_by_id(conn, rid)
                watch = [os.path.abspath(sdb.fs_path(r[0])) for r in
                         conn.execute("SELECT DISTINCT watch_dir FROM runs WHERE watch_dir IS NOT NULL")]
        except _NotReadable as exc:
            return _json_response({"error": str(exc)}, 503)
        if cell is None:
            return _json_response({"error": f"no result {rid}"}, 404)
        png = self.thumbs.get(cell, watch)
        if png is None:
            return _json_response({"error": f"result {rid} has no image to show (unreadable, changed or gone)"}, 404)
        return Response(png, media_type="image/png", headers={**SECURITY_HEADERS, "Cache-Control": "private, max-age=3600"})

    def api_config(self, request: Request) -> Response:
        return _json_response({"token_required": bool(self.s.token), "review_labels": list(rv.REVIEW_LABELS),
                               "version": __version__, "borderline_band": dash.BORDERLINE_BAND})

    def api_reviews_list(self, request: Request) -> Response:
        try:
            limit = max(1, min(int(request.query_params.get("limit", "50")), 1000))
        except ValueError:
            return _json_response({"error": "limit must be a number"}, 400)
        rconn = rv.connect(self.s.reviews_path, readonly=True)
        if rconn is None:
            return _json_response({"reviews": [], "count": 0})
        try:
            rows = [{k: sdb.display_text(v) for k, v in dict(r).items() if k != "path"}
                    for r in rconn.execute("SELECT * FROM reviews ORDER BY id DESC LIMIT ?", (limit,))]
            return _json_response({"reviews": rows, "count": rv.review_count(rconn)})
        finally:
            rconn.close()

    async def api_review_post(self, request: Request) -> Response:
        refused = self._refuse_write(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
            rid = int(body["result_id"])
            label, reviewer = str(body["label"]), str(body["reviewer"])
        except (ValueError, KeyError, TypeError):
            return _json_response({"error": 'send JSON {"result_id": N, "label": "all|hem|not_a_cell", "reviewer": "..."}'}, 400)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self._store_review, rid, label, reviewer)

    def _store_review(self, rid: int, label: str, reviewer: str) -> Response:
        try:
            with self.reading() as conn:
                cell = dash.result_by_id(conn, rid)
        except _NotReadable as exc:
            return _json_response({"error": str(exc)}, 503)
        if cell is None:
            return _json_response({"error": f"no result {rid}"}, 404)
        try:
            with self._rw_lock:
                rconn = rv.connect(self.s.reviews_path)
                assert rconn is not None
                try:
                    row = rv.add_review(rconn, cell, label, reviewer)
                finally:
                    rconn.close()
        except ValueError as exc:
            return _json_response({"error": str(exc)}, 400)
        except sqlite3.Error as exc:  # e.g. a read-only folder: say where, keep serving
            return _json_response({"error": f"cannot store the review in {self.s.reviews_path}: {exc} "
                                            "(start `station serve` with a writable --reviews-db)"}, 503)
        return _json_response({"review": {k: sdb.display_text(v) for k, v in row.items() if k != "path"}}, 201)

    def _refuse_write(self, request: Request) -> Response | None:
        """Writes need JSON (no cross-site form post), a same-origin ``Origin`` if one is sent, and the token if set."""
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _json_response({"error": "send the review as application/json"}, 415)
        origin = request.headers.get("origin")
        if origin is not None:
            from urllib.parse import urlsplit

            if urlsplit(origin).netloc != request.headers.get("host", ""):
                return _json_response({"error": "cross-origin write refused"}, 403)
        if self.s.token:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.s.token.encode()):
                return _json_response({"error": "this station needs a token for reviews (Authorization: Bearer ...)"}, 401)
        return None

    # -- fleet ------------------------------------------------------------------------------------------
    def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def healthz(self, request: Request) -> Response:
        try:
            with self.reading() as conn:
                st = dash.station_state(conn)
        except _NotReadable as exc:
            return _json_response({"ok": False, "database": "unreadable", "error": str(exc)}, 503)
        return _json_response({"ok": True, "database": "readable",
                               "station": "none yet" if st is None else ("up" if st["running"] else "down"),
                               "heartbeat_age_s": None if st is None else st["heartbeat_age_s"]})


def _json_response(data: Any, status: int = 200) -> Response:
    import json

    # ASCII JSON: any odd character of a file name travels as a \u escape, never as raw bytes
    body = json.dumps(_finite(data), ensure_ascii=True, allow_nan=False, default=str, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=SECURITY_HEADERS)


def _finite(v: Any) -> Any:
    """NaN and infinities (not JSON) as null."""
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _static(name: str, media_type: str) -> Response:
    data = resources.files("leukedge.station").joinpath("static").joinpath(name).read_bytes()
    return Response(data, media_type=media_type, headers=SECURITY_HEADERS)


def create_app(settings: WebSettings) -> Starlette:
    """The Starlette application over ``settings.db_path``."""
    web = StationWeb(settings)
    routes = [
        Route("/", web.index),
        Route("/static/{name}", web.static),
        Route("/api/overview", web.api_overview),
        Route("/api/samples", web.api_samples),
        Route("/api/live", web.api_live),
        Route("/api/cells", web.api_cells),
        Route("/api/cells/{result_id:int}/thumbnail.png", web.api_thumbnail),
        Route("/api/config", web.api_config),
        Route("/api/reviews", web.api_reviews_list, methods=["GET"]),
        Route("/api/reviews", web.api_review_post, methods=["POST"]),
        Route("/metrics", web.metrics),
        Route("/healthz", web.healthz),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.web = web
    return app
