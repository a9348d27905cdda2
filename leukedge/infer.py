"""Batched, pipelined inference over image files, with trtexec-style latency statistics.

While the backend runs batch *k*, a worker thread runs the Rust batch preprocessing
(``leukedge._native.Pipeline.run``, GIL released) for batch *k+1* into the other of two
preallocated input arrays (double buffering), so preprocessing and inference overlap. Results are
identical to a sequential run. When the backend also runs on the CPU, the cores are partitioned between the
two stages (:func:`leukedge.engines.base.plan_threads`): the rayon pool of the preprocessing gets exactly its
share and the backend's intra-op threads the rest, without spin-waiting, so the stages overlap instead of
competing. Per-file problems (unreadable or corrupt images) are reported in the
results file and never stop the run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import __version__
from ._util import (
    NULL_REPORTER,
    POSITIVE_CLASS,
    Reporter,
    atomic_write_text,
    load_native,
    path_raw_b64,
    path_text,
    softmax,
)
from .artifacts import default_model_path as default_model_path
from .config import PreprocessConfig
from .engines import Backend, ModelSpec, ThreadPlan, get_backend, plan_threads, resolve_model
from .ood import OodThreshold, energy_score, ood_threshold_of

RESULT_FIELDS = ("path", "probability", "label", "status", "error", "subject", "true_label", "stain_fallback",
                 "reason", "ood_score", "path_bytes")
MAX_BATCH = 1024  # a bigger batch only makes an allocation fail deep in the runtime (`infer --batch 4096`)
# Smallest batch that is pipelined. Below it the batches run inline, preprocessing then inference on the calling
# thread: at batch 1 the hand-off to the worker thread and the wait behind the previous batch cost more than the
# overlap saves (measured on 2 cores, shipped model, ONNX Runtime FP32: pipelined e2e p50 9.6 ms and 188 img/s,
# inline 207 img/s with e2e p50 ~ preprocessing + backend; benchmarks/results/infer_batch1.json).
PIPELINE_MIN_BATCH = 2
PreprocessFn = Callable[..., tuple[np.ndarray, list[dict[str, Any]]]]


def _native_preprocess() -> PreprocessFn:
    """``preprocess_batch``'s signature on ``leukedge._native.Pipeline``: the config is parsed and validated,
    and its tables built, once per configuration (RuntimeError saying how to build the core when it is not built)."""
    load_native()
    from .config import _native_pipeline

    def run(items: Any, config_json: str, out: Any = None, threads: int = 0) -> Any:
        return _native_pipeline(config_json).run(items, out=out, threads=threads)

    return run


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

    def to_dict(self) -> dict[str, Any]:
        """The row as written: ``path`` as readable text (undecodable bytes and control characters such as a
        carriage return escaped as ``\\xNN``) and, only when that escaping happened, ``path_bytes``: the
        exact name, base64 of ``os.fsencode(path)`` (lossless)."""
        d = asdict(self)
        d["path"], d["path_bytes"] = path_text(self.path), path_raw_b64(self.path)
        for k in ("error", "reason", "subject"):
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


@dataclass
class _Batch:
    index: int
    items: list[Any]
    buf: int = -1
    x: np.ndarray | None = None
    statuses: list[dict[str, Any]] = field(default_factory=list)
    t_prep0: float = 0.0
    t_prep1: float = 0.0

    def input(self) -> np.ndarray:
        """The preprocessed batch (set by :meth:`BatchRunner._prep`)."""
        if self.x is None:
            raise RuntimeError(f"batch {self.index} was not preprocessed")
        return self.x


def pipelined(requested: bool, batch: int) -> bool:
    """Whether batches of ``batch`` items run pipelined when ``requested``: not below :data:`PIPELINE_MIN_BATCH`."""
    return bool(requested) and int(batch) >= PIPELINE_MIN_BATCH


class BatchRunner:
    """Preprocess + infer a list of items in batches, pipelined (double buffered) when ``pipeline`` is asked for
    and the batch is at least :data:`PIPELINE_MIN_BATCH`, else inline on the calling thread."""

    def __init__(self, backend: Backend, config: PreprocessConfig, *, batch: int = 32, threads: int = 0,
                 pipeline: bool = True, preprocess_fn: PreprocessFn | None = None) -> None:
        self.backend = backend
        self.config = config.replace(layout="nchw", dtype=backend.input_dtype)
        self.cfg_json = self.config.to_native_json()
        mb = backend.max_batch
        self.batch = int(min(batch, mb) if mb else batch)
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        self.threads = threads
        self.pipeline_requested = pipeline
        self.pipeline = pipelined(pipeline, self.batch)
        self.preprocess_fn = preprocess_fn or _native_preprocess()
        s = self.config.size
        self.bufs = [np.zeros((self.batch, 3, s, s), dtype=self.config.dtype) for _ in range(2 if self.pipeline else 1)]

    def _prep(self, b: _Batch) -> _Batch:
        n = len(b.items)
        out = self.bufs[b.buf][:n]
        b.t_prep0 = time.perf_counter()
        x, st = self.preprocess_fn(b.items, self.cfg_json, out=out, threads=self.threads)
        b.t_prep1 = time.perf_counter()
        if len(st) != n:
            raise RuntimeError(f"preprocessing returned {len(st)} statuses for {n} items")
        b.x, b.statuses = x, st
        return b

    def warmup(self, iterations: int) -> None:
        if iterations <= 0:
            return
        x = np.zeros_like(self.bufs[0])
        for _ in range(iterations):
            self.backend.infer(x)

    def run(self, items: Sequence[Any], on_batch: Callable[[_Batch, np.ndarray, Any, float], None]) -> float:
        """Calls ``on_batch(batch, logits, timing, t_end)`` in order; returns wall seconds."""
        chunks = [list(items[i:i + self.batch]) for i in range(0, len(items), self.batch)]
        t0 = time.perf_counter()
        if not self.pipeline or len(chunks) <= 1:
            for k, c in enumerate(chunks):
                b = self._prep(_Batch(k, c, buf=0))
                logits, timing = self.backend.infer_timed(b.input())
                on_batch(b, logits, timing, time.perf_counter())
            return time.perf_counter() - t0

        free: queue.Queue[int] = queue.Queue()
        for i in range(len(self.bufs)):
            free.put(i)
        ready: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()

        def worker() -> None:
            try:
                for k, c in enumerate(chunks):
                    i = free.get()
                    if stop.is_set():
                        return
                    ready.put(self._prep(_Batch(k, c, buf=i)))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                ready.put(exc)

        th = threading.Thread(target=worker, name="leukedge-preprocess", daemon=True)
        th.start()
        try:
            for _ in range(len(chunks)):
                b = ready.get()
                if isinstance(b, BaseException):
                    raise b
                try:
                    logits, timing = self.backend.infer_timed(b.input())
                finally:
                    free.put(b.buf)  # the backend has copied / consumed the input
                on_batch(b, logits, timing, time.perf_counter())
        finally:
            stop.set()
            free.put(0)  # unblock the worker if it waits for a buffer
            th.join(timeout=60)
        return time.perf_counter() - t0


class Predictor:
    """Loads a model + backend once and classifies cells; reused by the station and the demo.

    ``model``: bundle dir, export dir, .onnx or engine file (default: the shipped default bundle).
    ``engine``: optional engine file to use with ``model``'s preprocessing (a mismatch is refused).
    ``expected_config``: the caller's preprocessing config; refused if the model's differs.
    ``threads`` / ``backend_threads``: preprocessing (rayon) / backend intra-op threads, 0 = automatic;
    the resulting split is ``self.threads`` (a :class:`ThreadPlan`; rule: ``THREAD_RULE``).
    A ``backend_obj`` is re-configured to the plan's backend thread count.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, backend: str = "auto", batch: int = 32,
                 threads: int = 0, backend_threads: int = 0, pipeline: bool = True, device: str = "auto",
                 precision: str = "auto",
                 engine: str | os.PathLike | None = None, expected_config: PreprocessConfig | None = None,
                 preprocess_fn: PreprocessFn | None = None, backend_obj: Backend | None = None,
                 spec: ModelSpec | None = None, cuda_binding: str = "auto") -> None:
        if spec is None:
            model = Path(model) if model is not None else default_model_path()
            if not model.exists():
                raise FileNotFoundError(f"model {model} not found (pass --model BUNDLE|EXPORT_DIR|ENGINE)")
            spec = resolve_model(model)
        if engine is not None:
            from .engines.sidecar import check_preprocess, read_sidecar

            info = read_sidecar(engine)
            check_preprocess(info, engine, spec.config, f"{spec.kind} {spec.path}")
            spec.engine = Path(engine)
        self.spec = spec
        # Create a CPU backend directly with its share of the cores (an ONNX Runtime session fixes its thread
        # count); if it turns out to run on a GPU, preprocessing gets every core instead.
        # Small batches run inline (PIPELINE_MIN_BATCH): the stages then take turns, each on every core.
        guess = plan_threads(backend_on_cpu=True, pipeline=pipelined(pipeline, batch), preprocess=threads,
                             backend=backend_threads)
        self.backend = backend_obj or get_backend(backend, spec, device=device, expected_config=expected_config,
                                                  threads=guess.backend, precision=precision,
                                                  exclusive=guess.partitioned, cuda_binding=cuda_binding)
        if backend_obj is not None and expected_config is not None:
            expected_config.require_same_pixels(spec.config, what="caller", against=f"model {spec.path}")
        mb = self.backend.max_batch
        self.threads: ThreadPlan = plan_threads(backend_on_cpu=self.backend.on_cpu,
                                                pipeline=pipelined(pipeline, min(batch, mb) if mb else batch),
                                                preprocess=threads, backend=backend_threads)
        if self.backend.on_cpu:
            self.backend.set_threads(self.threads.backend, exclusive=self.threads.partitioned)
        self.reason = self.backend.reason
        self.class_names = spec.class_names
        self.pos_index = (self.class_names.index(POSITIVE_CLASS) if POSITIVE_CLASS in self.class_names
                          else len(self.class_names) - 1)
        self.runner = BatchRunner(self.backend, spec.config, batch=batch, threads=self.threads.preprocess,
                                  pipeline=pipeline, preprocess_fn=preprocess_fn)
        self.config = self.runner.config
        self.ood: OodThreshold | None = ood_threshold_of(spec)

    @property
    def batch(self) -> int:
        return self.runner.batch

    def _results_for(self, b: _Batch, logits: np.ndarray, meta: Sequence[dict[str, Any]] | None) -> list[FileResult]:
        """One result per item: ``error`` (preprocessing failed, or a non-finite model output), ``rejected``
        (the cell quality gate of the Rust core, or an energy score above the model's OOD threshold) or
        ``ok``. A rejected item never gets a probability or a label."""
        n = len(b.items)
        finite = np.isfinite(logits[:n]).all(axis=1)
        with np.errstate(invalid="ignore", over="ignore"):
            probs = softmax(logits[:n])[:, self.pos_index]
            scores = energy_score(logits[:n])
        preds = logits[:n].argmax(1)
        out = []
        for j, (item, st) in enumerate(zip(b.items, b.statuses)):
            m = meta[b.index * self.batch + j] if meta is not None else {}
            path = str(item) if not isinstance(item, np.ndarray) else m.get("path", f"<array {b.index * self.batch + j}>")
            subject, true_label = m.get("subject"), m.get("true_label")
            fallback = bool(st.get("stain_fallback", False))
            if not st.get("ok"):
                out.append(FileResult(path, None, None, "error", str(st.get("error") or "preprocessing failed"),
                                      subject, true_label, False))
            elif st.get("rejected"):
                out.append(FileResult(path, None, None, "rejected", None, subject, true_label, fallback,
                                      reason=str(st["rejected"])))
            elif not finite[j]:
                out.append(FileResult(path, None, None, "error",
                                      "the model produced a non-finite output (NaN or inf) for this image; its weights "
                                      "are probably corrupt", subject, true_label, False))
            elif self.ood is not None and scores[j] > self.ood.threshold:
                out.append(FileResult(path, None, None, "rejected", None, subject, true_label, fallback,
                                      reason=self.ood.reason(float(scores[j])), ood_score=float(scores[j])))
            else:
                out.append(FileResult(path, float(probs[j]), self.class_names[int(preds[j])], "ok", None,
                                      subject, true_label, fallback, ood_score=float(scores[j])))
        return out

    def predict(self, items: Sequence[str | os.PathLike | np.ndarray], meta: Sequence[dict[str, Any]] | None = None,
                progress: Callable[[int], None] | None = None) -> list[FileResult]:
        """Classify paths (or decoded uint8 HxWx3 arrays); one :class:`FileResult` per item, in order."""
        return self.predict_timed(items, meta, progress)[0]

    def predict_timed(self, items: Sequence[str | os.PathLike | np.ndarray], meta: Sequence[dict[str, Any]] | None = None,
                      progress: Callable[[int], None] | None = None,
                      on_results: Callable[[list[FileResult]], None] | None = None,
                      ) -> tuple[list[FileResult], dict[str, list[float]], float]:
        """:meth:`predict` plus the per-batch times in ms (``preprocess``, ``backend``, ``compute``, ``h2d``,
        ``d2h``, ``e2e``; lists, one entry per batch) and the wall time in seconds. ``on_results`` gets each
        batch's results as soon as the batch is done (``infer`` streams them to its output file)."""
        items = [str(i) if isinstance(i, os.PathLike) else i for i in items]
        if meta is None:  # subject and true label from C-NMC file names, as `infer` gives them
            meta = [name_meta(i) if isinstance(i, str) else {} for i in items]
        results: list[FileResult] = []
        times: dict[str, list[float]] = {"preprocess": [], "compute": [], "h2d": [], "d2h": [], "backend": [], "e2e": []}

        def on_batch(b: _Batch, logits: np.ndarray, timing: Any, t_end: float) -> None:
            batch_results = self._results_for(b, logits, meta)
            results.extend(batch_results)
            if on_results is not None:
                on_results(batch_results)
            times["preprocess"].append((b.t_prep1 - b.t_prep0) * 1e3)
            times["backend"].append(timing.total_ms)
            if timing.compute_ms is not None:
                times["compute"].append(timing.compute_ms)
            if timing.h2d_ms is not None:
                times["h2d"].append(timing.h2d_ms)
            if timing.d2h_ms is not None:
                times["d2h"].append(timing.d2h_ms)
            times["e2e"].append((t_end - b.t_prep0) * 1e3)
            if progress is not None:
                progress(len(b.items))

        wall = self.runner.run(items, on_batch)
        return results, times, wall

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
def name_meta(path: str) -> dict[str, Any]:
    """``{"subject", "true_label"}`` of a C-NMC file name (``UID_H3_1_2_hem.bmp``), empty for other names."""
    from .data import parse_name

    parsed = parse_name(path)
    return {} if parsed is None else {"subject": parsed.subject, "true_label": parsed.class_name}


