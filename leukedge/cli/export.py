"""`leukedge export`: the command and the PyTorch-vs-ONNX comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..config import PreprocessConfig
from ..export import export_bundle


def print_report(report: dict[str, Any], console=None) -> None:
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
def export_cmd(bundle: Path, out_dir: Path, fp16: bool, io_dtype: str, opset: int, samples: Path | None, n_synth: int,
               check: bool) -> None:
    """Export model BUNDLE to ONNX (dynamic batch; FP32 + FP16) and check it against PyTorch."""
    from rich.console import Console

    console = Console()
    with console.status(f"exporting {bundle} …"):
        try:
            res = export_bundle(bundle, out_dir, fp16=fp16, io_dtype=io_dtype, opset=opset, check=check,
                                sample_dir=samples, n_synth=n_synth)
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
    for k, p in res.files.items():
        console.print(f"  {k:<10} {p}  ({p.stat().st_size / 1024:.0f} KiB)")
    if check:
        print_report(res.report, console)
        if not res.passed:
            raise click.ClickException(f"ONNX outputs disagree with PyTorch beyond tolerance; see {res.files['report']}")
    console.print(f"[green]exported[/] {bundle} → {out_dir} (preprocess hash {PreprocessConfig.load(out_dir / 'preprocess.json').pixel_hash()[:12]})")


