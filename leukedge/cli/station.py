"""``leukedge station``: watch a folder and classify each new cell image once it is complete."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .._util import (
    BACKEND_CHOICES,
    CLASS_NAMES,
    CUDA_BINDINGS,
    DEVICE_CHOICES,
    PRECISION_CHOICES,
    PRECISION_HELP,
    atomic_write_text,
)
from ..station import dashboard as dash
from ..station import db as sdb
from ..station import reviews as rv
from ..station.core import ModelInfo, Station, StationError, StationSettings
from ..station.scanner import IMAGE_EXTENSIONS, make_sample_fn
from .station_reporter import Reporter

GPU_BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
DB_ENVVAR = "LEUKEDGE_STATION_DB"


def db_option(what: str = "Station database") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--db`` of every station command (default: the database in WATCH_DIR, or the environment variable)."""
    return click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None, envvar=DB_ENVVAR,
                        help=f"{what} [default: WATCH_DIR/{sdb.DB_FILENAME}; env {DB_ENVVAR}].")


reviews_db_option = click.option(
    "--reviews-db", type=click.Path(dir_okay=False), default=None,
    help="Reviews database [default: beside the station database, <name>.reviews.sqlite].")


class _DefaultRunGroup(click.Group):
    """``leukedge station WATCH_DIR ...`` runs the station; ``status`` / ``export`` are sub-commands."""

    default_cmd = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_cmd, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path,
                              "WATCH_DIR [OPTIONS]  |  status|serve|export|export-reviews [OPTIONS]")


@click.group(cls=_DefaultRunGroup, context_settings={"help_option_names": ["-h", "--help"]})
def station_group() -> None:
    """Microscope-station mode.

    \b
    leukedge station WATCH_DIR --model BUNDLE   watch a folder, classify each new cell (same as `station run`)
    leukedge station status [WATCH_DIR]         per-sample totals, throughput, queue length
    leukedge station export [WATCH_DIR] -o F    per-sample totals as CSV or JSON (--cells: per file, with reviews)
    leukedge station serve [WATCH_DIR]          live web page, review queue, /metrics (leukedge[station-ui])
    leukedge station export-reviews [WATCH_DIR] -o DIR   reviewed cells as a C-NMC folder for preprocess/train

    Results go to an SQLite database (default WATCH_DIR/.leukedge-station.sqlite). See docs/station.md.
    """


def default_db(watch_dir: str | os.PathLike) -> Path:
    return Path(watch_dir).resolve() / sdb.DB_FILENAME


def _resolve_db(watch_dir: str | None, db_path: str | None) -> Path:
    if db_path:
        return Path(db_path)
    if watch_dir:
        return default_db(watch_dir)
    raise click.UsageError(f"name the station database: --db PATH, a WATCH_DIR, or ${DB_ENVVAR}")


# -- model loading ---------------------------------------------------------------------------------
def _model_id(spec: Any, backend: Any = None) -> str:
    """Stable short identity of the weights that actually run: ``<what --model named>@<sha256 prefix>`` of
    the file the backend loaded (the ONNX file, the engine, or the bundle's weights for PyTorch), never
    of a file that a model folder's metadata merely names."""
    from ..data import file_sha256

    ran = getattr(backend, "path", None)
    if ran is None and getattr(getattr(backend, "bundle", None), "path", None) is not None:
        ran = Path(backend.bundle.path) / "model.safetensors"
    if ran is not None and Path(ran).is_file():
        return f"{Path(spec.path).name}@{file_sha256(ran)[:12]}"
    for attr in ("engine", "onnx_fp32", "onnx_fp16"):
        p = getattr(spec, attr, None)
        if p is not None and Path(p).is_file():
            break
    else:
        p = None
    if spec.bundle is not None and (Path(spec.bundle) / "model.safetensors").is_file():
        p = Path(spec.bundle) / "model.safetensors"  # the weights, whatever runtime runs them
    name = Path(spec.bundle or spec.path).name
    if p is None:
        return name
    return f"{name}@{file_sha256(p)[:12]}"


