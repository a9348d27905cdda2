"""`leukedge infer`: the command, its progress bar and the latency table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from .._util import BACKEND_CHOICES, CUDA_BINDINGS, DEVICE_CHOICES, PRECISION_CHOICES, PRECISION_HELP
from ..infer import MAX_BATCH, InferenceInterrupted, ResultsNotWritten, run_inference
from ._console import RichReporter


def print_stats(stats: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"{stats['backend']} · batch {stats['batch']} · {'pipelined' if stats['pipeline'] else 'sequential'}"
                    f" · {stats['n_files']} files")
    for c in ("stage (ms / batch)", "mean", "p50", "p95", "p99", "max"):
        t.add_column(c, justify="left" if c.startswith("stage") else "right")
    for key, label in (("preprocess", "preprocessing (Rust)"), ("h2d", "H2D copy"), ("compute", "engine compute"),
                       ("d2h", "D2H copy"), ("backend_total", "backend total"), ("end_to_end", "end to end")):
        s = stats["latency_ms"].get(key)
        if s:
            t.add_row(label, *(f"{s[k]:.2f}" for k in ("mean", "p50", "p95", "p99", "max")))
    console.print(t)
    thr = stats["stage_throughput_img_s"]
    parts = [f"end to end [bold]{stats['throughput_img_s']:.1f}[/] img/s" if stats["throughput_img_s"] else ""]
    if thr.get("preprocess"):
        parts.append(f"preprocessing alone {thr['preprocess']:.1f} img/s")
    if thr.get("backend"):
        parts.append(f"backend alone {thr['backend']:.1f} img/s")
    console.print("throughput: " + ", ".join(p for p in parts if p))
    th = stats.get("threads")
    if isinstance(th, dict) and th:
        be = th.get("backend") or "runtime default"
        console.print(f"threads: preprocess {th.get('preprocess')}, backend {be} of {th.get('cores')} cores"
                      f" ({'partitioned' if th.get('partitioned') else 'not partitioned'}: {th.get('rule')})",
                      soft_wrap=True)


@click.command("infer")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-m", "--model", type=click.Path(exists=True, path_type=Path), default=None,
              help="Model bundle dir, export dir, .onnx or engine file [default: the shipped default model].")
@click.option("--engine", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="TensorRT engine to run with MODEL's preprocessing (refused if the preprocessing hashes differ).")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Results file: .csv or .jsonl (statistics go to OUT.stats.json).")
@click.option("-b", "--batch", type=click.IntRange(1, MAX_BATCH), default=32, show_default=True,
              help=f"Images per backend call, at most {MAX_BATCH} (one batch of {MAX_BATCH} at 224 px is 0.6 GB of "
                   "float32 input, twice over when pipelined).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES),
              default="auto", show_default=True, help="auto: a usable TensorRT engine, else PyTorch on CUDA, else ONNX Runtime, else PyTorch on the CPU.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True, help=PRECISION_HELP)
@click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="Rust preprocessing threads (0: automatic; the split used is printed and saved in OUT.stats.json).")
@click.option("--backend-threads", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="Intra-op threads of a CPU backend: ONNX Runtime CPU EP / torch.set_num_threads "
                   "(0: automatic; ignored on a GPU).")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True, help="Untimed warm-up batches.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N files.")
@click.option("--pipeline/--no-pipeline", default=True, show_default=True,
              help="Preprocess batch k+1 while batch k runs on the backend.")
@click.option("--cuda-binding", type=click.Choice(CUDA_BINDINGS), default="auto", show_default=True,
              help="CUDA binding of the TensorRT backend (auto: cuda-python, else pycuda).")
@click.option("--resume", is_flag=True,
              help="Skip the files that already have a row in OUT.partial (left by an interrupted run) or OUT, and "
                   "append the rest. Rows are written as batches finish, so Ctrl-C never loses finished work.")
# [ray] `--ray [ADDRESS]`: the same job on Ray Data (leukedge.infer.ray)
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Run as a Ray Data job: `--ray local` starts a local Ray instance, bare `--ray` joins this "
                   "machine's cluster, or give an address (ray://head:10001). OUT may also be .parquet.")
@click.option("--ray-actors", type=click.IntRange(0), default=0, show_default=True,
              help="With --ray: model actors (0: one per GPU, else one per 4 CPUs).")
def infer_cmd(sources: tuple[Path, ...], model: Path | None, engine: Path | None, out_path: Path, batch: int,
              backend: str, device: str, precision: str, threads: int, backend_threads: int, warmup: int,
              limit: int | None, pipeline: bool, cuda_binding: str, resume: bool = False,
              ray_address: str | None = None, ray_actors: int = 0) -> None:
    """Classify every cell image under SOURCES (files, folders, globs, list files).

    Without --model, the shipped default model runs (ONNX Runtime, no PyTorch needed). Results go
    to OUT (.csv or .jsonl) with the subject and true label read from C-NMC file names; latency
    and throughput statistics go to OUT.stats.json. Unreadable files are reported per file.

    Frames that are not one whole segmented cell (empty, blank, noisy, debris, cut by the border), and
    cells unlike the model's training cells when its OOD threshold is calibrated, get status `rejected`
    with a reason: never a label, counted apart. A file used with a caveat says so in the `note` column
    (a multi-page TIFF: "page 1 of N used"). Rows are written as batches finish; after Ctrl-C,
    --resume continues.

    Memory: decoding holds at most 2 x max_pixels pixels at once over all threads (max_pixels of the
    model's preprocessing, default 64 M; at most 16 bytes a pixel while decoding, so about 2 GB at worst),
    plus two batches of input and the model.
    """
    from rich.console import Console
    from rich.markup import escape

    from ..config import ConfigMismatchError
    from ..engines import BackendUnavailable
    from ..formats.sidecar import EngineMismatchError

    if ray_address is not None:  # [ray]
        return _infer_ray(sources, model=model, engine=engine, out_path=out_path, address=ray_address, batch=batch,
                          backend=backend, device=device, precision=precision, limit=limit, actors=ray_actors,
                          cuda_binding=cuda_binding)
    console = Console()
    cores = os.cpu_count() or 1
    for name, n in (("--threads", threads), ("--backend-threads", backend_threads)):
        if n > cores:
            console.print(f"[yellow]warning: {name} {n} is more than the {cores} cores of this machine; the threads "
                          "will fight over them and the run can be many times slower (0 = automatic)[/]")
    try:
        res = run_inference(model, sources, out_path, batch=batch, backend=backend, threads=threads,
                            backend_threads=backend_threads, pipeline=pipeline, warmup=warmup, limit=limit, device=device, precision=precision,
                            engine=engine, progress=True, reporter=RichReporter(), cuda_binding=cuda_binding,
                            resume=resume)
    except InferenceInterrupted as exc:
        console.print(f"[yellow]{escape(str(exc))}[/]")
        raise SystemExit(130) from exc
    except (FileNotFoundError, ValueError, ConfigMismatchError, EngineMismatchError, BackendUnavailable, RuntimeError,
            ResultsNotWritten) as exc:
        raise click.ClickException(str(exc)) from exc

    console.print(f"backend [bold]{escape(res.backend)}[/]: {escape(res.reason)}")
    print_stats(res.stats, console)
    _print_problems(console, res)
    console.print(f"{res.n_ok} ok, {res.n_rejected} rejected (not classified), {res.n_error} failed → "
                  f"{escape(str(res.out_path))} (stats {escape(str(res.stats_path))})")


def _print_problems(console: Any, res: Any) -> None:
    """The first 10 errors, the first 5 rejected files, each with its reason, and the first 5 notes (files used
    with a caveat, e.g. "TIFF: page 1 of 3 used")."""
    from rich.markup import escape

    from .._util import path_text

    bad = [r for r in res.results if r.status == "error"]
    for r in bad[:10]:
        console.print(f"[red]error[/] {escape(path_text(r.path))}: {escape(str(r.error))}")
    if len(bad) > 10:
        console.print(f"[red]… and {len(bad) - 10} more errors[/]")
    rej = [r for r in res.results if r.status == "rejected"]
    for r in rej[:5]:
        console.print(f"[yellow]rejected[/] {escape(path_text(r.path))}: {escape(str(r.reason))}")
    if len(rej) > 5:
        console.print(f"[yellow]… and {len(rej) - 5} more rejected (see the reason column)[/]")
    noted = [r for r in res.results if r.note]
    for r in noted[:5]:
        console.print(f"[cyan]note[/] {escape(path_text(r.path))}: {escape(str(r.note))}")
    if len(noted) > 5:
        console.print(f"[cyan]… and {len(noted) - 5} more notes (see the note column)[/]")


def _infer_ray(sources: tuple[Path, ...], *, model: Path | None, engine: Path | None, out_path: Path, address: str,
               batch: int, backend: str, device: str, precision: str, limit: int | None, actors: int,
               cuda_binding: str) -> None:
    """``leukedge infer ... --ray [ADDRESS]``: run the job with a progress bar (files/s, failed) and a summary."""
    from rich.console import Console
    from rich.markup import escape

    from ..config import ConfigMismatchError
    from ..engines import BackendUnavailable
    from ..formats.sidecar import EngineMismatchError
    from ..infer.ray import RayProgress, run_ray_inference
    console = Console()
    with RichReporter().progress("infer (Ray)", total=None, transient=True) as task:
        task.update(stats="starting Ray ...")

        def on_progress(p: RayProgress) -> None:
            task.update(total=p.total, completed=p.done, stats=f"{p.files_per_s:.1f} files/s, {p.failed} failed")

        try:
            res = run_ray_inference(model, sources, out_path, address=address, batch=batch, backend=backend,
                                    device=device, precision=precision, engine=engine, limit=limit, actors=actors,
                                    cuda_binding=cuda_binding, progress=on_progress)
        except (FileNotFoundError, ValueError, ConfigMismatchError, EngineMismatchError, BackendUnavailable,
                RuntimeError, ResultsNotWritten) as exc:
            raise click.ClickException(str(exc)) from exc
    s = res.stats
    console.print(f"backend [bold]{escape(res.backend)}[/]: {escape(res.reason)}")
    console.print(f"{s['n_files']} files in {s['wall_s']:.1f} s: [bold]{s['throughput_img_s'] or 0:.1f}[/] files/s "
                  f"(job start-up included)")
    _print_problems(console, res)
    console.print(f"{res.n_ok} ok, {res.n_rejected} rejected, {res.n_error} failed → {escape(str(res.out_path))} "
                  f"(stats {escape(str(res.stats_path))})")



