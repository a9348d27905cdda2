"""Batched, pipelined preprocessing + inference over a list of items (paths or decoded arrays).

While the backend runs batch *k*, a worker thread runs the Rust batch preprocessing
(``leukedge._native.Pipeline.run``, GIL released) for batch *k+1* into the other of two
preallocated input arrays (double buffering), so preprocessing and inference overlap. Results are
identical to a sequential run. The runner holds the native Pipeline of its config for the whole run.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .._util import load_native
from ..config import PreprocessConfig, native_pipeline
from ..engines import Backend

MAX_BATCH = 1024  # a bigger batch only makes an allocation fail deep in the runtime (`infer --batch 4096`)
# Smallest batch that is pipelined. Below it the batches run inline, preprocessing then inference on the calling
# thread: at batch 1 the hand-off to the worker thread and the wait behind the previous batch cost more than the
# overlap saves (measured on 2 cores, shipped model, ONNX Runtime FP32: pipelined e2e p50 9.6 ms and 188 img/s,
# inline 207 img/s with e2e p50 ~ preprocessing + backend; benchmarks/results/infer_batch1.json).
PIPELINE_MIN_BATCH = 2
PreprocessFn = Callable[..., tuple[np.ndarray, list[dict[str, Any]]]]




def native_preprocess() -> PreprocessFn:
    """A :data:`PreprocessFn` over the Rust core (``leukedge._native.Pipeline``, one per configuration, cached), for
    callers that wrap the preprocessing step (tests, benchmarks); a :class:`BatchRunner` without ``preprocess_fn``
    holds its Pipeline itself. RuntimeError saying how to build the core when it is not built."""
    load_native()

    def run(items: Any, config_json: str, out: Any = None, threads: int = 0) -> Any:
        return native_pipeline(config_json).run(items, out=out, threads=threads)

    return run


@dataclass
class Batch:
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
        want = {"layout": "nchw", "dtype": backend.input_dtype}
        # the model's config as it is when it already has the backend's layout and dtype (not built again)
        self.config = config if (config.layout, config.dtype) == tuple(want.values()) else config.replace(**want)
        self.cfg_json = self.config.to_native_json()
        mb = backend.max_batch
        self.batch = int(min(batch, mb) if mb else batch)
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        self.threads = threads
        self.pipeline_requested = pipeline
        self.pipeline = pipelined(pipeline, self.batch)
        self.preprocess_fn = preprocess_fn
        # the native Pipeline of this config, built (parsed, validated, tables) once and held for the whole run
        self.preprocessor = None if preprocess_fn is not None else self.config.pipeline()
        s = self.config.size
        self.bufs = [np.zeros((self.batch, 3, s, s), dtype=self.config.dtype) for _ in range(2 if self.pipeline else 1)]

    def _prep(self, b: Batch) -> Batch:
        n = len(b.items)
        out = self.bufs[b.buf][:n]
        b.t_prep0 = time.perf_counter()
        if self.preprocessor is not None:
            x, st = self.preprocessor.run(b.items, out=out, threads=self.threads)
        else:
            assert self.preprocess_fn is not None
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

    def run(self, items: Sequence[Any], on_batch: Callable[[Batch, np.ndarray, Any, float], None]) -> float:
        """Calls ``on_batch(batch, logits, timing, t_end)`` in order; returns wall seconds."""
        chunks = [list(items[i:i + self.batch]) for i in range(0, len(items), self.batch)]
        t0 = time.perf_counter()
        if not self.pipeline or len(chunks) <= 1:
            for k, c in enumerate(chunks):
                b = self._prep(Batch(k, c, buf=0))
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
                    ready.put(self._prep(Batch(k, c, buf=i)))
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