def open_predictor(model: str | None, backend: str, *, fallback: bool, device: str, threads: int,
                   batch_size: int, console: Console, cuda_binding: str = "auto",
                   engine: str | None = None, precision: str = "auto") -> tuple[Any, ModelInfo]:
    """Load the model + backend once; returns (Predictor, ModelInfo).  Raises click errors that say
    clearly what failed (and falls back to ONNX Runtime when asked to)."""
    from ..infer import Predictor

    if model is None:
        from ..infer import (
            default_model_path,  # torch-free: the default model runs on ONNX Runtime
        )

        model = str(default_model_path())
        console.print(f"[dim]no --model given: using the packaged default model {model}[/]")
    try:
        pred = Predictor(model, backend=backend, device=device, threads=threads, batch=batch_size,
                         cuda_binding=cuda_binding, engine=engine, precision=precision)
    except Exception as exc:  # noqa: BLE001 - classified below
        if backend in GPU_BACKENDS and fallback and not _is_config_mismatch(exc):
            console.print(
                f"[bold yellow]GPU backend {backend!r} failed to start: {type(exc).__name__}: {exc}[/]\n"
                "[yellow]--fallback: continuing with ONNX Runtime on the CPU.[/]"
            )
            try:
                pred = Predictor(model, backend="onnxruntime", device="cpu", threads=threads, batch=batch_size,
                                 precision=precision)
            except Exception as exc2:  # noqa: BLE001
                raise click.ClickException(f"the ONNX Runtime fallback failed too for model {model}: {exc2}") from exc2
        else:
            hint = "" if backend not in GPU_BACKENDS or fallback else \
                " (add --fallback to continue with ONNX Runtime on the CPU when the GPU backend fails)"
            raise click.ClickException(
                f"backend {backend!r} failed to start for model {model}: {type(exc).__name__}: {exc}{hint}"
            ) from exc
    spec = getattr(pred, "spec", None) or getattr(getattr(pred, "backend", None), "spec", None)
    backend_obj = getattr(pred, "backend", None)
    backend_name = getattr(backend_obj, "name", None) or str(backend)
    reason = getattr(backend_obj, "reason", "")
    if backend in ("auto",) and reason and "not usable" in reason:
        console.print(f"[yellow]backend choice: {reason}[/]")
    config = getattr(pred, "config", None) or (spec.config if spec is not None else None)
    class_names = list(getattr(spec, "class_names", None) or CLASS_NAMES)
    info = ModelInfo(
        model=str(model),
        model_id=getattr(pred, "model_id", None) or (_model_id(spec, backend_obj) if spec is not None else Path(model).name),
        preprocess_hash=config.pixel_hash() if config is not None else "",
        backend=backend_name,
        positive_label=class_names[1] if len(class_names) > 1 else "all",
        reason=str(reason or ""),
    )
    return pred, info


def _is_config_mismatch(exc: BaseException) -> bool:
    """Never fallen back from: a preprocessing mismatch, or a model that is not there. An engine built for
    another GPU or TensorRT version (EngineMismatchError, e.g. after a JetPack upgrade) is fallen back from."""
    from ..config import ConfigMismatchError

    return isinstance(exc, (ConfigMismatchError, FileNotFoundError))


def predict_fn(pred: Any) -> Callable[[Sequence[str]], list[dict[str, Any]]]:
    """Adapt a :class:`leukedge.infer.Predictor` to the station's ``predict(paths) -> list[dict]``.

    Each dict gets ``timings = {"preprocess_ms", "compute_ms"}``: the times of the engine batch the
    file was in (the station hands the Predictor at most one engine batch at a time).
    """
    timed = getattr(pred, "predict_timed", None)

    def predict(paths: Sequence[str]) -> list[dict[str, Any]]:
        if timed is None:
            return [r if isinstance(r, dict) else _asdict(r) for r in pred.predict(paths)]
        results, times, _wall = timed(list(paths))
        pre = float(sum(times.get("preprocess") or [0.0]))
        comp = float(sum(times.get("backend") or times.get("compute") or [0.0]))
        out = []
        for r in results:
            d = r if isinstance(r, dict) else _asdict(r)
            d["timings"] = {"preprocess_ms": pre, "compute_ms": comp}
            out.append(d)
        return out

    return predict


