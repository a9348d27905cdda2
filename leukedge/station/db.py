"""SQLite store of the station: one row per (file path, content hash), batches, runs, heartbeat.

The database runs in WAL mode so that ``leukedge station status`` / ``export`` can read while the
station writes.  Every batch is committed in one transaction; ``UNIQUE(path, sha256)`` makes a
restart idempotent (a file is never stored twice, a replaced file -- new content, new hash -- is
stored again and the older row is marked ``superseded``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .._util import path_raw, path_text

SCHEMA_VERSION = 2  # 2: status 'rejected'; reason, stain_fallback, ood_score, path_bytes, ctime_ns, inode (issue 25)
DB_FILENAME = ".leukedge-station.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id              INTEGER PRIMARY KEY,
    started_at      REAL NOT NULL,
    stopped_at      REAL,
    exit_reason     TEXT,
    pid             INTEGER,
    host            TEXT,
    watch_dir       TEXT,
    model           TEXT,
    model_id        TEXT,
    preprocess_hash TEXT,
    backend         TEXT,
    settings        TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    id            INTEGER PRIMARY KEY,
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    size          INTEGER NOT NULL,
    reason        TEXT NOT NULL,      -- full | deadline | flush
    state         TEXT NOT NULL,      -- running | done | failed
    opened_at     REAL NOT NULL,      -- wall time the oldest item entered the queue
    started_at    REAL NOT NULL,
    done_at       REAL,
    preprocess_ms REAL,
    compute_ms    REAL,
    total_ms      REAL,
    n_ok          INTEGER,
    n_error       INTEGER
);
CREATE TABLE IF NOT EXISTS results (
    id              INTEGER PRIMARY KEY,
    path            TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    size            INTEGER,
    mtime_ns        INTEGER,
    sample_id       TEXT,
    status          TEXT NOT NULL CHECK (status IN ('ok', 'error', 'rejected')),
    error           TEXT,
    probability     REAL,
    label           TEXT,
    is_blast        INTEGER,
    model_id        TEXT,
    preprocess_hash TEXT,
    backend         TEXT,
    run_id          INTEGER REFERENCES runs(id),
    batch_id        INTEGER REFERENCES batches(id),
    detected_at     REAL,             -- wall time the file (final name) was first seen
    ready_at        REAL,             -- wall time it was complete (settled or renamed) and hashed
    started_at      REAL,             -- wall time its batch went to the engine
    done_at         REAL,             -- wall time its result was committed
    queued_ms       REAL,             -- started_at - ready_at
    preprocess_ms   REAL,
    compute_ms      REAL,
    latency_ms      REAL,             -- done_at - detected_at
    superseded      INTEGER NOT NULL DEFAULT 0,
    reason          TEXT,             -- why it was rejected (cell quality gate, out of distribution), or for an
                                      -- ok row a note on a file used with a caveat: a multi-page TIFF, page 1 of N
    stain_fallback  INTEGER,          -- 1: stain normalisation fell back to the unnormalised image
    ood_score       REAL,             -- the model's energy score (higher = less like its training cells)
    path_bytes      BLOB,             -- the exact file name (os.fsencode) when `path` had to escape it
    ctime_ns        INTEGER,          -- with inode: a replaced file of equal size and mtime is re-hashed
    inode           INTEGER,
    UNIQUE (path, sha256)
);
CREATE INDEX IF NOT EXISTS results_sample ON results(sample_id, superseded);
CREATE INDEX IF NOT EXISTS results_done ON results(done_at);
CREATE INDEX IF NOT EXISTS results_path ON results(path);
CREATE TABLE IF NOT EXISTS heartbeat (
    run_id        INTEGER PRIMARY KEY REFERENCES runs(id),
    updated_at    REAL NOT NULL,
    state         TEXT NOT NULL,      -- starting | running | stopping | stopped | failed
    queue_len     INTEGER NOT NULL,   -- complete files waiting for a batch
    settling      INTEGER NOT NULL,   -- files seen but not yet complete
    processed     INTEGER NOT NULL,   -- results committed by this run
    errors        INTEGER NOT NULL,
    throughput_1m REAL NOT NULL,      -- results per second over the last minute
    latency_p50_ms REAL,
    latency_p95_ms REAL,
    batches       INTEGER NOT NULL
);
"""