def discover_sources(sources: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """``[{"path", "subject", "true_label"}]`` for every image under ``sources`` (files, folders, globs, lists)."""
    from .data import discover

    out = []
    for r in discover(list(sources)):
        out.append({"path": str(r.path), "subject": r.subject,
                    "true_label": r.class_name if r.label in (0, 1) else None})
    return out


def format_results(results: Sequence[FileResult], suffix: str, header: bool = True) -> str:
    """Rows as CSV (with the header line when ``header``) or JSON lines, by ``suffix``; every row ends in a
    newline, so a file they are appended to is valid after every batch."""
    buf = io.StringIO()
    if suffix == ".csv":
        w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, lineterminator="\n")
        if header:
            w.writeheader()
        for r in results:
            d = r.to_dict()
            d["probability"] = "" if r.probability is None else f"{r.probability:.6f}"
            w.writerow({k: ("" if d[k] is None else d[k]) for k in RESULT_FIELDS})
    elif suffix in (".jsonl", ".json", ".ndjson"):
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
    import base64

    return {os.fsdecode(base64.b64decode(r["path_bytes"])) if r.get("path_bytes") else str(r.get("path"))
            for r in rows}


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
            import shutil

            shutil.copyfile(self.final, self.partial)
        elif self.partial.exists():
            self.partial.unlink()
        new = not self.partial.exists() or self.partial.stat().st_size == 0
        self._f = open(self.partial, "a", encoding="utf-8", newline="")
        if new and self.suffix == ".csv":
            self._write(format_results([], self.suffix, header=True))

    def _write(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, results: Sequence[FileResult]) -> None:
        try:
            self._write(format_results(results, self.suffix, header=False))
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


