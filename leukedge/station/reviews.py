"""Human reviews of station results, kept apart from the model's results.

A reviewer looks at a cell on the station page and says ``all``, ``hem`` or ``not a cell``. Each
review is appended to the ``reviews`` table of a *separate* SQLite file next to the station
database (default ``<db stem>.reviews.sqlite``): the station database itself is only ever opened
read-only by the page, so the classifying loop never waits for a reviewer's write lock, and a
review never touches (never overwrites) a model result. A review names its result by
``(path, sha256)`` -- the identity that survives a restart or a rebuilt station database -- and
also records the result's row id at the time. The newest review of a cell is its reviewed label;
older ones stay as history.

:func:`export_reviewed` writes the reviewed cells as a labelled folder in the C-NMC layout, ready
for ``leukedge preprocess`` and ``train``.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .._util import file_sha256
from .db import cell_fs_path

REVIEW_LABELS = ("all", "hem", "not_a_cell")
REVIEW_SCHEMA_VERSION = 1
MAX_REVIEWER_CHARS = 80

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reviews (
    id          INTEGER PRIMARY KEY,
    path        TEXT NOT NULL,            -- the reviewed file (as stored in the station's results)
    sha256      TEXT NOT NULL,            -- its content hash: a replaced file is a new cell
    result_id   INTEGER,                  -- results.id in the station database when reviewed
    sample_id   TEXT,
    label       TEXT NOT NULL CHECK (label IN ('all', 'hem', 'not_a_cell')),
    reviewer    TEXT NOT NULL,
    reviewed_at REAL NOT NULL,            -- wall clock (Unix s)
    model_label TEXT,                     -- what the model said, for the record
    model_probability REAL,
    model_id    TEXT
);
CREATE INDEX IF NOT EXISTS reviews_cell ON reviews(path, sha256, id);
"""


def default_reviews_path(db_path: str | os.PathLike) -> Path:
    """``.leukedge-station.sqlite`` -> ``.leukedge-station.reviews.sqlite`` (a dotfile in the watch
    folder by default, so the station never reads it as an image)."""
    p = Path(db_path)
    return p.with_name(f"{p.stem}.reviews{p.suffix or '.sqlite'}")


def connect(path: str | os.PathLike, *, readonly: bool = False) -> sqlite3.Connection | None:
    """Open the reviews database (created on first write). ``readonly`` and absent: ``None`` (no reviews yet)."""
    path = Path(path)
    if readonly:
        if not path.exists():
            return None
        from .db import sqlite_uri

        # mode=ro needs the -shm file of a WAL database; on a read-only medium it is opened as immutable
        for params in ({"mode": "ro"}, {"mode": "ro", "immutable": "1"}):
            conn = sqlite3.connect(sqlite_uri(path, **params), uri=True, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                break
            except sqlite3.OperationalError:
                conn.close()
                if "immutable" in params:
                    raise
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        # one transaction: a reader never sees the file with only some of its tables
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} INSERT OR IGNORE INTO meta(key, value) "
                           f"VALUES ('schema_version', '{REVIEW_SCHEMA_VERSION}'); COMMIT;")
    conn.row_factory = sqlite3.Row
    return conn


def normalize_label(label: str) -> str:
    """``'not a cell'`` / ``'not-a-cell'`` / ``'ALL'`` -> the stored spelling; ValueError otherwise."""
    v = re.sub(r"[\s\-]+", "_", str(label).strip().lower())
    if v not in REVIEW_LABELS:
        raise ValueError(f"review label must be one of all, hem, not a cell (got {label!r})")
    return v


def clean_reviewer(name: str) -> str:
    """A reviewer's name: printable, one line, at most 80 characters, not empty."""
    v = "".join(ch for ch in str(name) if ch.isprintable()).strip()[:MAX_REVIEWER_CHARS]
    if not v:
        raise ValueError("a review needs the reviewer's name")
    return v


def add_review(conn: sqlite3.Connection, result: dict[str, Any], label: str, reviewer: str,
               at: float | None = None) -> dict[str, Any]:
    """Append one review of ``result`` (a station result row: id, path, sha256, sample_id, label,
    probability, model_id); returns the stored review."""
    row = {
        "path": result["path"], "sha256": result["sha256"], "result_id": result.get("id"),
        "sample_id": result.get("sample_id"), "label": normalize_label(label), "reviewer": clean_reviewer(reviewer),
        "reviewed_at": time.time() if at is None else float(at), "model_label": result.get("label"),
        "model_probability": result.get("probability"), "model_id": result.get("model_id"),
    }
    cols = ", ".join(row)
    with conn:  # one short transaction in the reviews file only
        cur = conn.execute(f"INSERT INTO reviews({cols}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values()))
    row["id"] = int(cur.lastrowid or 0)
    return row


def latest_reviews(conn: sqlite3.Connection | None) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, sha256) -> the newest review of that cell (its reviewed label)."""
    if conn is None:
        return {}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in conn.execute("SELECT * FROM reviews ORDER BY id"):
        out[(r["path"], r["sha256"])] = dict(r)
    return out


def review_count(conn: sqlite3.Connection | None) -> int:
    return 0 if conn is None else int(conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0])


REVIEW_EXPORT_COLUMNS = ("review_label", "reviewer", "reviewed_at")


def with_reviews(rows: Iterable[dict[str, Any]], reviews: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Result rows (with ``path`` and ``sha256``) with the newest review's label, reviewer and time
    added (``None`` where the cell has no review); the model's own columns are left as they are."""
    out = []
    for r in rows:
        rev = reviews.get((r["path"], r["sha256"]))
        out.append({**r, "review_label": rev["label"] if rev else None, "reviewer": rev["reviewer"] if rev else None,
                    "reviewed_at": rev["reviewed_at"] if rev else None})
    return out


