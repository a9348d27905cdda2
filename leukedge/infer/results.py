"""What inference leaves behind: one :class:`FileResult` per file, the results file (CSV / JSON lines / Parquet)
written whole or streamed batch by batch (:class:`ResultStream`, ``--resume``), and the latency statistics.

The results-file suffixes (:data:`RESULT_SUFFIXES`, :data:`PARQUET_SUFFIX`) and columns (:data:`RESULT_FIELDS`)
are defined here only; plain ``infer`` and the Ray job write through the same functions.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .._util import atomic_write_text, path_raw_b64, path_text

RESULT_FIELDS = ("path", "probability", "label", "status", "error", "subject", "true_label", "stain_fallback",
                 "reason", "ood_score", "path_bytes", "note")
#: text results files (``infer -o``); ``.json`` / ``.ndjson`` are written as JSON lines too
RESULT_SUFFIXES = (".csv", ".jsonl", ".json", ".ndjson")
#: the columnar results file of large runs (``infer --ray -o OUT.parquet``)
PARQUET_SUFFIX = ".parquet"


class ResultsNotWritten(OSError):
    """Inference ran, but its results file could not be written (full or read-only disk)."""


@dataclass
class FileResult:
    path: str
    probability: float | None
    label: str | None
    status: str  # "ok" | "error" | "rejected" (not a cell the model may be asked about: never a label)
    error: str | None = None
    subject: str | None = None
    true_label: str | None = None
    stain_fallback: bool = False
    reason: str | None = None  # why it was rejected (the cell quality gate, or out of distribution)
    ood_score: float | None = None  # the model's energy score (higher = less like its training cells)
    note: str | None = None  # what the user should know about a file that was still used (e.g. "page 1 of 3 used")

    def to_dict(self) -> dict[str, Any]:
        """The row as written: ``path`` as readable text (undecodable bytes and control characters such as a
        carriage return escaped as ``\\xNN``) and, only when that escaping happened, ``path_bytes``: the
        exact name, base64 of ``os.fsencode(path)`` (lossless)."""
        d = asdict(self)
        d["path"], d["path_bytes"] = path_text(self.path), path_raw_b64(self.path)
        for k in ("error", "reason", "subject", "note"):
            if isinstance(d[k], str):
                d[k] = d[k].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return d


@dataclass
class InferResult:
    results: list[FileResult]
    stats: dict[str, Any]
    out_path: Path | None = None
    stats_path: Path | None = None
    backend: str = ""
    reason: str = ""

    @property
    def n_ok(self) -> int:
        return sum(r.status == "ok" for r in self.results)

    @property
    def n_error(self) -> int:
        return sum(r.status == "error" for r in self.results)

    @property
    def n_rejected(self) -> int:
        return sum(r.status == "rejected" for r in self.results)



# --------------------------------------------------------------------------------------------
# statistics
def summarize_ms(values: Sequence[float]) -> dict[str, float] | None:
    if not len(values):
        return None
    a = np.asarray(values, np.float64)
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def format_results(results: Sequence[FileResult], suffix: str, header: bool = True,
                   fields: Sequence[str] = RESULT_FIELDS) -> str:
    """Rows as CSV (with the header line when ``header``; columns ``fields``, those of the file appended to) or
    JSON lines, by ``suffix``; every row ends in a newline, so a file they are appended to is valid after every
    batch."""
    buf = io.StringIO()
    if suffix == ".csv":
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        if header:
            w.writeheader()
        for r in results:
            d = r.to_dict()
            d["probability"] = "" if r.probability is None else f"{r.probability:.6f}"
            w.writerow({k: ("" if d.get(k) is None else d[k]) for k in fields})
    elif suffix in RESULT_SUFFIXES:  # every other suffix is JSON lines
        for r in results:
            buf.write(json.dumps(r.to_dict()) + "\n")
    else:
        raise ValueError(f"results file must end in .csv or .jsonl, not {suffix!r}")
    return buf.getvalue()


def write_results(results: Sequence[FileResult], path: str | os.PathLike) -> Path:
    """CSV or JSONL (by suffix), written atomically (temp file + os.replace)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in RESULT_SUFFIXES:
        raise ValueError(f"{path}: results file must end in .csv or .jsonl")
    atomic_write_text(path, format_results(results, suffix))
    return path


class InferenceInterrupted(Exception):
    """``infer`` was interrupted (SIGINT): the message says where the finished results are and how to resume."""


def partial_path_for(out_path: str | os.PathLike) -> Path:
    p = Path(out_path)
    return p.with_name(p.name + ".partial")


