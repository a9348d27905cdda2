"""The station loop: scanner thread -> deadline batcher -> predict (injected) -> SQLite.

The prediction step is one callable ``predict(paths) -> list[dict]`` (one dict per path, same
order, keys ``path, probability, label, status ('ok'|'error'), error`` and optionally
``timings``), normally :meth:`leukedge.infer.Predictor.predict`, so the station logic does
not depend on a backend.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._util import escape_markup
from .batcher import DeadlineBatcher
from .db import (
    DatabaseDamaged,
    DiskFull,
    ResultRow,
    connect,
    disk_full,
    fail_batch,
    finish_run,
    insert_batch,
    is_disk_full,
    live_station,
    load_known,
    open_batch,
    previous_models,
    start_run,
    supersede_paths,
    throughput,
    write_heartbeat,
)
from .scanner import IMAGE_EXTENSIONS, ReadyFile, Scanner, make_sample_fn

PredictFn = Callable[[Sequence[str]], Sequence[dict]]

MAX_CONSECUTIVE_BACKEND_FAILURES = 3
DISK_FULL_RETRY_S = 5.0


class StationError(RuntimeError):
    """The station cannot go on (for example the backend fails on every batch)."""


@dataclass
class ModelInfo:
    model: str                       # what --model named
    model_id: str                    # stable identity of the weights (e.g. sha256 prefix)
    preprocess_hash: str             # PreprocessConfig.pixel_hash() the model was trained with
    backend: str                     # backend actually in use
    positive_label: str = "all"      # label that counts as a blast
    reason: str = ""                 # why this backend (from get_backend)


@dataclass
class StationSettings:
    watch_dir: Path
    db_path: Path
    batch_size: int = 16
    max_wait_ms: float = 250.0
    settle_ms: float = 500.0
    poll_ms: float = 100.0
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    ignore: tuple[str, ...] = ()
    sample_pattern: str | None = None
    max_file_mb: float = 100.0
    once: bool = False
    exit_when_idle_s: float | None = None
    max_files: int | None = None
    heartbeat_s: float = 1.0
    trust_rename: bool = True
    full_scan_s: float = 10.0

    def __post_init__(self) -> None:
        self.watch_dir = Path(self.watch_dir).resolve()
        self.db_path = Path(self.db_path).resolve()
        if self.batch_size < 1:
            raise ValueError("--batch must be >= 1")
        if not self.extensions or any(not str(e).strip(" .") for e in self.extensions):
            raise ValueError(f"--ext {' '.join(repr(e) for e in self.extensions) or '(none)'}: every extension must "
                             "name one, e.g. --ext .bmp (an empty one watches nothing)")
        if self.max_wait_ms < 0 or self.settle_ms < 0 or self.poll_ms <= 0:
            raise ValueError("--max-wait-ms and --settle-ms must be >= 0, --poll-ms > 0")


@dataclass
class StationSummary:
    run_id: int
    processed: int = 0
    errors: int = 0
    rejected: int = 0
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    exit_reason: str = ""
    left_in_queue: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("latencies_ms")
        return d


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation, NumPy's default); None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


class Station:
    def __init__(
        self,
        settings: StationSettings,
        predict: PredictFn,
        model: ModelInfo,
        *,
        reporter: "Any | None" = None,
        install_signal_handlers: bool = True,
    ) -> None:
        self.s = settings
        self.predict = predict
        self.model = model
        self.reporter = reporter
        self.install_signal_handlers = install_signal_handlers
        self.batcher: DeadlineBatcher[ReadyFile] = DeadlineBatcher(settings.batch_size, settings.max_wait_ms / 1000)
        self._stop = threading.Event()
        self._stop_reason = ""
        self._signals = 0
        self._scanner_error: BaseException | None = None
        self._stats_lock = threading.Lock()  # live() is also read by the console refresh thread
        self._done_times: collections.deque[float] = collections.deque()
        self._latencies: collections.deque[float] = collections.deque(maxlen=2000)
        self._consecutive_failures = 0
        self.conn: sqlite3.Connection | None = None
        self.scanner: Scanner | None = None
        self.summary: StationSummary | None = None
        self.in_batch = False
        self._t_start = time.time()
        self._published: tuple[int, int] = (0, 0)  # (scans, settling) after the scanner's last put
        self._mono: tuple[float, float] = (0.0, 0.0)  # monotonic start and end of the batch being stored

    # -- control ---------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            raise KeyboardInterrupt(f"second {name}: stopping without finishing the batch")
        what = "finishing the batch in flight, then stopping" if self.in_batch else "stopping"
        self.request_stop(f"{name} received")
        if self.reporter:
            self.reporter.message(f"[yellow]{name} received: {what} (send it again to abort)[/]")

    # -- main loop ---------------------------------------------------------------------------------
    def _open_db(self) -> int:
        """Connect to the database, refuse a second live station on it, note results of other models; the run id."""
        s = self.s
        try:
            self.conn = conn = connect(s.db_path)
        except (DatabaseDamaged, DiskFull) as exc:
            raise StationError(str(exc)) from exc
        other = live_station(conn, stale_after_s=max(5.0, 5 * s.heartbeat_s))
        if other is not None:
            conn.close()
            raise StationError(
                f"another station (pid {other['pid']} on {other['host']}, watching {other['watch_dir']}) is writing to "
                f"{s.db_path}; stop it first or use another --db"
            )
        others = [m for m in previous_models(conn) if m != (self.model.model_id, self.model.preprocess_hash)]
        if others and self.reporter:
            self.reporter.message(
                f"[yellow]note: {s.db_path} already holds results of another model ({others[0][0]}); files already "
                "classified there are not classified again. Use a new --db to re-run a folder with a new model.[/]"
            )
        return start_run(
            conn, watch_dir=str(s.watch_dir), model=self.model.model, model_id=self.model.model_id,
            preprocess_hash=self.model.preprocess_hash, backend=self.model.backend,
            settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        )

    def run(self) -> StationSummary:
        """Watch the folder until stopped: open the database (:meth:`_open_db`), start the scanner thread,
        batch and classify (``_loop``), and record how the run ended, whatever ends it."""
        s = self.s
        if not s.watch_dir.is_dir():
            raise StationError(f"watch folder {s.watch_dir} does not exist or is not a folder")
        sample_fn = make_sample_fn(str(s.watch_dir), s.sample_pattern)
        run_id = self._open_db()
        assert self.conn is not None
        self.summary = StationSummary(run_id=run_id)
        self._t_start = time.time()
        db = str(s.db_path)
        self.scanner = Scanner(
            s.watch_dir, settle_s=s.settle_ms / 1000, extensions=s.extensions, ignore_globs=s.ignore,
            max_bytes=int(s.max_file_mb * 1024 * 1024), sample_fn=sample_fn, known=load_known(self.conn),
            exclude_paths=(db, db + "-wal", db + "-shm", db + "-journal"), trust_rename=s.trust_rename,
            full_scan_s=s.full_scan_s,
        )
        old_handlers = {}
        if self.install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        scan_thread = threading.Thread(target=self._scan_loop, name="leukedge-station-scanner", daemon=True)
        state = "stopped"
        try:
            write_heartbeat(self.conn, run_id, state="running")
            scan_thread.start()
            if self.reporter:
                self.reporter.start(self)
            self._loop()
        except KeyboardInterrupt as exc:
            self.request_stop(str(exc) or "interrupted")
            state = "stopped"
        except BaseException as exc:
            state = "failed"
            self.request_stop(f"failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            self._stop.set()
            if scan_thread.is_alive():
                scan_thread.join(timeout=10)
            self.summary.left_in_queue = len(self.batcher) + (self.scanner.stats.settling if self.scanner else 0)
            self.summary.exit_reason = self._stop_reason or "stopped"
            try:
                finish_run(self.conn, run_id, self.summary.exit_reason, state=state)
            except sqlite3.OperationalError as exc:
                if not is_disk_full(exc):
                    raise
                if self.reporter:  # one line, not a second traceback
                    self.reporter.message(f"[red]{escape_markup(str(disk_full(s.db_path)))}[/]")
            finally:
                self.conn.close()
                for sig, h in old_handlers.items():
                    signal.signal(sig, h)
                if self.reporter:
                    self.reporter.stop(self)
        with self._stats_lock:
            self.summary.latencies_ms = list(self._latencies)
        return self.summary

    def _scan_loop(self) -> None:
        assert self.scanner is not None
        poll = self.s.poll_ms / 1000
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                ready = self.scanner.scan()
                self.batcher.put(ready)
                # published only after the put: "nothing settling and nothing queued" is then never
                # seen while complete files are between the scanner and the queue
                self._published = (self.scanner.stats.scans, self.scanner.stats.settling)
                elapsed = time.monotonic() - t0
                # Big folders: never spend more than about half the time scanning.
                self._stop.wait(max(poll - elapsed, elapsed, 0.001))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the main loop
            self._scanner_error = exc
            self._stop.set()

    def _idle(self) -> bool:
        scans, settling = self._published
        return scans >= 1 and settling == 0 and len(self.batcher) == 0

    def _loop(self) -> None:
        s = self.s
        next_hb = time.monotonic() + s.heartbeat_s
        last_activity = time.monotonic()
        assert self.scanner is not None and self.summary is not None
        while not self._stop.is_set():
            flush = s.once and self._published[0] >= 1 and self._published[1] == 0
            batch, reason = self.batcher.take(timeout=min(0.1, s.poll_ms / 1000), flush=flush)
            self._forget_vanished()
            if batch:
                self._process(batch, reason or "deadline")
                last_activity = time.monotonic()
            now = time.monotonic()
            if now >= next_hb:
                self._heartbeat()
                next_hb = now + s.heartbeat_s
            if self._scanner_error is not None:
                raise StationError(f"folder scanner failed: {self._scanner_error}") from self._scanner_error
            if s.max_files is not None and self.summary.processed >= s.max_files:
                self.request_stop(f"--max-files {s.max_files} reached")
            elif s.once and self._idle():
                self.request_stop("--once: every file in the folder has a result")
            elif s.exit_when_idle_s is not None and self._idle():
                idle_for = now - max(last_activity, self.scanner.stats.last_change_mono)
                if idle_for >= s.exit_when_idle_s:
                    self.request_stop(f"idle for {s.exit_when_idle_s:g} s (--exit-when-idle)")

    def _forget_vanished(self) -> None:
        """Results of files that were deleted, renamed or moved away stop counting (``superseded``):
        a current row always has a file. A file that is back by now is left alone (the scanner
        reactivates its row)."""
        assert self.scanner is not None and self.conn is not None
        gone = [p for p in self.scanner.take_vanished() if not os.path.lexists(p)]
        if not gone:
            return
        supersede_paths(self.conn, gone)
        if self.reporter:
            self.reporter.message(f"[dim]{len(gone)} file(s) gone from the folder; their results no longer count[/]")

    # -- one batch -----------------------------------------------------------------------------------
    def _predict_safe(self, paths: list[str]) -> tuple[list[dict] | None, float]:
        """Run the injected predict; isolate a failing file; None = the backend itself is failing."""
        t0 = time.perf_counter()
        try:
            out = list(self.predict(paths))
            if len(out) != len(paths):
                raise StationError(f"predict returned {len(out)} results for {len(paths)} files")
            self._consecutive_failures = 0
            return out, (time.perf_counter() - t0) * 1000
        except Exception as exc:  # noqa: BLE001 - a backend error must not kill the station
            batch_error = f"{type(exc).__name__}: {exc}"
        if self.reporter:
            self.reporter.message(f"[red]batch of {len(paths)} failed ({escape_markup(batch_error)}); retrying file by file[/]")
        out = []
        n_failed = 0
        for p in paths:
            try:
                r = list(self.predict([p]))[0]
            except Exception as exc:  # noqa: BLE001
                n_failed += 1
                r = {"path": p, "status": "error", "error": f"prediction failed: {type(exc).__name__}: {exc}"}
            out.append(r)
        if n_failed == len(paths):
            self._consecutive_failures += 1
            if self._consecutive_failures >= MAX_CONSECUTIVE_BACKEND_FAILURES:
                raise StationError(
                    f"the {self.model.backend} backend failed on {self._consecutive_failures} batches in a row "
                    f"(last error: {batch_error}); stopping. Unclassified files stay in the folder and are "
                    "picked up on the next start."
                )
            return None, (time.perf_counter() - t0) * 1000
        self._consecutive_failures = 0
        return out, (time.perf_counter() - t0) * 1000

    def _process(self, batch: list[ReadyFile], reason: str) -> None:
        """Classify one batch and store it: open the batch, predict, build one :class:`~.db.ResultRow` per
        file, commit them in one transaction, then tell the scanner and update the live numbers."""
        assert self.conn is not None and self.summary is not None and self.scanner is not None
        started = time.time()
        started_mono = time.monotonic()
        opened = started - max(started_mono - min(it.ready_mono for it in batch), 0.0)
        batch_id = self._open_batch(batch, reason, opened, started)
        if batch_id is None:
            return
        to_predict = [it for it in batch if it.error is None and not it.reactivate]
        results: dict[str, dict] = {}
        pred_ms = 0.0
        self.in_batch = True
        try:
            if to_predict:
                out, pred_ms = self._predict_safe([it.path for it in to_predict])
                if out is None:  # backend failing: give the files back, record nothing for them
                    for it in to_predict:
                        self.scanner.report_retry(it.path)
                    fail_batch(self.conn, batch_id)
                    return
                for it, r in zip(to_predict, out):
                    results[it.path] = r
        finally:
            self.in_batch = False

        rows, reactivated, retry = [], [], []
        pre_ms_total = comp_ms_total = 0.0
        done = time.time()
        self._mono = (started_mono, time.monotonic())  # durations from the monotonic clock (wall time may jump)
        for it in batch:
            if it.reactivate:
                reactivated.append(it)
                continue
            found = results.get(it.path)
            if found is not None and not _unchanged(it):
                retry.append(it)  # replaced while being classified: the result is for stale content
                continue
            row = self._result_row(it, found, pred_ms, batch_id, started, done)
            # per-file timings are those of the engine batch the file was in
            pre_ms_total = max(pre_ms_total, row.preprocess_ms or 0.0)
            comp_ms_total = max(comp_ms_total, row.compute_ms or 0.0)
            rows.append(row)
        conn = self.conn
        if not self._while_disk_full(
                lambda: insert_batch(conn, batch_id, rows, reactivated=[(it.path, it.sha256) for it in reactivated],
                                         preprocess_ms=pre_ms_total, compute_ms=comp_ms_total, total_ms=pred_ms),
                len(rows)):
            for it in batch:  # stopped while the disk was full: nothing stored, all classified again next time
                self.scanner.report_retry(it.path)
            return
        # Tell the scanner only after the commit: a crash before it means the files are seen again.
        for row in rows:
            self.scanner.report_done(row.path, row.sha256, row.size, row.mtime_ns, row.ctime_ns, row.inode)
        for it in reactivated:
            self.scanner.report_done(it.path, it.sha256, it.size, it.mtime_ns, it.ctime_ns, it.inode)
        for it in retry:
            self.scanner.report_retry(it.path)
        self._count(batch, batch_id, reason, rows)

    def _open_batch(self, batch: list[ReadyFile], reason: str, opened: float, started: float) -> int | None:
        """Record the batch as running; None when the station stopped while the disk was full (the files are
        given back to the scanner, nothing is lost)."""
        assert self.conn is not None and self.summary is not None and self.scanner is not None
        ids: list[int] = []
        conn, run_id = self.conn, self.summary.run_id
        if self._while_disk_full(lambda: ids.append(open_batch(
                conn, run_id=run_id, size=len(batch), reason=reason, opened_at=opened, started_at=started)), len(batch)):
            return ids[0]
        for it in batch:
            self.scanner.report_retry(it.path)
        return None

    def _while_disk_full(self, write: Callable[[], Any], n_files: int) -> bool:
        """Run a database write; while the disk is full, keep the results in memory and retry every few seconds
        (one line says so) until there is space (True) or the station is asked to stop (False: nothing stored)."""
        assert self.conn is not None
        said = False
        while True:
            try:
                write()
                if said and self.reporter:
                    self.reporter.message("[green]disk space is back: the waiting results are stored[/]")
                return True
            except sqlite3.OperationalError as exc:
                if not is_disk_full(exc):
                    raise
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            if not said and self.reporter:
                self.reporter.message(
                    f"[red]{escape_markup(str(disk_full(self.s.db_path)).split(';')[0])}: the results of "
                    f"{n_files} file(s) wait in memory; retrying every {DISK_FULL_RETRY_S:g} s (stopping now "
                    "loses nothing: they are classified again on the next start)[/]")
            said = True
            if self._stop.wait(DISK_FULL_RETRY_S):
                return False

    def _result_row(self, it: ReadyFile, r: dict | None, pred_ms: float, batch_id: int, started: float,
                    done: float) -> ResultRow:
        """The stored row of one file: its prediction ``r``, or the error that kept it from being classified."""
        assert self.summary is not None
        status, error, prob, label, is_blast = "error", it.error, None, None, None
        reason = fallback = ood = None
        pre_ms = comp_ms = None
        if r is not None:
            status = "ok" if r.get("status", "ok") == "ok" and r.get("error") in (None, "") else "error"
            if r.get("status") == "rejected" and r.get("error") in (None, ""):
                status, reason = "rejected", str(r.get("reason") or "rejected")  # never a label, never a blast
            error = None if status != "error" else str(r.get("error") or "prediction failed")
            if r.get("stain_fallback") is not None:
                fallback = int(bool(r.get("stain_fallback")))
            if r.get("ood_score") is not None:
                ood = float(r["ood_score"])
            if r.get("note") and status != "error":  # a file used with a caveat ("TIFF: page 1 of 3 used ...")
                reason = f"{reason} ({r['note']})" if reason else str(r["note"])
            if status == "ok":
                prob = float(r["probability"])
                label = None if r.get("label") is None else str(r["label"])
                is_blast = int(_is_blast(r.get("label"), prob, self.model.positive_label))
            t = r.get("timings") or {}
            pre_ms = _first(t, "preprocess_ms", "preprocess")
            comp_ms = _first(t, "compute_ms", "infer_ms", "inference_ms", "backend_ms", "compute")
            if pre_ms is None and comp_ms is None:
                comp_ms = pred_ms
        started_mono, done_mono = self._mono
        detected_mono = it.detected_mono if it.detected_mono is not None else it.ready_mono
        return ResultRow(
            path=it.path, sha256=it.sha256, size=it.size, mtime_ns=it.mtime_ns, sample_id=it.sample_id, status=status,
            error=error, probability=prob, label=label, is_blast=is_blast, model_id=self.model.model_id,
            preprocess_hash=self.model.preprocess_hash, backend=self.model.backend, run_id=self.summary.run_id,
            batch_id=batch_id, detected_at=it.detected_at, ready_at=it.ready_at, started_at=started, done_at=done,
            queued_ms=max(started_mono - it.ready_mono, 0.0) * 1000, preprocess_ms=pre_ms, compute_ms=comp_ms,
            latency_ms=max(done_mono - detected_mono, 0.0) * 1000, reason=reason, stain_fallback=fallback, ood_score=ood,
            ctime_ns=it.ctime_ns, inode=it.inode,
        )

    def _count(self, batch: list[ReadyFile], batch_id: int, reason: str, rows: list[ResultRow]) -> None:
        assert self.summary is not None
        n_err = sum(1 for r in rows if r.status == "error")
        self.summary.batches += 1
        self.summary.batch_sizes.append(len(batch))
        self.summary.processed += len(rows)
        self.summary.errors += n_err
        self.summary.rejected += sum(1 for r in rows if r.status == "rejected")
        now = time.time()
        with self._stats_lock:
            for row in rows:
                self._done_times.append(now)
                self._latencies.append(row.latency_ms)
        if self.reporter:
            self.reporter.batch_done(self, batch_id, len(batch), reason, rows)

    # -- live numbers --------------------------------------------------------------------------------
    def throughput_1m(self) -> float:
        """Results per second over the last minute (or since the start, if shorter)."""
        now = time.time()
        with self._stats_lock:
            while self._done_times and self._done_times[0] < now - 60:
                self._done_times.popleft()
            n = len(self._done_times)
        return throughput(n, now, self._t_start, 60.0)

    def live(self) -> dict[str, Any]:
        st = self.scanner.stats if self.scanner else None
        with self._stats_lock:
            lat = list(self._latencies)[-500:]
        return {
            "processed": self.summary.processed if self.summary else 0,
            "errors": self.summary.errors if self.summary else 0,
            "batches": self.summary.batches if self.summary else 0,
            "queue_len": len(self.batcher),
            "settling": st.settling if st else 0,
            "throughput_1m": self.throughput_1m(),
            "latency_p50_ms": percentile(lat, 50),
            "latency_p95_ms": percentile(lat, 95),
        }

    def _heartbeat(self) -> None:
        if self.conn is None or self.summary is None:
            return
        d = self.live()
        try:
            self._write_heartbeat(d)
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            with contextlib.suppress(sqlite3.Error):  # a missed heartbeat is harmless: the next one is written
                self.conn.execute("ROLLBACK")

    def _write_heartbeat(self, d: dict[str, Any]) -> None:
        assert self.conn is not None and self.summary is not None
        write_heartbeat(
            self.conn, self.summary.run_id, state="stopping" if self.stopping else "running",
            queue_len=d["queue_len"], settling=d["settling"], processed=d["processed"], errors=d["errors"],
            throughput_1m=d["throughput_1m"], latency_p50_ms=d["latency_p50_ms"], latency_p95_ms=d["latency_p95_ms"],
            batches=d["batches"],
        )


def _unchanged(it: ReadyFile) -> bool:
    try:
        st = os.stat(it.path)
    except OSError:
        return True  # gone: keep whatever the predictor said (it read the file or reported it missing)
    same = (st.st_size, st.st_mtime_ns) == (it.size, it.mtime_ns)
    return same and (it.inode is None or (st.st_ctime_ns, st.st_ino) == (it.ctime_ns, it.inode))


def _first(d: dict, *keys: str) -> float | None:
    for k in keys:
        v = d.get(k)
        if v is not None:
            return float(v)
    return None


def _is_blast(label: Any, prob: float, positive_label: str) -> bool:
    if label is None:
        return prob >= 0.5
    if isinstance(label, (int, bool)) or (isinstance(label, str) and label.isdigit()):
        return int(label) == 1
    return str(label).lower() == positive_label.lower()
