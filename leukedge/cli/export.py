"""`leukedge export`: the command and the PyTorch-vs-ONNX comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..config import PreprocessConfig
from ..export import export_bundle
from ..quantize import CALIBRATION_METHODS, INT8_FP32_LADDER


def _fp32_convs(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"{value!r}: give auto or a number of convolutions (0 or more)")
    return n


def print_report(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    tols = report["tolerances"]
    t = Table(title="PyTorch FP32 vs ONNX Runtime (CPU)", caption=(
        f"pass: fp32 max|Δlogit| ≤ {tols['fp32']['max_abs_logit']:g} and top-1 ≥ {tols['fp32']['min_top1']:.0%}; "
        f"fp16 max|Δp(all)| ≤ {tols['fp16']['max_abs_prob']:g} (a class flip under it is a borderline cell)"))
    for col in ("graph", "cells", "n", "max|Δlogit|", "mean|Δlogit|", "max|Δp|", "top-1", "pass"):
        t.add_column(col, justify="left" if col in ("graph", "cells") else "right", no_wrap=True)
    for prec, r in report.get("results", {}).items():
        rows = list(r["by_source"].items()) + [("all", r["all"])]
        for name, m in rows:
            ok = m.get("pass")
            t.add_row(prec, name, str(m["n"]), f"{m['max_abs_logit']:.1e}", f"{m['mean_abs_logit']:.1e}",
                      f"{m['max_abs_prob']:.1e}", f"{m['top1_agreement']:.0%}",
                      "" if ok is None else ("[green]yes[/]" if ok else "[red]NO[/]"))
    console.print(t)
    if "random" in report.get("inputs", {}):
        console.print("[yellow]leukedge._native is not built: compared on random inputs instead of preprocessed cells[/]")
    elif report.get("sample_dir") is None:
        console.print("[yellow]real sample cells not found (../shared/data/cnmc_sample); synthetic cells only[/]")


def print_int8_report(rep: dict[str, Any], console: Any, what: str) -> None:
    """The INT8-vs-FP32 table: |dP(all)| quantiles, flips, weighted F1 on the held-out cells."""
    from rich.table import Table

    tol = rep["tolerance"]
    t = Table(title=f"INT8 ({what}) vs FP32, both on ONNX Runtime (CPU)", caption=(
        f"pass: p95 |ΔP(all)| ≤ {tol['p95_abs_prob']:g}, no flips of cells further than {rep['borderline']:g} from 0.5, "
        f"weighted F1 (held-out subjects) ≥ FP32 − {tol['f1_drop']:g}"))
    for col in ("cells", "n", "|ΔP| p50", "p95", "p99", "max", "flips (borderline)", "F1 fp32 / int8"):
        t.add_column(col, justify="left" if col == "cells" else "right", no_wrap=True)
    for name, m in list(rep["by_source"].items()) + [("all", rep["all"])]:
        a = m["abs_prob"]
        f1 = f"{m['weighted_f1_fp32']:.4f} / {m['weighted_f1_int8']:.4f}" if "weighted_f1_fp32" in m else ""
        t.add_row(name, str(m["n"]), f"{a['p50']:.4f}", f"{a['p95']:.4f}", f"{a['p99']:.4f}", f"{a['max']:.4f}",
                  f"{m['flips']} ({m['borderline_flips']})", f1)
    console.print(t)
    if rep.get("fp32_convs"):
        console.print(f"mixed precision: the first {rep['fp32_convs']} convolutions FP32, the rest INT8")
    if rep["failures"]:
        console.print(f"[red]INT8 graph ({what}) NOT marked good:[/] " + "; ".join(rep["failures"]))
    else:
        console.print(f"[green]INT8 graph ({what}) within the bound[/] (marked passed in export.json)")


@click.command("export")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (model_fp32.onnx, model_fp16.onnx, preprocess.json, export_report.json).")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="Also write a strongly typed FP16 graph.")
@click.option("--io-dtype", type=click.Choice(["float32", "float16"]), default="float16", show_default=True,
              help="I/O dtype of the FP16 graph (float32 keeps FP32 I/O with casts at the boundary).")
@click.option("--opset", type=click.IntRange(13, 23), default=17, show_default=True, help="ONNX opset.")
@click.option("--samples", type=click.Path(path_type=Path), default=None,
              help="Real cells for the agreement check [default: $LEUKEDGE_SAMPLE_DIR, or ../shared/data/cnmc_sample beside a "
                   "source checkout; none for an installed package].")
@click.option("--synthetic", "n_synth", type=click.IntRange(0, 1024), default=16, show_default=True,
              help="Synthetic cells for the agreement check.")
@click.option("--check/--no-check", default=True, show_default=True, help="Compare ONNX Runtime with PyTorch.")
@click.option("--int8", is_flag=True,
              help="Also write model_int8.onnx: static INT8 (Q/DQ, per-channel weights) by onnxruntime.quantization, "
                   "calibrated on --calibrate, checked against FP32 and marked good only within the bound.")
@click.option("--calibrate", "calibrate", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              metavar="CACHE", help="Dataset cache (`leukedge preprocess`) with the bundle's pixel hash: its cells "
                                     "calibrate the INT8 graph; held-out subjects check it.")
@click.option("--calibration-method", type=click.Choice(CALIBRATION_METHODS), default="minmax", show_default=True,
              help="How activation ranges are taken from the calibration cells.")
@click.option("--calibration-cells", type=click.IntRange(8, 100_000), default=256, show_default=True,
              help="At most this many cells calibrate (the held-out subjects' cells check).")
@click.option("--int8-fp32-convs", default="auto", show_default=True, callback=_fp32_convs, metavar="auto|N",
              help="Mixed precision: the first N convolutions (graph order) stay FP32, the rest is INT8. auto: the "
                   f"fewest of {', '.join(map(str, INT8_FP32_LADDER))} with which the graph passes the bound, tried in "
                   "that order (the default model's first layers do not quantise well; export.json: int8.search).")
def export_cmd(bundle: Path, out_dir: Path, fp16: bool, io_dtype: str, opset: int, samples: Path | None, n_synth: int,
               check: bool, int8: bool, calibrate: Path | None, calibration_method: str, calibration_cells: int,
               int8_fp32_convs: int | str) -> None:
    """Export model BUNDLE to ONNX (dynamic batch; FP32 + FP16, with --int8 an INT8 Q/DQ graph) and check it
    against PyTorch (INT8: against FP32, on real sample, synthetic and held-out calibration-cache cells)."""
    from rich.console import Console

    if int8 != (calibrate is not None):
        raise click.UsageError("--int8 needs --calibrate CACHE (real cells preprocessed with the bundle's settings), "
                               "and --calibrate is only used with --int8")
    console = Console()
    with console.status(f"exporting {bundle} …"):
        try:
            res = export_bundle(bundle, out_dir, fp16=fp16, io_dtype=io_dtype, opset=opset, check=check,
                                sample_dir=samples, n_synth=n_synth, calibrate=calibrate,
                                calibration_method=calibration_method, calibration_cells=calibration_cells,
                                int8_fp32_convs=int8_fp32_convs, progress=lambda msg: console.print(f"  {msg}"))
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
    for k, p in res.files.items():
        console.print(f"  {k:<10} {p}  ({p.stat().st_size / 1024:.0f} KiB)")
    if check:
        print_report(res.report, console)
        for key, what in (("int8", "model_int8.onnx, ONNX Runtime"), ("int8_trt", "model_int8_trt.onnx, TensorRT")):
            if key in res.report:
                print_int8_report(res.report[key], console, what)
        if not res.passed:
            raise click.ClickException(f"ONNX outputs disagree with the reference beyond tolerance; see {res.files['report']}")
    console.print(f"[green]exported[/] {bundle} → {out_dir} (preprocess hash {PreprocessConfig.load(out_dir / 'preprocess.json').pixel_hash()[:12]})")