RESULT_SUFFIXES = (".csv", ".jsonl", ".json", ".ndjson")


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse a results path that could not be written, *before* any work: a wrong suffix, a folder
    that cannot be created, a read-only or full file system (a probe file is created and removed)."""
    import tempfile

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


def inference_stats(pred: Predictor, results: Sequence[FileResult], times: dict[str, list[float]], wall: float,
                    warmup: int) -> dict[str, Any]:
    """The ``.stats.json`` of a run: model, backend and why, threads, latency percentiles per stage, throughput."""
    n = len(results)
    n_ok = sum(r.status == "ok" for r in results)
    stats: dict[str, Any] = {
        "model": str(pred.spec.path),
        "model_kind": pred.spec.kind,
        "engine": str(pred.spec.engine) if pred.spec.engine else None,
        "backend": pred.backend.name,
        "backend_description": pred.backend.description,
        "backend_reason": pred.reason,
        "preprocess_hash": pred.spec.preprocess_hash,
        "input_dtype": pred.backend.input_dtype,
        "input_size": pred.config.size,
        "batch": pred.batch,
        "pipeline": pred.runner.pipeline,
        "pipeline_requested": pred.runner.pipeline_requested,
        "threads": {**pred.threads.to_dict(), "preprocess": pred.runner.threads,
                    "backend": getattr(pred.backend, "threads", pred.threads.backend)},
        "warmup": warmup,
        "n_files": n,
        "n_ok": n_ok,
        "n_rejected": sum(r.status == "rejected" for r in results),
        "n_error": sum(r.status == "error" for r in results),
        "ood_threshold": pred.ood.to_dict() if pred.ood is not None else None,
        "n_batches": len(times["e2e"]),
        "wall_s": wall,
        "throughput_img_s": n / wall if wall > 0 else None,
        "latency_ms": {
            "preprocess": summarize_ms(times["preprocess"]),
            "h2d": summarize_ms(times["h2d"]),
            "compute": summarize_ms(times["compute"]),
            "d2h": summarize_ms(times["d2h"]),
            "backend_total": summarize_ms(times["backend"]),
            "end_to_end": summarize_ms(times["e2e"]),
        },
        "stage_throughput_img_s": {
            "preprocess": n / (sum(times["preprocess"]) / 1e3) if times["preprocess"] and sum(times["preprocess"]) else None,
            "backend": n / (sum(times["backend"]) / 1e3) if times["backend"] and sum(times["backend"]) else None,
        },
        "latency_unit": "milliseconds per batch",
        "leukedge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return stats


def run_inference(
    model: str | os.PathLike | None,
    sources: Iterable[str | os.PathLike],
    out_path: str | os.PathLike | None = None,
    *,
    batch: int = 32,
    backend: str = "auto",
    threads: int = 0,
    backend_threads: int = 0,
    pipeline: bool = True,
    warmup: int = 2,
    limit: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    engine: str | os.PathLike | None = None,
    progress: bool = False,
    reporter: Reporter | None = None,
    predictor: Predictor | None = None,
    preprocess_fn: PreprocessFn | None = None,
    cuda_binding: str = "auto",
    resume: bool = False,
) -> InferResult:
    """Classify every image under ``sources``; write results (CSV/JSONL) + ``.stats.json`` if ``out_path``.

    ``progress``: report the files done to ``reporter`` (the CLI passes one that draws a progress bar).
    Rows are streamed to ``OUT.partial`` as batches finish (:class:`ResultStream`) and moved to ``OUT`` at
    the end. On SIGINT the finished rows stay in ``OUT.partial`` and :class:`InferenceInterrupted` says so;
    ``resume`` skips the files that already have a row there (or in ``OUT``) and appends the rest.
    """
    if out_path is not None:
        check_output_path(out_path)
    entries = discover_sources(sources)
    if limit is not None:
        entries = entries[:limit]
    n_found = len(entries)
    own = predictor is None
    pred = predictor or Predictor(model, backend=backend, batch=batch, threads=threads, backend_threads=backend_threads,
                                  pipeline=pipeline, device=device, precision=precision, engine=engine,
                                  preprocess_fn=preprocess_fn, cuda_binding=cuda_binding)
    stream: ResultStream | None = None
    try:
        pred.runner.warmup(warmup)
        if out_path is not None:
            stream = ResultStream(out_path, resume=resume)
            if stream.done:
                entries = [e for e in entries if e["path"] not in stream.done]
        rep = reporter if progress and entries and reporter is not None else NULL_REPORTER
        with rep.progress("infer", total=len(entries), transient=True) as task:
            results, times, wall = pred.predict_timed([e["path"] for e in entries], entries, task.advance,
                                                      on_results=stream.append if stream is not None else None)
        stats = inference_stats(pred, results, times, wall, warmup)
        stats["n_resumed"] = n_found - len(entries)
        res = InferResult(results, stats, backend=pred.backend.name, reason=pred.reason)
        if stream is not None:
            res.out_path = stream.finish()
            res.stats_path = stats_path_for(out_path or "")
            try:
                atomic_write_text(res.stats_path, json.dumps(stats, indent=2) + "\n")
            except OSError as exc:
                raise ResultsNotWritten(f"the results are in {res.out_path}, but the statistics could not be written to "
                                        f"{res.stats_path}: {exc.strerror or exc}") from exc
        return res
    except KeyboardInterrupt as exc:
        if stream is None or stream.written + len(stream.done) == 0:
            if stream is not None:
                stream.abandon()
            raise InferenceInterrupted("interrupted before any file was classified; nothing was written") from exc
        stream.close()
        raise InferenceInterrupted(
            f"interrupted: {stream.written + len(stream.done)} of {n_found} file(s) have their results in "
            f"{stream.partial}; run the same command with --resume to classify only the rest") from exc
    finally:
        if stream is not None:
            stream.close()
        if own:
            pred.close()