class DatabaseDamaged(RuntimeError):
    """The station database cannot be read: corrupt, not a database, or unreadable. The message says
    where the database and its write-ahead log are."""


def damaged(path: str | os.PathLike, exc: BaseException) -> DatabaseDamaged:
    """A :class:`DatabaseDamaged` for ``path`` that says where its WAL / shared-memory files are."""
    path = Path(path)
    side = []
    for suffix in ("-wal", "-shm"):
        f = Path(f"{path}{suffix}")
        if f.exists():
            side.append(f"{f} ({f.stat().st_size:,} bytes)")
    where = ("; its write-ahead log: " + ", ".join(side)) if side else "; there is no write-ahead log (-wal) beside it"
    return DatabaseDamaged(
        f"station database {path} is damaged or not a station database ({exc}){where}. Keep these files "
        "for inspection (`sqlite3 FILE .recover` can often rescue the rows), move them away and start the "
        "station again: it classifies the folder anew into a fresh database."
    )


def is_disk_full(exc: BaseException) -> bool:
    """True for SQLite's "database or disk is full" (SQLITE_FULL), which is not damage."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code == getattr(sqlite3, "SQLITE_FULL", 13) or "disk is full" in str(exc).lower()


class DiskFull(RuntimeError):
    """The disk holding the station database is full (the database itself is fine)."""


def disk_full(path: str | os.PathLike) -> DiskFull:
    import shutil

    try:
        free = f"{shutil.disk_usage(Path(path).parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"the disk holding the station database {path} is full ({free}); the database and its results "
                    "are intact: free some space and start the station again")


class ReadOnlyConnection(sqlite3.Connection):
    """A read-only connection; ``note`` says what a reader should know (e.g. opened without its WAL)."""

    note: str = ""


def sqlite_uri(path: Path, **params: str) -> str:
    from urllib.parse import quote

    return f"file:{quote(str(path.resolve()))}?" + "&".join(f"{k}={v}" for k, v in params.items())


def connect(path: str | os.PathLike, *, readonly: bool = False, timeout: float = 30.0) -> sqlite3.Connection:
    """Open the station database (creating the schema unless ``readonly``).

    ``readonly``: for ``status`` / ``export``. A WAL database normally needs its ``-shm`` file even to
    be read; on a read-only medium (a copied card, a write-protected share) that cannot be created,
    so the database is then opened as immutable. A corrupt file raises :class:`DatabaseDamaged`.
    """
    path = Path(path)
    if readonly:
        if not path.exists():
            raise FileNotFoundError(f"station database {path} does not exist (has the station run with this --db?)")
        last: BaseException | None = None
        for params in ({"mode": "ro"}, {"mode": "ro", "immutable": "1"}):
            try:
                conn = sqlite3.connect(sqlite_uri(path, **params), uri=True, timeout=timeout, isolation_level=None,
                                       factory=ReadOnlyConnection)
                wal = Path(f"{path}-wal")
                if "immutable" in params and wal.is_file() and wal.stat().st_size > 0:
                    conn.note = (f"{path} is on a read-only medium and was opened without its write-ahead log "
                                 f"{wal} ({wal.stat().st_size:,} bytes): the newest results may be missing; copy "
                                 "the database and its -wal file to a writable folder to see everything")
            except sqlite3.Error as exc:
                last = exc
                continue
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
                conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                return conn
            except sqlite3.OperationalError as exc:
                conn.close()
                last = exc
                if "no such table" in str(exc):
                    raise damaged(path, exc) from exc
            except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
                conn.close()
                raise damaged(path, exc) from exc
        raise damaged(path, last or RuntimeError("cannot open")) from last
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _connect_rw(path, timeout)
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            raise
        if is_disk_full(exc):  # it used to be called "damaged ... move them away"
            raise disk_full(path) from exc
        raise damaged(path, exc) from exc


def _connect_rw(path: Path, timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise RuntimeError(f"{path}: could not switch SQLite to WAL mode (got {mode!r}); is it on a network file system?")
    # WAL + NORMAL is consistent after a crash; a commit lost to a power cut only means the file is
    # classified again on the next start (it is not in the database), never that a row is corrupt.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(_SCHEMA)
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) == 1:
        _migrate_1_to_2(conn)
    elif int(row[0]) != SCHEMA_VERSION:
        raise RuntimeError(f"{path}: station database schema {row[0]} is not supported (expected {SCHEMA_VERSION})")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


_V1_RESULT_COLUMNS = ("id", "path", "sha256", "size", "mtime_ns", "sample_id", "status", "error", "probability", "label",
                      "is_blast", "model_id", "preprocess_hash", "backend", "run_id", "batch_id", "detected_at", "ready_at",
                      "started_at", "done_at", "queued_ms", "preprocess_ms", "compute_ms", "latency_ms", "superseded")


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: ``results`` allows status ``rejected`` and gains ``reason``, ``stain_fallback``,
    ``ood_score``. A CHECK constraint cannot be altered in SQLite, so the table is rebuilt (SQLite's
    documented 12-step way, foreign keys off, in one transaction: all or nothing); row ids are kept."""
    table = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS results ("):]
    table = table[: table.index(");") + 2].replace("IF NOT EXISTS results (", "results_v2 (")
    extra = [r[1] for r in conn.execute("PRAGMA table_info(results)") if r[1] not in _V1_RESULT_COLUMNS]
    cols = ", ".join((*_V1_RESULT_COLUMNS, *extra))  # columns other changes added survive the rebuild
    with transaction(conn):
        conn.execute(table)
        for c in extra:
            conn.execute(f"ALTER TABLE results_v2 ADD COLUMN {c}")
        conn.execute(f"INSERT INTO results_v2({cols}) SELECT {cols} FROM results")
        conn.execute("DROP TABLE results")
        conn.execute("ALTER TABLE results_v2 RENAME TO results")
        for stmt in _SCHEMA.split(";"):
            if "CREATE INDEX IF NOT EXISTS" in stmt and " ON results(" in stmt:
                conn.execute(stmt)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


def has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    """True when ``table`` has ``column`` (a read-only connection may hold an older schema)."""
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


class transaction:
    """``with transaction(conn):`` -- BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


@contextlib.contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Read inside one transaction: a consistent view while the station keeps writing (WAL). On an
    error the transaction is left to the connection's close (the error is what the caller reports)."""
    conn.execute("BEGIN")
    yield conn
    conn.execute("COMMIT")


@dataclass
class KnownFile:
    sha256: str
    size: int | None
    mtime_ns: int | None
    superseded: bool
    ctime_ns: int | None = None  # with the inode: a file replaced by one of equal size and mtime is noticed
    inode: int | None = None


def load_known(conn: sqlite3.Connection) -> dict[str, dict[str, KnownFile]]:
    """path -> {sha256 -> KnownFile} for every stored result (used to resume after a restart). Paths are
    the file system's (``os.fsdecode`` of the stored exact bytes where the name is not plain UTF-8)."""
    known: dict[str, dict[str, KnownFile]] = {}
    for r in conn.execute("SELECT path, sha256, size, mtime_ns, superseded, path_bytes, ctime_ns, inode FROM results"):
        path = os.fsdecode(bytes(r["path_bytes"])) if r["path_bytes"] is not None else r["path"]
        known.setdefault(path, {})[r["sha256"]] = KnownFile(r["sha256"], r["size"], r["mtime_ns"], bool(r["superseded"]),
                                                            r["ctime_ns"], r["inode"])
    return known


def start_run(conn: sqlite3.Connection, *, watch_dir: str, model: str, model_id: str, preprocess_hash: str,
              backend: str, settings: dict[str, Any]) -> int:
    now = time.time()
    with transaction(conn):
        # A run that never wrote stopped_at was killed; say so instead of leaving it "running".
        conn.execute("UPDATE runs SET exit_reason = 'killed (no clean shutdown recorded)' WHERE stopped_at IS NULL")
        conn.execute("UPDATE heartbeat SET state = 'dead' WHERE state NOT IN ('stopped', 'failed', 'dead')")
        conn.execute("UPDATE batches SET state = 'failed' WHERE state = 'running'")
        cur = conn.execute(
            "INSERT INTO runs(started_at, pid, host, watch_dir, model, model_id, preprocess_hash, backend, settings) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now, os.getpid(), socket.gethostname(), path_text(watch_dir), path_text(model), model_id, preprocess_hash, backend,
             json.dumps(settings, sort_keys=True, default=str)),
        )
        run_id = int(cur.lastrowid or 0)
        conn.execute(
            "INSERT INTO heartbeat(run_id, updated_at, state, queue_len, settling, processed, errors, throughput_1m, batches) "
            "VALUES (?, ?, 'starting', 0, 0, 0, 0, 0.0, 0)",
            (run_id, now),
        )
    return run_id


