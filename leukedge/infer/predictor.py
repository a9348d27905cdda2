"""The :class:`Predictor` (a model, its backend and its preprocessing, loaded once) and ``leukedge infer``'s
:func:`run_inference` over files, folders, globs and list files, with trtexec-style latency statistics.

When the backend also runs on the CPU, the cores are partitioned between the two stages
(:func:`leukedge.engines.threads.plan_threads`): the rayon pool of the preprocessing gets exactly its share and the
backend's intra-op threads the rest, without spin-waiting, so the stages overlap instead of competing. Per-file
problems (unreadable or corrupt images) are reported in the results file and never stop the run.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .._util import NULL_REPORTER, POSITIVE_CLASS, Reporter, softmax
from .._version import __version__
from ..config import PreprocessConfig
from ..engines import Backend, ThreadPlan, get_backend, plan_threads
from ..model import ModelSpec, open_model
from ..ood import OodThreshold, energy_score, ood_threshold_of
from .results import (
    FileResult,
    InferenceInterrupted,
    InferResult,
    ResultsNotWritten,
    ResultStream,
    check_output_path,
    stats_path_for,
    summarize_ms,
    write_stats,
)
from .runner import Batch, BatchRunner, PreprocessFn, pipelined


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
            spec = open_model(model, engine)
        elif engine is not None:
            spec.use_engine(engine)
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

    def results_for(self, b: Batch, logits: np.ndarray, meta: Sequence[dict[str, Any]] | None) -> list[FileResult]:
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
            note = st.get("note") or None
            if not st.get("ok"):
                out.append(FileResult(path, None, None, "error", str(st.get("error") or "preprocessing failed"),
                                      subject, true_label, False))
            elif st.get("rejected"):
                out.append(FileResult(path, None, None, "rejected", None, subject, true_label, fallback,
                                      reason=str(st["rejected"]), note=note))
            elif not finite[j]:
                out.append(FileResult(path, None, None, "error",
                                      "the model produced a non-finite output (NaN or inf) for this image; its weights "
                                      "are probably corrupt", subject, true_label, False))
            elif self.ood is not None and scores[j] > self.ood.threshold:
                out.append(FileResult(path, None, None, "rejected", None, subject, true_label, fallback,
                                      reason=self.ood.reason(float(scores[j])), ood_score=float(scores[j]), note=note))
            else:
                out.append(FileResult(path, float(probs[j]), self.class_names[int(preds[j])], "ok", None,
                                      subject, true_label, fallback, ood_score=float(scores[j]), note=note))
        return out

    def classify_batch(self, paths: Sequence[str], x: np.ndarray, statuses: Sequence[dict[str, Any]]) -> list[FileResult]:
        """Classify an already preprocessed input ``x`` (NCHW, this model's preprocessing; ``statuses``: the Rust
        core's per-item statuses), at most :attr:`batch` items per backend call: one :class:`FileResult` per path,
        by the rules of :meth:`results_for` (the Ray job's model stage; no subject or true label)."""
        out: list[FileResult] = []
        for i in range(0, len(paths), self.batch):
            b = Batch(0, list(paths[i:i + self.batch]), x=x[i:i + self.batch], statuses=list(statuses[i:i + self.batch]))
            out.extend(self.results_for(b, self.backend.infer(b.input()), None))
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

        def on_batch(b: Batch, logits: np.ndarray, timing: Any, t_end: float) -> None:
            batch_results = self.results_for(b, logits, meta)
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
    from ..data import parse_name

    parsed = parse_name(path)
    return {} if parsed is None else {"subject": parsed.subject, "true_label": parsed.class_name}


def discover_sources(sources: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """``[{"path", "subject", "true_label"}]`` for every image under ``sources`` (files, folders, globs, lists)."""
    from ..data import discover

    out = []
    for r in discover(list(sources)):
        out.append({"path": str(r.path), "subject": r.subject,
                    "true_label": r.class_name if r.label in (0, 1) else None})
    return out


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
                write_stats(stats, out_path or "")
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


