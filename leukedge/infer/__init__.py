"""Inference: classify cell images with a model loaded once.

* :mod:`.predictor`: :class:`Predictor` (model, backend, thread split and preprocessing, loaded once;
  ``predict`` / ``classify_batch``) and :func:`run_inference`, the library face of ``leukedge infer``;
* :mod:`.runner`: :class:`BatchRunner`, batched preprocessing ∥ inference (double buffered), holding the
  native Pipeline of its config;
* :mod:`.results`: :class:`FileResult`, the results file (CSV / JSON lines / Parquet; streamed and resumable)
  and the latency statistics;
* :mod:`.ray`: the same job on Ray Data (``leukedge infer --ray``; imported on demand, needs ``leukedge[ray]``).
"""

from ..formats.bundle import default_model_path
from .predictor import Predictor, discover_sources, inference_stats, name_meta, run_inference
from .results import (
    PARQUET_SUFFIX,
    RESULT_FIELDS,
    RESULT_SUFFIXES,
    FileResult,
    InferenceInterrupted,
    InferResult,
    ResultsNotWritten,
    ResultStream,
    check_output_path,
    done_paths,
    format_results,
    partial_path_for,
    stats_path_for,
    summarize_ms,
    write_results,
    write_stats,
)
from .runner import MAX_BATCH, PIPELINE_MIN_BATCH, Batch, BatchRunner, PreprocessFn, native_preprocess, pipelined

__all__ = [
    "MAX_BATCH", "PARQUET_SUFFIX", "PIPELINE_MIN_BATCH", "RESULT_FIELDS", "RESULT_SUFFIXES", "Batch", "BatchRunner",
    "FileResult", "InferResult", "InferenceInterrupted", "Predictor", "PreprocessFn", "ResultStream",
    "ResultsNotWritten", "check_output_path", "default_model_path", "discover_sources", "done_paths", "format_results",
    "inference_stats", "name_meta", "native_preprocess", "partial_path_for", "pipelined", "run_inference",
    "stats_path_for", "summarize_ms", "write_results", "write_stats",
]