def done_paths(path: Path) -> set[str]:
    """The exact paths that already have a row in a results file (``path_bytes`` where the name was escaped).
    A last line cut off by a kill is dropped from the file first."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    text = data.decode("utf-8", "replace")
    if path.name.lower().removesuffix(".partial").endswith(".csv"):
        rows: Iterable[dict[str, Any]] = csv.DictReader(io.StringIO(text))
    else:
        rows = (json.loads(line) for line in text.splitlines() if line.strip())
    return {os.fsdecode(base64.b64decode(r["path_bytes"])) if r.get("path_bytes") else str(r.get("path"))
            for r in rows}


def csv_header(path: Path) -> tuple[str, ...]:
    """The column names of a results CSV (its first line)."""
    with open(path, encoding="utf-8", newline="") as f:
        return tuple(next(csv.reader(f), RESULT_FIELDS))


class ResultStream:
    """The results file of ``infer``, written as batches finish: rows are appended to ``OUT.partial`` (flushed
    and synced after every batch, so an interrupted run leaves a valid file of whole rows), which becomes
    ``OUT`` (``os.replace``) when the run completes. ``resume``: continue ``OUT.partial`` (or ``OUT``) and
    :attr:`done` holds the paths to skip."""

    def __init__(self, out_path: str | os.PathLike, resume: bool = False) -> None:
        self.final = Path(out_path)
        self.suffix = self.final.suffix.lower()
        self.partial = partial_path_for(out_path)
        self.done: set[str] = set()
        self.written = 0
        if resume and self.partial.is_file():
            self.done = done_paths(self.partial)
        elif resume and self.final.is_file():
            self.done = done_paths(self.final)
            shutil.copyfile(self.final, self.partial)
        elif self.partial.exists():
            self.partial.unlink()
        new = not self.partial.exists() or self.partial.stat().st_size == 0
        #: the CSV columns: those of a file being resumed (written before a column was added), else RESULT_FIELDS
        self.fields: tuple[str, ...] = RESULT_FIELDS if new or self.suffix != ".csv" else csv_header(self.partial)
        self._f = open(self.partial, "a", encoding="utf-8", newline="")
        if new and self.suffix == ".csv":
            self._write(format_results([], self.suffix, header=True))

    def _write(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, results: Sequence[FileResult]) -> None:
        try:
            self._write(format_results(results, self.suffix, header=False, fields=self.fields))
        except OSError as exc:
            raise self._failed(exc) from exc
        self.written += len(results)

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:  # the data was synced after each batch; a close error loses nothing more
                pass

    def finish(self) -> Path:
        self.close()
        try:
            os.replace(self.partial, self.final)
        except OSError as exc:
            raise self._failed(exc) from exc
        return self.final

    def _failed(self, exc: OSError) -> "ResultsNotWritten":
        """One clear error for a write that failed (full or read-only disk): the rows written so far stay."""
        self.close()
        kept = self.written + len(self.done)
        if kept and self.partial.exists():
            where = (f"the {kept} result(s) written so far are in {self.partial}; free some space and run the same "
                     "command with --resume")
        else:
            self.abandon()
            where = "nothing was written there; free some space or choose another -o"
        return ResultsNotWritten(f"the results could not be written to {self.final}: {exc.strerror or exc} ({where})")

    def abandon(self) -> None:
        self.close()
        self.partial.unlink(missing_ok=True)


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse a results path that could not be written, *before* any work: a wrong suffix, a folder
    that cannot be created, a read-only or full file system (a probe file is created and removed)."""
    path = Path(path)
    if path.suffix.lower() not in RESULT_SUFFIXES:
        raise ValueError(f"{path}: results file must end in .csv or .jsonl")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; name the results file, e.g. {path / 'results.csv'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe.") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ValueError(f"cannot write the results file {path}: {exc.strerror or exc}") from exc
    return path


def stats_path_for(out_path: str | os.PathLike) -> Path:
    p = Path(out_path)
    return p.with_name(p.name + ".stats.json")


def write_stats(stats: dict[str, Any], out_path: str | os.PathLike) -> Path:
    """``OUT.stats.json`` of the results file ``out_path`` (atomically); returns its path."""
    path = stats_path_for(out_path)
    atomic_write_text(path, json.dumps(stats, indent=2) + "\n")
    return path


def write_parquet(results: Sequence[FileResult], path: str | os.PathLike) -> Path:
    """The results as a Parquet file (columns :data:`RESULT_FIELDS`), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    rows = [r.to_dict() for r in results]  # as the CSV/JSONL writers write them (path text + lossless path_bytes)
    cols = {k: [row.get(k) for row in rows] for k in RESULT_FIELDS}
    types = {"probability": pa.float64(), "stain_fallback": pa.bool_(), "ood_score": pa.float64()}
    table = pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in cols.items()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def check_output_path_any(path: str | os.PathLike, *, parquet: bool = False) -> Path:
    """:func:`check_output_path`, also accepting ``.parquet`` when ``parquet`` (the Ray job writes it)."""
    p = Path(path)
    if parquet and p.suffix.lower() == PARQUET_SUFFIX:
        check_output_path(p.with_suffix(".csv"))  # the same probe of the folder
        return p
    if parquet and p.suffix.lower() not in RESULT_SUFFIXES:
        raise ValueError(f"{p}: results file must end in .csv, .jsonl or .parquet")
    return check_output_path(p)
