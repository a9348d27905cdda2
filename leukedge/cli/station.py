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
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .._util import BACKEND_CHOICES, CUDA_BINDINGS, DEVICE_CHOICES, PRECISION_CHOICES, PRECISION_HELP, atomic_write_text
from ..station import db as sdb
from ..station.core import ModelInfo, Station, StationError, StationSettings
from ..station.scanner import IMAGE_EXTENSIONS, make_sample_fn
from .station_reporter import Reporter

GPU_BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
DB_ENVVAR = "LEUKEDGE_STATION_DB"


class _DefaultRunGroup(click.Group):
    """``leukedge station WATCH_DIR ...`` runs the station; ``status`` / ``export`` are sub-commands."""

    default_cmd = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_cmd, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "WATCH_DIR [OPTIONS]  |  status [OPTIONS]  |  export [OPTIONS]")


@click.group(cls=_DefaultRunGroup, context_settings={"help_option_names": ["-h", "--help"]})
def station_group() -> None:
    """Microscope-station mode.

    \b
    leukedge station WATCH_DIR --model BUNDLE   watch a folder, classify each new cell (same as `station run`)
    leukedge station status [WATCH_DIR]         per-sample totals, throughput, queue length
    leukedge station export [WATCH_DIR] -o F    per-sample totals as CSV or JSON

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
                   precision: str = "auto") -> tuple[Any, ModelInfo]:
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
                         cuda_binding=cuda_binding, precision=precision)
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
    class_names = list(getattr(spec, "class_names", None) or ["hem", "all"])
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


def predict_fn(pred: Any):
    """Adapt a :class:`leukedge.infer.Predictor` to the station's ``predict(paths) -> list[dict]``.

    Each dict gets ``timings = {"preprocess_ms", "compute_ms"}``: the times of the engine batch the
    file was in (the station hands the Predictor at most one engine batch at a time).
    """
    timed = getattr(pred, "_predict", None)

    def predict(paths: list[str]) -> list[dict]:
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

    if dataclasses.is_dataclass(r):
        return dataclasses.asdict(r)
    return dict(vars(r))


# -- run ------------------------------------------------------------------------------------------
@station_group.command("run")
@click.argument("watch_dir", type=click.Path(file_okay=False, dir_okay=True, exists=True))
@click.option("-m", "--model", type=click.Path(exists=True), default=None,
              help="Model bundle directory, export directory, .onnx file or TensorRT engine "
                   "(default: the packaged default model).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Inference runtime (auto: TensorRT engine if usable, else PyTorch on CUDA, else ONNX Runtime, else PyTorch).")
@click.option("--fallback/--no-fallback", default=False, show_default=True,
              help="If the GPU backend fails to start, continue with ONNX Runtime on the CPU instead of stopping.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True, help=PRECISION_HELP)
@click.option("--cuda-binding", type=click.Choice(CUDA_BINDINGS), default="auto", show_default=True,
              help="CUDA binding of the TensorRT backend (auto: cuda-python, else pycuda).")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None, envvar=DB_ENVVAR,
              help=f"SQLite results database [default: WATCH_DIR/{sdb.DB_FILENAME}; env {DB_ENVVAR}].")
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
def run_cmd(watch_dir: str, model: str | None, backend: str, fallback: bool, device: str, precision: str, cuda_binding: str,
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
    classified twice. SIGINT/SIGTERM finish the batch in flight, commit it and exit.
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
                                threads=threads, batch_size=batch_size, console=console, precision=precision)
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


def status_data(conn) -> dict[str, Any]:
    now = time.time()
    run = sdb.latest_run(conn)
    live = None
    if run is not None:
        hb_age = now - (run.get("hb_updated_at") or run["started_at"])
        settings = json.loads(run.get("settings") or "{}")
        stale_after = max(5.0, 5 * float(settings.get("heartbeat_s", 1.0)))
        running = run.get("hb_state") in ("starting", "running", "stopping") and hb_age <= stale_after
        live = {
            "running": running, "state": run.get("hb_state") if running or run.get("stopped_at") else "not responding",
            "run_id": run["id"], "pid": run["pid"], "host": run["host"], "watch_dir": run["watch_dir"],
            "model_id": run["model_id"], "backend": run["backend"], "started_at": run["started_at"],
            "stopped_at": run["stopped_at"], "exit_reason": run["exit_reason"], "heartbeat_age_s": hb_age,
            "queue_len": run.get("queue_len") if running else 0, "settling": run.get("settling") if running else 0,
            "processed_this_run": run.get("processed"), "errors_this_run": run.get("errors"),
            "throughput_1m_heartbeat": run.get("throughput_1m") if running else 0.0,
            "latency_p50_ms": run.get("latency_p50_ms"), "latency_p95_ms": run.get("latency_p95_ms"),
        }
    return {
        "station": live,
        "throughput_1m": sdb.recent_throughput(conn, 60.0, now),
        "totals": sdb.totals(conn),
        "samples": sdb.sample_totals(conn),
    }


@station_group.command("status")
@click.argument("watch_dir", required=False, type=click.Path(file_okay=False, exists=True))
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None, envvar=DB_ENVVAR,
              help=f"Station database [default: WATCH_DIR/{sdb.DB_FILENAME}; env {DB_ENVVAR}].")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
def status_cmd(watch_dir: str | None, db_path: str | None, as_json: bool) -> None:
    """Per-sample totals (cells, blasts, blast fraction, errors), throughput over the last minute
    and the queue length of a running station."""
    path = _resolve_db(watch_dir, db_path)
    with _reading(path) as conn:
        data = status_data(conn)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
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
    console.print(f"  {tot['rows'] - tot['superseded']:,} files: {tot['ok']:,} classified, {tot['errors']:,} errors"
                  + (f", {tot['superseded']:,} superseded (file replaced)" if tot["superseded"] else ""))
    table = Table(title="Per-sample totals", show_lines=False)
    for col, just in (("sample", "left"), ("cells", "right"), ("blasts", "right"), ("blast fraction", "right"),
                      ("errors", "right"), ("last result", "right")):
        table.add_column(col, justify=just)
    for s in data["samples"]:
        frac = "-" if s["blast_fraction"] is None else f"{100 * s['blast_fraction']:.1f} %"
        last = "-" if s["last_result_at"] is None else time.strftime("%H:%M:%S", time.localtime(s["last_result_at"]))
        table.add_row(escape(str(s["sample_id"])), f"{s['n_cells']:,}", f"{s['n_blasts']:,}", frac,
                      f"[red]{s['n_errors']}[/]" if s["n_errors"] else "0", last)
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
    if getattr(conn, "note", ""):
        Console(stderr=True).print(f"warning: {conn.note}", markup=False, highlight=False)


def _escaped(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """``d`` with its strings escaped for rich markup (paths, host names and reasons may hold ``[...]``)."""
    if d is None:
        return None
    return {k: escape(v) if isinstance(v, str) else v for k, v in d.items()}


# -- export ---------------------------------------------------------------------------------------
def _iso(t: float) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


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
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None, envvar=DB_ENVVAR,
              help=f"Station database [default: WATCH_DIR/{sdb.DB_FILENAME}; env {DB_ENVVAR}].")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output file ('-' for stdout); written atomically (temporary file + rename).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default=None,
              help="Output format [default: from the file extension, else csv].")
@click.option("--cells", is_flag=True, help="Export one row per file instead of per-sample totals.")
def export_cmd(watch_dir: str | None, db_path: str | None, output: str, fmt: str | None, cells: bool) -> None:
    """Write per-sample totals (or, with --cells, per-file results) as CSV or JSON."""
    path = _resolve_db(watch_dir, db_path)
    if fmt is None:
        fmt = "json" if output.lower().endswith(".json") else "csv"
    with _reading(path) as conn, sdb.snapshot(conn):  # one consistent snapshot while the station keeps writing
        if cells:
            rows, cols = list(sdb.cell_rows(conn)), sdb.CELL_COLUMNS
        else:
            rows, cols = sdb.sample_totals(conn), sdb.SAMPLE_COLUMNS
    for r in rows:  # wall-clock times as ISO 8601 with the local UTC offset
        for k in ("first_result_at", "last_result_at", "detected_at", "done_at"):
            if r.get(k) is not None:
                r[k] = _iso(r[k])
    text = render_export(rows, cols, fmt)
    if output == "-":
        sys.stdout.write(text)
        return
    atomic_write_text(Path(output), text)
    Console(stderr=True).print(f"wrote {len(rows)} {'file' if cells else 'sample'} row(s) to {output} ({fmt})")
