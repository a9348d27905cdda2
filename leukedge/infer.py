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
from ._util import NULL_REPORTER, POSITIVE_CLASS, Reporter, atomic_write_text, load_native, softmax
from .artifacts import default_model_path as default_model_path
from .config import PreprocessConfig
from .engines import Backend, ModelSpec, ThreadPlan, get_backend, plan_threads, resolve_model

RESULT_FIELDS = ("path", "probability", "label", "status", "error", "subject", "true_label", "stain_fallback")
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
    status: str  # "ok" | "error"
    error: str | None = None
    subject: str | None = None
    true_label: str | None = None
    stain_fallback: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        return sum(r.status != "ok" for r in self.results)


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

    @property
    def batch(self) -> int:
        return self.runner.batch

    def _results_for(self, b: _Batch, logits: np.ndarray, meta: Sequence[dict[str, Any]] | None) -> list[FileResult]:
        finite = np.isfinite(logits[: len(b.items)]).all(axis=1)
        with np.errstate(invalid="ignore", over="ignore"):
            probs = softmax(logits[: len(b.items)])[:, self.pos_index]
        preds = logits[: len(b.items)].argmax(1)
        out = []
        for j, (item, st) in enumerate(zip(b.items, b.statuses)):
            m = meta[b.index * self.batch + j] if meta is not None else {}
            path = str(item) if not isinstance(item, np.ndarray) else m.get("path", f"<array {b.index * self.batch + j}>")
            if st.get("ok") and not finite[j]:
                out.append(FileResult(path, None, None, "error",
                                      "the model produced a non-finite output (NaN or inf) for this image; its weights "
                                      "are probably corrupt", m.get("subject"), m.get("true_label"), False))
            elif st.get("ok"):
                out.append(FileResult(path, float(probs[j]), self.class_names[int(preds[j])], "ok", None,
                                      m.get("subject"), m.get("true_label"), bool(st.get("stain_fallback", False))))
            else:
                out.append(FileResult(path, None, None, "error", str(st.get("error") or "preprocessing failed"),
                                      m.get("subject"), m.get("true_label"), False))
        return out

    def predict(self, items: Sequence[str | os.PathLike | np.ndarray], meta: Sequence[dict[str, Any]] | None = None,
                progress: Callable[[int], None] | None = None) -> list[FileResult]:
        """Classify paths (or decoded uint8 HxWx3 arrays); one :class:`FileResult` per item, in order."""
        return self.predict_timed(items, meta, progress)[0]

    def predict_timed(self, items: Sequence[str | os.PathLike | np.ndarray], meta: Sequence[dict[str, Any]] | None = None,
                      progress: Callable[[int], None] | None = None
                      ) -> tuple[list[FileResult], dict[str, list[float]], float]:
        """:meth:`predict` plus the per-batch times in ms (``preprocess``, ``backend``, ``compute``, ``h2d``,
        ``d2h``, ``e2e``; lists, one entry per batch) and the wall time in seconds."""
        items = [str(i) if isinstance(i, os.PathLike) else i for i in items]
        results: list[FileResult] = []
        times: dict[str, list[float]] = {"preprocess": [], "compute": [], "h2d": [], "d2h": [], "backend": [], "e2e": []}

        def on_batch(b: _Batch, logits: np.ndarray, timing: Any, t_end: float) -> None:
            results.extend(self._results_for(b, logits, meta))
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
def discover_sources(sources: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """``[{"path", "subject", "true_label"}]`` for every image under ``sources`` (files, folders, globs, lists)."""
    from .data import discover

    out = []
    for r in discover(list(sources)):
        out.append({"path": str(r.path), "subject": r.subject,
                    "true_label": r.class_name if r.label in (0, 1) else None})
    return out


def write_results(results: Sequence[FileResult], path: str | os.PathLike) -> Path:
    """CSV or JSONL (by suffix), written atomically (temp file + os.replace)."""
    path = Path(path)
    suffix = path.suffix.lower()
    buf = io.StringIO()
    if suffix == ".csv":
        w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in results:
            d = r.to_dict()
            d["probability"] = "" if r.probability is None else f"{r.probability:.6f}"
            w.writerow({k: ("" if d[k] is None else d[k]) for k in RESULT_FIELDS})
    elif suffix in (".jsonl", ".json", ".ndjson"):
        for r in results:
            buf.write(json.dumps(r.to_dict()) + "\n")
    else:
        raise ValueError(f"{path}: results file must end in .csv or .jsonl")
    atomic_write_text(path, buf.getvalue())
    return path


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
        "n_error": n - n_ok,
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
) -> InferResult:
    """Classify every image under ``sources``; write results (CSV/JSONL) + ``.stats.json`` if ``out_path``.

    ``progress``: report the files done to ``reporter`` (the CLI passes one that draws a progress bar).
    """
    if out_path is not None:
        check_output_path(out_path)
    entries = discover_sources(sources)
    if limit is not None:
        entries = entries[:limit]
    own = predictor is None
    pred = predictor or Predictor(model, backend=backend, batch=batch, threads=threads, backend_threads=backend_threads,
                                  pipeline=pipeline, device=device, precision=precision, engine=engine,
                                  preprocess_fn=preprocess_fn, cuda_binding=cuda_binding)
    try:
        pred.runner.warmup(warmup)
        rep = reporter if progress and entries and reporter is not None else NULL_REPORTER
        with rep.progress("infer", total=len(entries), transient=True) as task:
            results, times, wall = pred.predict_timed([e["path"] for e in entries], entries, task.advance)
        stats = inference_stats(pred, results, times, wall, warmup)
        n = len(results)
        res = InferResult(results, stats, backend=pred.backend.name, reason=pred.reason)
        if out_path is not None:
            try:
                res.out_path = write_results(results, out_path)
                res.stats_path = stats_path_for(out_path)
                atomic_write_text(res.stats_path, json.dumps(stats, indent=2) + "\n")
            except OSError as exc:
                raise ResultsNotWritten(
                    f"the results of {n} file(s) could not be written to {out_path}: {exc.strerror or exc} "
                    "(nothing was written there; free some space or choose another -o)") from exc
        return res
    finally:
        if own:
            pred.close()