# -- agreement ---------------------------------------------------------------------------------------
@dataclass
class Agreement:
    """Model vs reviewer over the current cells that have a review."""

    reviewed: int = 0          # current cells with a review
    compared: int = 0          # ... that the model classified (status ok) and the reviewer called all/hem
    agree: int = 0
    not_a_cell: int = 0
    confusion: dict[str, int] | None = None   # "model->reviewer" -> count

    @property
    def rate(self) -> float | None:
        return self.agree / self.compared if self.compared else None

    def as_dict(self) -> dict[str, Any]:
        return {"reviewed": self.reviewed, "compared": self.compared, "agree": self.agree,
                "not_a_cell": self.not_a_cell, "agreement": self.rate, "confusion": dict(self.confusion or {})}


def agreement(cells: Iterable[dict[str, Any]], reviews: dict[tuple[str, str], dict[str, Any]],
              positive_label: str = "all") -> Agreement:
    """Agreement of the model's label (``is_blast`` -> all / hem) with the reviewed label."""
    a = Agreement(confusion={})
    assert a.confusion is not None
    for c in cells:
        rv = reviews.get((c["path"], c["sha256"]))
        if rv is None:
            continue
        a.reviewed += 1
        if rv["label"] == "not_a_cell":
            a.not_a_cell += 1
            continue
        if c.get("status") != "ok" or c.get("is_blast") is None:
            continue
        model = positive_label if c["is_blast"] else "hem"
        a.compared += 1
        a.agree += int(model == rv["label"])
        key = f"{model}->{rv['label']}"
        a.confusion[key] = a.confusion.get(key, 0) + 1
    return a


# -- export as training data -----------------------------------------------------------------------------
@dataclass
class ExportSummary:
    out_dir: Path
    written: dict[str, int]
    skipped_not_a_cell: int
    missing: list[str]            # reviewed files that are gone or changed since the review
    subjects: dict[str, str]      # sample id -> subject code in the file names

    def as_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "written": self.written, "skipped_not_a_cell": self.skipped_not_a_cell,
                "missing": self.missing, "subjects": self.subjects}


MANIFEST_NAME = "reviewed_cells.csv"


def export_reviewed(cells: Iterable[dict[str, Any]], reviews: dict[tuple[str, str], dict[str, Any]],
                    out_dir: str | os.PathLike) -> ExportSummary:
    """Copy every reviewed ``all`` / ``hem`` cell into ``out_dir/training_data/fold_0/<label>/`` as
    ``UID_S<n>_<image>_1_<label>.<ext>`` (C-NMC names: subject ``S<n>`` is the n-th sample id, so
    patient-level splits keep a slide together), byte for byte, after checking the file still has
    the reviewed content (sha256). ``not a cell`` is left out. ``reviewed_cells.csv`` maps each
    written file to its source path, sample, reviewer, time and the model's answer."""
    out = Path(out_dir)
    cells = [c for c in cells if (c["path"], c["sha256"]) in reviews]
    samples = sorted({str(c.get("sample_id") or "") for c in cells})
    subjects = {s: f"S{i + 1}" for i, s in enumerate(samples)}
    written = {"all": 0, "hem": 0}
    skipped, missing, manifest = 0, [], []
    image_no: dict[str, int] = {}
    for c in sorted(cells, key=lambda c: (str(c.get("sample_id") or ""), c["path"])):
        rv = reviews[(c["path"], c["sha256"])]
        if rv["label"] == "not_a_cell":
            skipped += 1
            continue
        src = Path(cell_fs_path(c))
        try:
            same = src.is_file() and file_sha256(src) == c["sha256"]
        except OSError:
            same = False
        if not same:
            missing.append(str(src))
            continue
        subject = subjects[str(c.get("sample_id") or "")]
        image_no[subject] = image_no.get(subject, 0) + 1
        ext = src.suffix.lower() or ".bmp"
        dest = out / "training_data" / "fold_0" / rv["label"] / f"UID_{subject}_{image_no[subject]}_1_{rv['label']}{ext}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        written[rv["label"]] += 1
        manifest.append({"file": str(dest.relative_to(out)), "source_path": str(src), "sha256": c["sha256"],
                         "sample_id": c.get("sample_id"), "subject": subject, "label": rv["label"],
                         "reviewer": rv["reviewer"], "reviewed_at": rv["reviewed_at"],
                         "model_label": c.get("label"), "model_probability": c.get("probability"),
                         "model_id": c.get("model_id")})
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out / MANIFEST_NAME, manifest)
    return ExportSummary(out, written, skipped, missing, subjects)


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = ["file", "source_path", "sha256", "sample_id", "subject", "label", "reviewer", "reviewed_at",
            "model_label", "model_probability", "model_id"]
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