def _asdict(r: Any) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(r) and not isinstance(r, type):
        return dataclasses.asdict(r)
    return dict(vars(r))


# -- run ------------------------------------------------------------------------------------------
@station_group.command("run")
@click.argument("watch_dir", type=click.Path(file_okay=False, dir_okay=True, exists=True))
@click.option("-m", "--model", type=click.Path(exists=True), default=None,
              help="Model bundle directory, export directory, .onnx file or TensorRT engine "
                   "(default: the packaged default model).")
@click.option("--engine", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TensorRT engine to run with MODEL's preprocessing, as in `leukedge infer` (refused if the "
                   "preprocessing hashes differ).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Inference runtime (auto: TensorRT engine if usable, else PyTorch on CUDA, else ONNX Runtime, else PyTorch).")
@click.option("--fallback/--no-fallback", default=False, show_default=True,
              help="If the GPU backend fails to start, continue with ONNX Runtime on the CPU instead of stopping.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True, help=PRECISION_HELP)
@click.option("--cuda-binding", type=click.Choice(CUDA_BINDINGS), default="auto", show_default=True,
              help="CUDA binding of the TensorRT backend (auto: cuda-python, else pycuda).")
@db_option("SQLite results database")
@click.option("--batch", "batch_size", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="A batch goes to the engine when it holds this many images ...")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=250.0, show_default=True,
              help="... or when its oldest image has waited this long.")
@click.option("--settle-ms", type=click.FloatRange(0), default=500.0, show_default=True,
              help="A file is complete when its size and mtime stay unchanged this long (or it was renamed "
                   "from a temporary name).")
@click.option("--poll-ms", type=click.FloatRange(1), default=100.0, show_default=True, help="Folder polling interval.")
@click.option("--sample-pattern", default=None, metavar="REGEX",
              help="Regex with a named group (?P<sample>...) searched in the path relative to WATCH_DIR "
                   "[default: sample id = name of the parent folder].")
@click.option("--ext", "extensions", multiple=True, metavar="EXT",
              help=f"Image extensions to watch (repeatable) [default: {' '.join(IMAGE_EXTENSIONS)}].")
@click.option("--ignore", "ignore", multiple=True, metavar="GLOB",
              help="Extra file-name globs never to read (temporary, hidden and backup names always are).")
