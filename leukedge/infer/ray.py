"""Archive-scale inference as a Ray Data job (``leukedge infer SOURCES --ray [ADDRESS]``).

The job is three stages of one :class:`ray.data.Dataset`:

1. the file list (``{"idx", "path"}`` rows, discovered on the driver exactly as plain ``infer`` does);
2. ``map_batches`` of the Rust batch preprocessing (``leukedge._native.Pipeline.run``, GIL released)
   in stateless CPU tasks, producing normalised NCHW float32 batches and a per-file status;
3. ``map_batches`` of the chosen backend in an actor pool (:class:`_Classify`): every actor loads the
   model once (a :class:`leukedge.infer.Predictor`, so backend choice and fallbacks are those of plain
   ``infer``), on one GPU each when the cluster has GPUs, otherwise on CPUs.

Rows come back to the driver as they finish (progress: files/s and the failed count), are put back in
file order and written with the same writer as plain ``infer`` (``.csv`` / ``.jsonl``) or as Parquet
(``.parquet``, for large runs): the same rows, the same probabilities, the same per-file errors.

Before any task starts, the driver resolves the model, checks an engine's preprocessing hash against the
model's (as plain ``infer`` does) and that the preprocessing the CPU stage will run has the model's pixel
hash; every actor checks that the model it loaded has that hash too.

``address``: ``"local"`` starts a private local Ray instance (stopped afterwards); ``"auto"`` joins the
cluster this machine belongs to (``ray start``); anything else is passed to :func:`ray.init` (e.g.
``ray://head:10001``). On a cluster, the image files and the model must be readable at the same paths on
every node (a shared file system) and leukedge (``pip install "leukedge[ray]"``) installed on each.

Library code: no Click or Rich here; the ``--ray`` branch of ``leukedge infer`` (``leukedge/cli/infer.py``) prints.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..config import native_pipeline
from .predictor import discover_sources
from .results import (
    PARQUET_SUFFIX,
    FileResult,
    InferResult,
    ResultsNotWritten,
    check_output_path_any,
    write_parquet,
    write_results,
    write_stats,
)

#: Bytes reserved by each preprocessing task (a batch of decoded cells and its float32 NCHW output).
PREPROCESS_TASK_MEMORY = 256 << 20


class RayUnavailable(RuntimeError):
    """Ray (Ray Data) is not installed or no cluster could be reached."""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayUnavailable('`infer --ray` needs Ray Data: pip install "leukedge[ray]"') from exc
    return ray


@dataclass
class RayProgress:
    """What the driver knows while the job runs (handed to the ``progress`` callback)."""

    done: int
    total: int
    failed: int
    seconds: float

    @property
    def files_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# stage 2: Rust preprocessing (stateless CPU tasks)
def preprocess_stage(batch: dict[str, np.ndarray], *, cfg_json: str, threads: int = 1) -> dict[str, np.ndarray]:
    """``{"idx", "path"}`` -> ``{"idx", "path", "x" (N,3,S,S) float32, "ok", "error", "stain_fallback"}``.

    Per-file problems come back as ``ok=False`` rows (zero-filled ``x``); should the whole call fail, the
    files are retried one by one so that one bad file still costs only its own row."""
    preprocess_batch = native_pipeline(cfg_json).run  # parsed and validated once per worker process
    paths = [str(p) for p in batch["path"]]
    try:
        x, statuses = preprocess_batch(paths, threads=threads)
    except Exception:  # noqa: BLE001 - isolate the culprit file by file
        xs, statuses = [], []
        for p in paths:
            try:
                xi, st = preprocess_batch([p], threads=threads)
                xs.append(xi[0])
                statuses.append(st[0])
            except Exception as exc:  # noqa: BLE001 - becomes this file's error row
                xs.append(None)
                statuses.append({"ok": False, "error": f"{p}: {exc}"})
        shape = next((a.shape for a in xs if a is not None), None)
        if shape is None:
            cfg = json.loads(cfg_json)
            shape = (3, int(cfg["size"]), int(cfg["size"]))
        x = np.stack([a if a is not None else np.zeros(shape, np.float32) for a in xs]) if xs else \
            np.zeros((0, *shape), np.float32)
    return {
        "idx": np.asarray(batch["idx"], dtype=np.int64),
        "path": np.asarray(paths, dtype=object),
        "x": np.ascontiguousarray(x, dtype=np.float32),
        "ok": np.array([bool(s.get("ok")) for s in statuses], dtype=bool),
        "error": np.array([str(s.get("error") or "") for s in statuses], dtype=object),
        "stain_fallback": np.array([bool(s.get("stain_fallback", False)) for s in statuses], dtype=bool),
        "rejected": np.array([str(s.get("rejected") or "") for s in statuses], dtype=object),
        "note": np.array([str(s.get("note") or "") for s in statuses], dtype=object),
    }


# --------------------------------------------------------------------------------------------
# stage 3: the backend, one model per actor
class _Classify:
    """Ray Data callable class: loads the model once per actor and classifies preprocessed batches."""

    def __init__(self, model: str, engine: str | None, backend: str, device: str, precision: str, threads: int,
                 expected_hash: str, batch: int, cuda_binding: str = "auto") -> None:
        from .predictor import Predictor

        self.pred = Predictor(model, engine=engine, backend=backend, batch=batch, device=device, precision=precision,
                              threads=1, backend_threads=threads, pipeline=False, cuda_binding=cuda_binding)
        got = self.pred.spec.preprocess_hash
        if got != expected_hash:
            raise RuntimeError(f"model {model} on this worker has preprocessing {got[:12]}, the driver checked "
                               f"{expected_hash[:12]}: the nodes see different files")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        x = np.asarray(batch["x"])
        rejected = batch["rejected"] if "rejected" in batch else [""] * len(batch["ok"])
        notes = batch["note"] if "note" in batch else [""] * len(batch["ok"])
        statuses = [{"ok": bool(o), "error": (str(e) or None), "stain_fallback": bool(f), "rejected": (str(r) or None),
                     "note": (str(t) or None)}
                    for o, e, f, r, t in zip(batch["ok"], batch["error"], batch["stain_fallback"], rejected, notes)]
        rows = self.pred.classify_batch(paths, x, statuses)  # the row logic of plain `infer`
        return {
            "idx": np.asarray(batch["idx"], dtype=np.int64),
            "probability": np.array([np.nan if r.probability is None else r.probability for r in rows], np.float64),
            "label": np.array([r.label or "" for r in rows], dtype=object),
            "status": np.array([r.status for r in rows], dtype=object),
            "error": np.array([r.error or "" for r in rows], dtype=object),
            "stain_fallback": np.array([r.stain_fallback for r in rows], dtype=bool),
            "reason": np.array([r.reason or "" for r in rows], dtype=object),
            "ood_score": np.array([np.nan if r.ood_score is None else r.ood_score for r in rows], np.float64),
            "note": np.array([r.note or "" for r in rows], dtype=object),
            "backend": np.array([self.pred.backend.name] * len(rows), dtype=object),
        }


# --------------------------------------------------------------------------------------------
def check_ray_output_path(path: str | os.PathLike) -> Path:
    """Like :func:`leukedge.infer.check_output_path`, also accepting ``.parquet``."""
    return check_output_path_any(path, parquet=True)


def _start(address: str, num_cpus: int | None) -> tuple[Any, bool]:
    ray = _import_ray()
    if ray.is_initialized():
        return ray, False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"}
    if address == "local":
        # a private instance on this machine: loopback only
        kwargs.update(address="local", num_cpus=num_cpus or None, _node_ip_address="127.0.0.1")
        kwargs["object_store_memory"] = int(os.environ.get("LEUKEDGE_RAY_OBJECT_STORE", str(1 << 30)))
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"cannot start or reach Ray at {address!r}: {exc}") from exc
    return ray, True


def _checked_model(model: str | os.PathLike | None, engine: str | os.PathLike | None) -> tuple[Path, Any, Any]:
    """The checks before the job: the model exists, an engine's preprocessing hash matches the model's and
    the preprocessing the CPU stage will run has the model's pixel hash. Returns (model path, spec, stage config)."""
    from ..config import ConfigMismatchError
    from ..model import open_model

    spec = open_model(model, engine)
    model_path = spec.path
    stage_cfg = spec.config.replace(layout="nchw", dtype="float32")
    if stage_cfg.pixel_hash() != spec.preprocess_hash:
        raise ConfigMismatchError(f"internal error: the preprocessing stage would not reproduce model {spec.path}'s "
                                  f"pixels ({stage_cfg.pixel_hash()[:12]} vs {spec.preprocess_hash[:12]})")
    return model_path, spec, stage_cfg