def live_station(conn: sqlite3.Connection, stale_after_s: float = 5.0) -> dict[str, Any] | None:
    """Another station that is still writing to this database (fresh heartbeat, process alive), if any."""
    r = conn.execute(
        "SELECT r.id, r.pid, r.host, r.watch_dir, h.updated_at, h.state FROM runs r JOIN heartbeat h ON h.run_id = r.id "
        "WHERE h.state IN ('starting', 'running', 'stopping') ORDER BY r.id DESC LIMIT 1"
    ).fetchone()
    if r is None or time.time() - r["updated_at"] > stale_after_s:
        return None
    if r["host"] == socket.gethostname():
        if r["pid"] == os.getpid():
            return None
        try:
            os.kill(int(r["pid"]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        if _is_zombie(int(r["pid"])):  # killed (kill -9) but not yet reaped by its parent: dead
            return None
    return dict(r)


def _is_zombie(pid: int) -> bool:
    """True when ``pid`` has exited but is not yet reaped (state ``Z`` in /proc; False where unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses, so split at the last ")"
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def previous_models(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT DISTINCT model_id, preprocess_hash FROM results WHERE model_id IS NOT NULL"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def finish_run(conn: sqlite3.Connection, run_id: int, reason: str, state: str = "stopped") -> None:
    with transaction(conn):
        conn.execute("UPDATE runs SET stopped_at = ?, exit_reason = ? WHERE id = ?", (time.time(), reason, run_id))
        conn.execute("UPDATE heartbeat SET state = ?, updated_at = ?, queue_len = 0, settling = 0 WHERE run_id = ?",
                     (state, time.time(), run_id))


def write_heartbeat(conn: sqlite3.Connection, run_id: int, **fields: Any) -> None:
    cols = ", ".join(f"{k} = ?" for k in fields)
    with transaction(conn):
        conn.execute(f"UPDATE heartbeat SET updated_at = ?, {cols} WHERE run_id = ?",
                     (time.time(), *fields.values(), run_id))


# -- reading -------------------------------------------------------------------------------------

SAMPLE_COLUMNS = ("sample_id", "n_files", "n_cells", "n_blasts", "blast_fraction", "n_errors", "n_rejected",
                  "mean_probability", "first_result_at", "last_result_at", "model_ids")


def sample_totals(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per-sample totals over the current (not superseded) result of every file. ``n_cells`` and the blast
    fraction count classified cells only: rejected frames (``n_rejected``) and errors are counted apart."""
    rows = conn.execute(
        """
        SELECT sample_id,
               COUNT(*)                                        AS n_files,
               SUM(status = 'ok')                              AS n_cells,
               SUM(status = 'ok' AND is_blast = 1)             AS n_blasts,
               SUM(status = 'error')                           AS n_errors,
               SUM(status = 'rejected')                        AS n_rejected,
               AVG(CASE WHEN status = 'ok' THEN probability END) AS mean_probability,
               MIN(done_at)                                    AS first_result_at,
               MAX(done_at)                                    AS last_result_at,
               GROUP_CONCAT(DISTINCT model_id)                 AS model_ids
        FROM results WHERE superseded = 0
        GROUP BY sample_id ORDER BY sample_id
        """
    ).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["n_cells"] = int(d["n_cells"] or 0)
        d["n_blasts"] = int(d["n_blasts"] or 0)
        d["n_errors"] = int(d["n_errors"] or 0)
        d["n_rejected"] = int(d["n_rejected"] or 0)
        d["blast_fraction"] = (d["n_blasts"] / d["n_cells"]) if d["n_cells"] else None
        out.append({k: d.get(k) for k in SAMPLE_COLUMNS})
    return out


CELL_COLUMNS = ("path", "sample_id", "sha256", "status", "error", "probability", "label", "is_blast", "model_id",
                "preprocess_hash", "backend", "batch_id", "detected_at", "done_at", "queued_ms", "preprocess_ms",
                "compute_ms", "latency_ms", "reason", "stain_fallback", "ood_score")
_V2_CELL_COLUMNS = ("reason", "stain_fallback", "ood_score")


def cell_rows(conn: sqlite3.Connection) -> Iterator[dict[str, Any]]:
    new = has_column(conn, "results", "reason")  # a schema-1 database opened read-only has none of them
    cols = ", ".join(c if new or c not in _V2_CELL_COLUMNS else f"NULL AS {c}" for c in CELL_COLUMNS)
    for r in conn.execute(f"SELECT {cols} FROM results WHERE superseded = 0 ORDER BY sample_id, path"):
        yield dict(r)


def latest_run(conn: sqlite3.Connection) -> dict[str, Any] | None:
    r = conn.execute(
        "SELECT r.*, h.updated_at AS hb_updated_at, h.state AS hb_state, h.queue_len, h.settling, h.processed, "
        "h.errors, h.throughput_1m, h.latency_p50_ms, h.latency_p95_ms, h.batches "
        "FROM runs r LEFT JOIN heartbeat h ON h.run_id = r.id ORDER BY r.id DESC LIMIT 1"
    ).fetchone()
    return dict(r) if r else None


def throughput(n_done: int, now: float, since: float | None, window_s: float = 60.0) -> float:
    """THE station throughput: results per second over the last ``window_s`` seconds, or since ``since`` (the
    run's start) when that is shorter (at least 1 s), so a run that started 10 s ago is not divided by 60.
    The live line, the final line and ``station status`` all use it."""
    window = window_s if since is None else min(window_s, max(now - since, 1.0))
    return n_done / window


def recent_throughput(conn: sqlite3.Connection, window_s: float = 60.0, now: float | None = None,
                      since: float | None = None) -> float:
    """:func:`throughput` from the stored results (``since``: the running station's start)."""
    now = time.time() if now is None else now
    start = now - window_s if since is None else max(now - window_s, since)
    n = conn.execute("SELECT COUNT(*) FROM results WHERE done_at >= ?", (start,)).fetchone()[0]
    return throughput(int(n), now, since, window_s)


def totals(conn: sqlite3.Connection) -> dict[str, int]:
    r = conn.execute(
        "SELECT COUNT(*), SUM(status = 'ok'), SUM(status = 'error'), SUM(superseded), "
        "SUM(status = 'rejected') FROM results"
    ).fetchone()
    return {"rows": int(r[0] or 0), "ok": int(r[1] or 0), "errors": int(r[2] or 0), "superseded": int(r[3] or 0),
            "rejected": int(r[4] or 0)}


# -- results of one batch ------------------------------------------------------------------------------
@dataclass
class ResultRow:
    """One row of ``results``: a classified (or failed) file of one batch, in the table's column order."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    sample_id: str | None
    status: str  # "ok" | "error" | "rejected"
    error: str | None
    probability: float | None
    label: str | None
    is_blast: int | None
    model_id: str
    preprocess_hash: str
    backend: str
    run_id: int
    batch_id: int
    detected_at: float
    ready_at: float
    started_at: float
    done_at: float
    queued_ms: float
    preprocess_ms: float | None
    compute_ms: float | None
    latency_ms: float
    reason: str | None = None
    stain_fallback: int | None = None
    ood_score: float | None = None
    path_bytes: bytes | None = None  # filled by values(): the exact name when `path` must be escaped
    ctime_ns: int | None = None
    inode: int | None = None

    def values(self) -> tuple[Any, ...]:
        """The row as stored: ``path`` as readable UTF-8 text (:func:`~leukedge._util.path_text`; a name that is
        not UTF-8 used to crash the insert), its exact bytes in ``path_bytes`` when they differ."""
        row = {f: getattr(self, f) for f in RESULT_COLUMNS}
        row["path"], row["path_bytes"] = path_text(self.path), path_raw(self.path)
        if self.sample_id is not None:
            row["sample_id"] = path_text(self.sample_id)
        return tuple(row[f] for f in RESULT_COLUMNS)


RESULT_COLUMNS = tuple(f for f in ResultRow.__dataclass_fields__)
_INSERT_RESULT = (f"INSERT OR IGNORE INTO results({', '.join(RESULT_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in RESULT_COLUMNS)})")


def open_batch(conn: sqlite3.Connection, *, run_id: int, size: int, reason: str, opened_at: float,
               started_at: float) -> int:
    """Record a batch as running; returns its id."""
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO batches(run_id, size, reason, state, opened_at, started_at) VALUES (?, ?, ?, 'running', ?, ?)",
            (run_id, size, reason, opened_at, started_at),
        )
    return int(cur.lastrowid or 0)


def fail_batch(conn: sqlite3.Connection, batch_id: int) -> None:
    """The backend failed on the whole batch: nothing is stored for its files."""
    with transaction(conn):
        conn.execute("UPDATE batches SET state = 'failed', done_at = ? WHERE id = ?", (time.time(), batch_id))


def insert_batch(conn: sqlite3.Connection, batch_id: int, rows: Iterable[ResultRow], *,
                 reactivated: Iterable[tuple[str, str]] = (), preprocess_ms: float, compute_ms: float,
                 total_ms: float) -> None:
    """Store a batch's results in one transaction: older contents of the same paths stop counting
    (``superseded``), rows of files that came back (``reactivated``: (path, sha256)) count again, and
    the batch is marked done with its times and counts."""
    rows = list(rows)
    n_err = sum(1 for r in rows if r.status == "error")
    with transaction(conn):
        for r in rows:
            conn.execute("UPDATE results SET superseded = 1 WHERE path = ? AND sha256 != ?", (path_text(r.path), r.sha256))
        conn.executemany(_INSERT_RESULT, [r.values() for r in rows])
        for path, sha in reactivated:
            conn.execute("UPDATE results SET superseded = (sha256 != ?) WHERE path = ?", (sha, path_text(path)))
        conn.execute(
            "UPDATE batches SET state = 'done', done_at = ?, preprocess_ms = ?, compute_ms = ?, total_ms = ?, "
            "n_ok = ?, n_error = ? WHERE id = ?",
            (time.time(), preprocess_ms, compute_ms, total_ms, len(rows) - n_err, n_err, batch_id),
        )


def supersede_paths(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    """Results of files that are gone stop counting."""
    with transaction(conn):
        conn.executemany("UPDATE results SET superseded = 1 WHERE path = ? AND superseded = 0",
                         [(path_text(p),) for p in paths])


# -- stored paths and names, for display -----------------------------------------------------------------
def display_text(value: Any) -> Any:
    """A stored path or name as text that always encodes: bytes (lossless path storage) and lone
    surrogates (undecodable bytes of a file name, ``os.fsdecode``) become ``\\xNN`` escapes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:
                return value.encode("utf-8", "backslashreplace").decode("ascii")
    return value


def fs_path(value: Any) -> str:
    """The file-system path of a stored ``path`` (text, or bytes where paths are stored losslessly)."""
    return os.fsdecode(bytes(value)) if isinstance(value, (bytes, bytearray)) else str(value)


def cell_fs_path(row: Any) -> str:
    """The file-system path of a result row: its exact name bytes (``path_bytes``, where the database
    keeps them because ``path`` had to escape the name) or else its ``path``."""
    raw = row["path_bytes"] if "path_bytes" in row.keys() else None
    return os.fsdecode(bytes(raw)) if raw is not None else fs_path(row["path"])