@click.option("--max-file-mb", type=click.FloatRange(0, min_open=True), default=100.0, show_default=True,
              help="Larger files are recorded as errors without being decoded.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="Preprocessing threads (0 = all cores).")
@click.option("--once", is_flag=True, help="Classify what is in the folder now, then exit.")
@click.option("--exit-when-idle", "exit_when_idle", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="Exit once nothing new has arrived and nothing is waiting for SECONDS.")
@click.option("--max-files", type=click.IntRange(1), default=None, help="Exit after this many results.")
@click.option("--no-trust-rename", is_flag=True,
              help="Do not treat a rename from a temporary name as completion; always wait --settle-ms.")
@click.option("--full-scan-s", type=click.FloatRange(0), default=10.0, show_default=True,
              help="Between full sweeps, files that already have a result are not stat()ed again and folders whose "
                   "mtime did not change are not re-listed; a full sweep (every this many seconds) also catches "
                   "files rewritten in place.")
@click.option("--heartbeat-s", type=click.FloatRange(0.05), default=1.0, show_default=True, hidden=True)
@click.option("-q", "--quiet", is_flag=True, help="Only print errors and the final summary line.")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="Also write this run's summary (counts, batch sizes, exit reason) to a JSON file.")
def run_cmd(watch_dir: str, model: str | None, engine: str | None, backend: str, fallback: bool, device: str,
            precision: str, cuda_binding: str,
            db_path: str | None,
            batch_size: int, max_wait_ms: float, settle_ms: float, poll_ms: float, sample_pattern: str | None,
            extensions: tuple[str, ...], ignore: tuple[str, ...], max_file_mb: float, threads: int, once: bool,
            exit_when_idle: float | None, max_files: int | None, no_trust_rename: bool, full_scan_s: float,
            heartbeat_s: float,
            quiet: bool, summary_json: str | None) -> None:
    """Watch WATCH_DIR (recursively) and classify every new cell image once it is complete.

    Images are grouped into batches (--batch / --max-wait-ms), preprocessed and classified with the
    same stack as `leukedge infer`, and stored in SQLite with the sample id, probability, label, model
    and preprocessing identity and timings. A restart resumes where the last run stopped; nothing is
    classified twice. SIGINT/SIGTERM finish the batch in flight, commit it and exit. Frames that are not a
    whole segmented cell (and, with a calibrated model, cells unlike its training cells) are stored as
    `rejected` and never counted in a blast fraction. Memory: decoding holds at most 2 x max_pixels pixels
    at once (about 2 GB at worst with the default 64 M), whatever --threads.
    """
    console = Console(stderr=True)
    try:
        make_sample_fn(watch_dir, sample_pattern)
        settings = StationSettings(
            watch_dir=Path(watch_dir), db_path=Path(db_path) if db_path else default_db(watch_dir),
            batch_size=batch_size, max_wait_ms=max_wait_ms, settle_ms=settle_ms, poll_ms=poll_ms,
            extensions=tuple(extensions) or IMAGE_EXTENSIONS, ignore=tuple(ignore), sample_pattern=sample_pattern,
            max_file_mb=max_file_mb, once=once, exit_when_idle_s=exit_when_idle, max_files=max_files,
            heartbeat_s=heartbeat_s, trust_rename=not no_trust_rename, full_scan_s=full_scan_s,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    pred, info = open_predictor(model, backend, fallback=fallback, device=device, cuda_binding=cuda_binding,
                                threads=threads, batch_size=batch_size, console=console, engine=engine,
                                precision=precision)
    reporter = Reporter(console, quiet=quiet)
    station = Station(settings, predict_fn(pred), info, reporter=reporter)
    try:
        summary = station.run()
    except StationError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        close = getattr(pred, "close", None)
        if callable(close):
            close()
    if summary_json:
        atomic_write_text(Path(summary_json), json.dumps(summary.as_dict(), indent=2) + "\n")


# -- status ---------------------------------------------------------------------------------------
def _fmt_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


status_data = dash.status_data  # what `status` prints; shared with the web page (leukedge.station.dashboard)


@station_group.command("status")
@click.argument("watch_dir", required=False, type=click.Path(file_okay=False, exists=True))
@db_option()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
def status_cmd(watch_dir: str | None, db_path: str | None, as_json: bool) -> None:
    """Per-sample totals (cells, blasts, blast fraction, errors), throughput over the last minute
    and the queue length of a running station."""
    path = _resolve_db(watch_dir, db_path)
    with _reading(path) as conn:
        data = status_data(conn)
    if as_json:  # wall-clock times as in `station export`: ISO 8601 with the local UTC offset
        click.echo(json.dumps(iso_times(data), indent=2, default=str))
        return
    console = Console()
    st = _escaped(data["station"])
    if st is None:
        console.print(f"{escape(str(path))}: no station run recorded yet")
    elif st["running"]:
        console.print(
            f"[bold green]running[/] (pid {st['pid']} on {st['host']}, heartbeat {_fmt_age(st['heartbeat_age_s'])} ago) "
            f"watching {st['watch_dir']}\n  model {st['model_id']} on {st['backend']} | queue {st['queue_len']} | "
            f"settling {st['settling']} | {data['throughput_1m']:.2f} cells/s over the last minute | "
            f"latency p50 {st['latency_p50_ms'] or 0:.0f} ms p95 {st['latency_p95_ms'] or 0:.0f} ms"
        )
    elif st["stopped_at"] is None:
        console.print(
            f"[bold red]not responding[/]: run {st['run_id']} (pid {st['pid']} on {st['host']}) wrote its last "
            f"heartbeat {_fmt_age(st['heartbeat_age_s'])} ago and recorded no shutdown: killed or hung. "
            "The next start resumes where it stopped."
        )
    else:
        console.print(
            f"[bold yellow]not running[/]: last run {st['run_id']} (pid {st['pid']} on {st['host']}) stopped "
            f"{_fmt_age(time.time() - st['stopped_at'])} ago: {st['exit_reason'] or st['state']}"
        )
    tot = data["totals"]
    console.print(f"  {tot['rows'] - tot['superseded']:,} files: {tot['ok']:,} classified, {tot['errors']:,} errors, "
                  f"{tot['rejected']:,} rejected (not cells the model may judge; never in a blast fraction)"
                  + (f", {tot['superseded']:,} superseded (file replaced)" if tot["superseded"] else ""))
    table = Table(title="Per-sample totals", show_lines=False)
    just: Literal["left", "right"]
    for col, just in (("sample", "left"), ("cells", "right"), ("blasts", "right"), ("blast fraction", "right"),
                      ("errors", "right"), ("rejected", "right"), ("last result", "right")):
        table.add_column(col, justify=just)
    for s in data["samples"]:
        frac = "-" if s["blast_fraction"] is None else f"{100 * s['blast_fraction']:.1f} %"
        last = "-" if s["last_result_at"] is None else time.strftime("%H:%M:%S", time.localtime(s["last_result_at"]))
        table.add_row(escape(str(s["sample_id"])), f"{s['n_cells']:,}", f"{s['n_blasts']:,}", frac,
                      f"[red]{s['n_errors']}[/]" if s["n_errors"] else "0",
                      f"[yellow]{s['n_rejected']}[/]" if s["n_rejected"] else "0", last)
    console.print(table)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    """The database opened read-only for status / export, closed afterwards; a missing or damaged
    database (also damage found while reading) is a one-line click error, and the note of a read-only
    medium (``conn.note``) is printed as a warning once the read succeeded."""
    try:
        conn = sdb.connect(path, readonly=True)
    except (FileNotFoundError, sdb.DatabaseDamaged) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield conn
    except sqlite3.DatabaseError as exc:  # corruption found while reading
        raise click.ClickException(str(sdb.damaged(path, exc))) from exc
    finally:
        conn.close()
    note = getattr(conn, "note", "")
    if note:
        Console(stderr=True).print(f"warning: {note}", markup=False, highlight=False)


def _escaped(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """``d`` with its strings escaped for rich markup (paths, host names and reasons may hold ``[...]``)."""
    if d is None:
        return None
    return {k: escape(v) if isinstance(v, str) else v for k, v in d.items()}


# -- export ---------------------------------------------------------------------------------------
def _iso(t: float) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


#: wall-clock (epoch-second) fields of the station's status and export output
TIME_FIELDS = ("first_result_at", "last_result_at", "detected_at", "done_at", "started_at", "stopped_at", "ready_at",
               "reviewed_at")


def iso_times(obj: Any) -> Any:
    """``obj`` (dicts and lists, nested) with every wall-clock field of :data:`TIME_FIELDS` as ISO 8601 with the
    local UTC offset: the one timestamp format of ``status --json`` and ``export``."""
    if isinstance(obj, dict):
        return {k: (_iso(v) if k in TIME_FIELDS and isinstance(v, (int, float)) else iso_times(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [iso_times(v) for v in obj]
    return obj


def render_export(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else csv_cell(r.get(k))) for k in columns})
    return buf.getvalue()


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (``=HYPERLINK(...)``, ``+``, ``-``, ``@``, tab,
    carriage return) gets a leading ``'`` (OWASP's advice against CSV injection); numbers stay as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


@station_group.command("export")
@click.argument("watch_dir", required=False, type=click.Path(file_okay=False, exists=True))
@db_option()
@click.option("-o", "--out", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Output file ('-' for stdout); written atomically (temporary file + rename).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default=None,
              help="Output format [default: from the file extension, else csv].")
@click.option("--cells", is_flag=True, help="Export one row per file instead of per-sample totals "
                                             "(with the reviewed label, reviewer and review time, if reviewed).")
@reviews_db_option
def export_cmd(watch_dir: str | None, db_path: str | None, output: str, fmt: str | None, cells: bool,
               reviews_db: str | None) -> None:
    """Write per-sample totals (or, with --cells, per-file results) as CSV or JSON."""
    path = _resolve_db(watch_dir, db_path)
    if fmt is None:
        fmt = "json" if output.lower().endswith(".json") else "csv"
    with _reading(path) as conn, sdb.snapshot(conn):  # one consistent snapshot while the station keeps writing
        if cells:
            rows, cols = list(sdb.cell_rows(conn)), tuple(sdb.CELL_COLUMNS + rv.REVIEW_EXPORT_COLUMNS)
        else:
            rows, cols = sdb.sample_totals(conn), tuple(sdb.SAMPLE_COLUMNS)
    if cells:
        rows = rv.with_reviews(rows, _load_reviews(path, reviews_db))
    rows = [iso_times(r) for r in rows]  # wall-clock times as ISO 8601 with the local UTC offset
    text = render_export(rows, cols, fmt)
    if output == "-":
        sys.stdout.write(text)
        return
    atomic_write_text(Path(output), text)
    Console(stderr=True).print(f"wrote {len(rows)} {'file' if cells else 'sample'} row(s) to {output} ({fmt})")


def _reviews_path(db: Path, reviews_db: str | None) -> Path:
    return Path(reviews_db) if reviews_db else rv.default_reviews_path(db)


def _load_reviews(db: Path, reviews_db: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    rpath = _reviews_path(db, reviews_db)
    try:
        rconn = rv.connect(rpath, readonly=True)
    except sqlite3.Error as exc:
        raise click.ClickException(f"reviews database {rpath} cannot be read: {exc}") from exc
    if rconn is None:
        return {}
    try:
        return rv.latest_reviews(rconn)
    except sqlite3.DatabaseError as exc:
        raise click.ClickException(f"reviews database {rpath} is damaged or not a reviews database: {exc}") from exc
    finally:
        rconn.close()


# -- export-reviews -----------------------------------------------------------------------------------
@station_group.command("export-reviews")
@click.argument("watch_dir", required=False, type=click.Path(file_okay=False, exists=True))
@db_option()
@reviews_db_option
@click.option("-o", "--out", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Folder to write (C-NMC layout: training_data/fold_0/{all,hem}/UID_S<n>_<i>_1_<label>.<ext>).")
def export_reviews_cmd(watch_dir: str | None, db_path: str | None, reviews_db: str | None, output: str) -> None:
    """Copy the reviewed cells into a labelled folder in the C-NMC layout, ready for
    `leukedge preprocess` and `train`: review data becomes training data.

    The label is the reviewer's (newest review), never the model's; `not a cell` is left out. Each
    sample becomes one subject (S1, S2, ...), so patient-level splits keep a slide together.
    reviewed_cells.csv in the folder maps every file to its source, sample, reviewer and the model's answer.
    """
    path = _resolve_db(watch_dir, db_path)
    reviews = _load_reviews(path, reviews_db)
    if not reviews:
        raise click.ClickException(f"no reviews in {_reviews_path(path, reviews_db)}: review cells on the "
                                   "`leukedge station serve` page first")
    with _reading(path) as conn, sdb.snapshot(conn):
        cells = dash.current_cells(conn)
    summary = rv.export_reviewed(cells, reviews, output)
    console = Console(stderr=True)
    console.print(f"wrote {summary.written['all']} all + {summary.written['hem']} hem reviewed cells of "
                  f"{len(summary.subjects)} sample(s) to {escape(output)}"
                  + (f" ({summary.skipped_not_a_cell} marked 'not a cell' left out)" if summary.skipped_not_a_cell else ""))
    for p in summary.missing:
        console.print(f"[yellow]skipped {escape(p)}: gone or changed since it was reviewed[/]")
    console.print(f"next: leukedge preprocess {escape(output)} ...  (see {rv.MANIFEST_NAME} for the sources)")


# -- serve --------------------------------------------------------------------------------------------
TOKEN_ENVVAR = "LEUKEDGE_STATION_TOKEN"


@station_group.command("serve")
@click.argument("watch_dir", required=False, type=click.Path(file_okay=False, exists=True))
@db_option()
@reviews_db_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. Anything but loopback also needs --allow-remote.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--allow-remote", is_flag=True,
              help="Allow --host to be a non-loopback interface (e.g. 0.0.0.0): the page and the results become "
                   "visible to the network. Use with --token.")
@click.option("--token", default=None, envvar=TOKEN_ENVVAR, metavar="TOKEN",
              help=f"Require this token for reviews (Authorization: Bearer TOKEN) [env {TOKEN_ENVVAR}].")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Read the token from this file (first line) instead of the command line.")
def serve_cmd(watch_dir: str | None, db_path: str | None, reviews_db: str | None, host: str, port: int,
              allow_remote: bool, token: str | None, token_file: str | None) -> None:
    """Serve the station's screen: a live web page (per-sample counts and blast fractions, the station's
    health, recent cells with a review queue), a JSON API under /api/, /metrics for Prometheus and /healthz.

    It reads the station database read-only, in its own process: run it beside `leukedge station run`
    (the classifying loop never waits for it) or on a copy of a database. Reviews go to their own file.
    Needs the optional extra: pip install 'leukedge[station-ui]'.
    """
    try:
        import uvicorn

        from ..station.web import LOOPBACK_HOSTS, WebSettings, create_app, is_loopback
    except ImportError as exc:
        raise click.ClickException(f"`station serve` needs the web extra ({exc.name} is missing): "
                                   "pip install 'leukedge[station-ui]'") from exc
    console = Console(stderr=True)
    path = _resolve_db(watch_dir, db_path)
    if token_file:
        token = Path(token_file).read_text().splitlines()[0].strip() if Path(token_file).read_text().strip() else None
        if not token:
            raise click.UsageError(f"--token-file {token_file} is empty")
    remote = not is_loopback(host)
    if remote and not allow_remote:
        raise click.UsageError(f"--host {host} is not a loopback address: the page would be reachable from the "
                               "network. Add --allow-remote (and preferably --token) if that is what you want.")
    if remote:
        console.print(f"[bold yellow]warning: listening on {escape(host)}: anyone who can reach port {port} sees the "
                      f"results{'' if token else ' and can write reviews (no --token set)'}.[/]")
    if not path.exists():
        console.print(f"[yellow]{escape(str(path))} does not exist yet: the page says so until the station starts.[/]")
    else:
        try:
            sdb.connect(path, readonly=True).close()
        except (sdb.DatabaseDamaged, sqlite3.Error) as exc:
            console.print(f"[bold red]{escape(str(exc))}[/]\n[yellow]serving anyway: the page shows this until "
                          "the database is readable again.[/]")
    settings = WebSettings(db_path=path.resolve(), reviews_path=_reviews_path(path, reviews_db).resolve(),
                           token=token or None, allowed_hosts=("*",) if remote else LOOPBACK_HOSTS)
    app = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"station page: http://{escape(shown)}:{port}/   (metrics /metrics, health /healthz; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)