@dataclass
class _Plan:
    """Where the model actors run: pool size, GPUs / CPUs per actor, backend threads."""

    pool: int
    use_gpu: bool
    actor_cpus: float
    backend_threads: int
    cluster_cpus: int
    cluster_gpus: int


def _plan(ray: Any, device: str, actors: int, cpus_per_actor: int) -> _Plan:
    res = ray.cluster_resources()
    n_cpu, n_gpu = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    if n_gpu > 0 and device != "cpu":
        return _Plan(actors or n_gpu, True, float(cpus_per_actor or 1), 0, n_cpu, n_gpu)
    pool = actors or max(1, n_cpu // 4)
    actor_cpus = float(cpus_per_actor or max(1, n_cpu // (2 * pool)))
    return _Plan(pool, False, actor_cpus, int(actor_cpus), n_cpu, n_gpu)


def _run_job(entries: Sequence[dict[str, Any]], plan: _Plan, stage_cfg: Any, actor_kwargs: dict[str, Any], batch: int,
             progress: Callable[[RayProgress], None] | None) -> tuple[dict[int, tuple[Any, ...]], set[str]]:
    """The Ray Data pipeline (file list -> Rust preprocessing tasks -> model actor pool); the rows by file
    index as they come back, and the backends that ran."""
    import ray.data as rd

    t0 = time.perf_counter()
    rows_by_idx: dict[int, tuple[Any, ...]] = {}
    backends: set[str] = set()
    failed = 0
    ds: Any = rd.from_items([{"idx": i, "path": e["path"]} for i, e in enumerate(entries)])
    # Stateless CPU tasks, one core each; their memory reservation (decode buffers and the float32
    # batch) also keeps Ray from fusing them into the model actors, so both stages run side by side.
    ds = ds.map_batches(preprocess_stage, batch_size=batch, batch_format="numpy", num_cpus=1,
                        memory=PREPROCESS_TASK_MEMORY, fn_kwargs={"cfg_json": stage_cfg.to_native_json(), "threads": 1})
    ds = ds.map_batches(_Classify, batch_size=batch, batch_format="numpy", compute=rd.ActorPoolStrategy(size=plan.pool),
                        num_gpus=1 if plan.use_gpu else 0, num_cpus=plan.actor_cpus, fn_constructor_kwargs=actor_kwargs)
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for j, idx in enumerate(out["idx"]):
            status = str(out["status"][j])
            p = float(out["probability"][j])
            o = float(out["ood_score"][j])
            rows_by_idx[int(idx)] = (None if np.isnan(p) else p, str(out["label"][j]) or None, status,
                                     str(out["error"][j]) or None, bool(out["stain_fallback"][j]),
                                     str(out["reason"][j]) or None, None if np.isnan(o) else o,
                                     (str(out["note"][j]) or None) if "note" in out else None)
            failed += status == "error"
        backends.update(str(b) for b in out["backend"])
        if progress is not None:
            progress(RayProgress(len(rows_by_idx), len(entries), failed, time.perf_counter() - t0))
    return rows_by_idx, backends


def _write(result: InferResult, out_path: str | os.PathLike) -> None:
    """The rows (.csv / .jsonl / .parquet) and ``OUT.stats.json``."""
    try:
        if Path(out_path).suffix.lower() == PARQUET_SUFFIX:
            result.out_path = write_parquet(result.results, out_path)
        else:
            result.out_path = write_results(result.results, out_path)
        result.stats_path = write_stats(result.stats, out_path)
    except OSError as exc:
        raise ResultsNotWritten(f"the results of {len(result.results)} file(s) could not be written to {out_path}: "
                                f"{exc.strerror or exc}") from exc


def run_ray_inference(
    model: str | os.PathLike | None,
    sources: Iterable[str | os.PathLike],
    out_path: str | os.PathLike | None = None,
    *,
    address: str = "local",
    batch: int = 32,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    engine: str | os.PathLike | None = None,
    limit: int | None = None,
    actors: int = 0,
    cpus_per_actor: int = 0,
    num_cpus: int | None = None,
    cuda_binding: str = "auto",
    progress: Callable[[RayProgress], None] | None = None,
) -> InferResult:
    """Classify every image under ``sources`` as a Ray Data job; the rows of :func:`leukedge.infer.run_inference`.

    ``actors``: size of the model actor pool (0: one per GPU when the cluster has GPUs and ``device`` is not
    "cpu", else one per 4 CPUs, at least 1). ``cpus_per_actor``: CPUs reserved by each CPU actor and its
    backend's intra-op threads (0: automatic). ``num_cpus``: CPUs of a ``"local"`` instance (default: all).
    Writes ``out_path`` (.csv / .jsonl / .parquet) and ``OUT.stats.json`` when given."""
    if out_path is not None:
        check_ray_output_path(out_path)
    model_path, spec, stage_cfg = _checked_model(model, engine)
    entries = discover_sources(sources)
    if limit is not None:
        entries = entries[:limit]

    ray, started = _start(address, num_cpus)
    try:
        import logging

        import ray.data as rd

        logging.getLogger("ray.data").setLevel(logging.WARNING)
        rd.DataContext.get_current().enable_progress_bars = False
        plan = _plan(ray, device, actors, cpus_per_actor)
        actor_kwargs = {"model": str(model_path), "engine": str(engine) if engine else None, "backend": backend,
                        "device": "cuda" if plan.use_gpu else ("cpu" if device == "auto" else device),
                        "precision": precision, "threads": plan.backend_threads, "expected_hash": spec.preprocess_hash,
                        "batch": batch, "cuda_binding": cuda_binding}
        t0 = time.perf_counter()
        rows_by_idx, backends = _run_job(entries, plan, stage_cfg, actor_kwargs, batch, progress) if entries else ({}, set())
        wall = time.perf_counter() - t0
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        if started:
            ray.shutdown()
    missing = [i for i in range(len(entries)) if i not in rows_by_idx]
    if missing:
        raise RuntimeError(f"the Ray job returned no row for {len(missing)} file(s), e.g. {entries[missing[0]]['path']}")
    results = []
    for i, e in enumerate(entries):
        prob, label, status, error, fallback, reason, ood, note = rows_by_idx[i]
        results.append(FileResult(e["path"], prob, label, status, error, e.get("subject"), e.get("true_label"), fallback,
                                  reason, ood, note))
    n = len(results)
    n_ok = sum(r.status == "ok" for r in results)
    name = ",".join(sorted(backends)) or backend
    stats: dict[str, Any] = {
        "model": str(spec.path), "model_kind": spec.kind, "engine": str(engine) if engine else None,
        "backend": name, "preprocess_hash": spec.preprocess_hash, "input_size": stage_cfg.size, "batch": batch,
        "n_files": n, "n_ok": n_ok, "n_rejected": sum(r.status == "rejected" for r in results),
        "n_error": sum(r.status == "error" for r in results), "wall_s": wall,
        "throughput_img_s": n / wall if wall > 0 else None,
        "ray": {"address": address, "nodes": nodes, "cluster_cpus": plan.cluster_cpus, "cluster_gpus": plan.cluster_gpus,
                "actors": plan.pool, "actor_gpus": 1 if plan.use_gpu else 0, "actor_cpus": plan.actor_cpus,
                "ray_version": ray.__version__},
        "leukedge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    result = InferResult(results, stats, backend=name,
                         reason=f"Ray Data job: {plan.pool} actor(s) on {'GPUs' if plan.use_gpu else 'CPUs'}, {nodes} node(s)")
    if out_path is not None:
        _write(result, out_path)
    return result
