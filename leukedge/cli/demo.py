"""``leukedge demo``: the pipeline end to end, with an HTML report. Needs no data set and no GPU.

Default (what ``make demo`` runs; installs no PyTorch): synth → preprocess (the Rust core, with the shipped
model's settings) → infer (the shipped model on ONNX Runtime) → the shipped model scored on real C-NMC cells
it never saw → station (watch folder → SQLite, one batch log line each) → report.html.

``--train`` (what ``make demo-train`` runs; needs PyTorch): synth → preprocess (Macenko) → train (tiny CNN)
→ evaluate (subject-disjoint fold) → export (FP32 + FP16 ONNX) → build-engine (TensorRT-RTX / TensorRT, or
a line saying why not) → infer → the same real-cell, station and report stages.

``--quick`` (or ``LEUKEDGE_DEMO_QUICK=1``) runs the same stages on a tiny set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.table import Table

from .. import synth, training
from .._util import CLASS_NAMES, IMAGE_EXTENSIONS, load_native, sample_dir
from ..config import PreprocessConfig, StainConfig
from ..data import parse_name, pixel_digests
from ..evaluate import compute_metrics, evaluate, few_subjects_warning, format_ci, subject_bootstrap_ci, write_report
from ..formats.bundle import default_model_path, read_trained_on
from ..formats.cache import load_cache, load_config_source
from ..infer import run_inference
from ..preprocess import run_preprocess
from ..report import build_report
from ._console import RichReporter
from .infer import print_stats
from .preprocess import print_summary


def default_real_dir() -> Path | None:
    """The real C-NMC cells for the shipped model's stage (see :func:`leukedge._util.sample_dir`)."""
    return sample_dir()


@dataclass(frozen=True)
class DemoSize:
    subjects: int
    cells_per_subject: int
    size: int
    epochs: int
    batch: int


FULL = DemoSize(subjects=18, cells_per_subject=30, size=64, epochs=14, batch=32)
QUICK = DemoSize(subjects=9, cells_per_subject=10, size=48, epochs=4, batch=16)
#: the synthetic cells of the default (no-training) demo: enough for throughput numbers and a station run
LEAN = DemoSize(subjects=9, cells_per_subject=20, size=0, epochs=0, batch=32)


@dataclass
class StageLog:
    stages: list[dict[str, Any]] = field(default_factory=list)

    def add(self, stage: str, status: str, seconds: float, note: str = "") -> None:
        self.stages.append({"stage": stage, "status": status, "seconds": round(seconds, 2), "note": note})


def _run_stage(console: Any, log: StageLog, name: str, fn: Callable[[], str], required: bool = True) -> bool:
    console.rule(f"[bold magenta]{name}")
    t0 = time.perf_counter()
    try:
        note = fn() or ""
    except Exception as exc:  # noqa: BLE001 - a demo stage failure is reported, then re-raised if required
        dt = time.perf_counter() - t0
        log.add(name, "failed", dt, f"{type(exc).__name__}: {exc}")
        console.print(f"[red]✗ {name} failed after {dt:.1f}s: {type(exc).__name__}: {exc}")
        if required:
            raise
        console.print("[dim]" + traceback.format_exc(limit=3))
        return False
    dt = time.perf_counter() - t0
    status = "skipped" if note.startswith("skipped") else "ok"
    log.add(name, status, dt, note)
    mark = "[yellow]–" if status == "skipped" else "[green]✓"
    console.print(f"{mark} {name} ({dt:.1f}s){': ' + note if note else ''}")
    return True


def cells_grid(paths: list[Path], out_png: Path, config: PreprocessConfig, title: str) -> Path:
    """A grid of raw cells (top row) and the same cells after the config's stain normalisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _native = load_native()

    stain_cfg = config if config.stain.method != "none" else config.replace(stain=StainConfig(method="macenko"))
    cols = len(paths)
    fig, axes = plt.subplots(2, cols, figsize=(2.0 * cols, 4.3), squeeze=False)
    for j, p in enumerate(paths):
        raw = _native.decode(str(p))
        norm, fallback = _native.normalize_stain(raw, stain_cfg.to_native_json())
        for i, (img, label) in enumerate(((raw, "raw"), (norm, stain_cfg.stain.method + (" (fallback)" if fallback else "")))):
            ax = axes[i][j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label)
        axes[0][j].set_title(p.stem[-18:], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def _pick_cells(root: Path, n: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    alls = [p for p in files if "_all" in p.name]
    hems = [p for p in files if "_hem" in p.name]
    picked = [x for pair in zip(alls, hems) for x in pair][:n]
    return picked or files[:n]


def run_demo(out_dir: str | Path, *, quick: bool = False, real: str | Path | None = None, seed: int = 0,
             backend: str = "auto", console: Any = None, with_training: bool = False) -> dict[str, Any]:
    """Run every stage into ``out_dir`` and return the summary (also written to demo_summary.json).
    ``with_training``: also train, evaluate, export and build an engine for a tiny model (needs PyTorch)."""
    size = (QUICK if quick else FULL) if with_training else (QUICK if quick else LEAN)
    demo = _Demo(Path(out_dir).resolve(), size, seed=seed, backend=backend, real=real,
                 console=console or Console(), with_training=with_training)
    out, summary = demo.out, demo.summary
    summary["quick"] = quick
    summary["training"] = with_training
    t_start = time.perf_counter()
    for name, fn, required in demo.stages():
        _run_stage(demo.console, demo.log, name, fn, required=required)
    if not (out / "cells_grid.png").exists() and _have_matplotlib():
        cells_grid(_pick_cells(out / "data", 6), out / "cells_grid.png", load_cache(out / "cache").config,
                   "Synthetic cells: raw (top) and Macenko-normalised (bottom)")
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    report = build_report(out, title="leukedge demo")
    summary["report"] = str(report)
    _print_final(demo.console, summary)
    return summary


class _Demo:
    """The demo's stages, one method each; a stage returns its one-line result (see :func:`_run_stage`)."""

    def __init__(self, out: Path, size: DemoSize, *, seed: int, backend: str, real: str | Path | None, console: Any,
                 with_training: bool = False) -> None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        self.out, self.size, self.seed, self.backend, self.real, self.console = out, size, seed, backend, real, console
        self.with_training = with_training
        self.log = StageLog()
        self.state: dict[str, Any] = {}
        self.summary: dict[str, Any] = {"synthetic": True, "quick": False, "out_dir": str(out), "stages": self.log.stages}
        self.real_dir = Path(real) if real else default_real_dir()

    def stages(self) -> list[tuple[str, Callable[[], str], bool]]:
        if not self.with_training:  # the lean demo: no PyTorch anywhere
            names: list[tuple[str, Callable[[], str], bool]] = [
                ("synth", self.stage_synth, True), ("preprocess", self.stage_preprocess_shipped, True),
                ("infer", self.stage_infer_shipped, True), ("real cells", self.stage_real, False),
                ("station", self.stage_station, False)]
        else:
            names = [("synth", self.stage_synth, True), ("preprocess", self.stage_preprocess, True),
                     ("train", self.stage_train, True), ("evaluate", self.stage_evaluate, True),
                     ("export", self.stage_export, True), ("build-engine", self.stage_engine, False),
                     ("infer", self.stage_infer, True), ("real cells", self.stage_real, False),
                     ("station", self.stage_station, False)]
        return [(f"{i}. {name}", fn, required) for i, (name, fn, required) in enumerate(names, start=1)]

    def stage_synth(self) -> str:
        size = self.size
        n = size.subjects * size.cells_per_subject
        with RichReporter(self.console).progress("synth", total=n) as task:
            synth.generate_dataset(self.out / "data", subjects=size.subjects, cells_per_subject=size.cells_per_subject,
                                   seed=self.seed, progress=task.advance)
        return f"{n} synthetic cells, {size.subjects} subjects, Kaggle layout in {self.out / 'data'}"

    def stage_preprocess_shipped(self) -> str:
        """The Rust core with the shipped model's own settings, on the synthetic and the real cells."""
        cfg = load_config_source(default_model_path())
        sources = [self.out / "data"] + ([self.real_dir] if self.real_dir is not None and self.real_dir.is_dir() else [])
        s = run_preprocess(sources, self.out / "cache", cfg, progress=True, reporter=RichReporter(self.console))
        print_summary(s, self.console)
        return (f"{s.n_ok} cells → {cfg.size}px (the shipped model's settings: stain {cfg.stain.method}, crop {cfg.crop}), "
                f"{s.n_failed} failed")

    def stage_infer_shipped(self) -> str:
        res = run_inference(None, [self.out / "data"], self.out / "infer" / "predictions.csv", batch=32,
                            backend=self.backend, progress=True, reporter=RichReporter(self.console))
        print_stats(res.stats, self.console)
        self.summary["infer"] = {k: res.stats.get(k) for k in ("backend", "backend_reason", "batch", "n_files",
                                                           "throughput_img_s")}
        return (f"shipped model on {res.stats['n_files']} synthetic files with {res.stats['backend']}: "
                f"{res.stats['throughput_img_s']:.0f} img/s end to end (synthetic cells: throughput only, no score)")

    def stage_preprocess(self) -> str:
        cfg = PreprocessConfig(stain=StainConfig(method="macenko"), size=self.size.size, crop="bbox")
        s = run_preprocess([self.out / "data"], self.out / "cache", cfg, progress=True, reporter=RichReporter(self.console))
        print_summary(s, self.console)
        if s.n_failed:
            raise RuntimeError(f"{s.n_failed} synthetic cells failed to preprocess: {s.failures[:3]}")
        return f"{s.n_ok} cells → {self.size.size}px, Macenko, {s.n_stain_fallback} stain fallbacks, splits {s.splits}"

    def stage_train(self) -> str:
        cfg = training.TrainConfig(arch="tiny", epochs=self.size.epochs, batch_size=self.size.batch, lr=3e-3, seed=self.seed,
                                   patience=0, progress=True)
        res = training.train(self.out / "cache", self.out / "train", cfg,  # loads torch (the --train demo only)
                             reporter=RichReporter(self.console, quiet=cfg.quiet, bars=cfg.progress))
        self.state["bundle"] = res.bundle_path
        return f"tiny CNN, best epoch {res.best_epoch}, val weighted F1 {res.best_val_f1:.3f}"

    def stage_evaluate(self) -> str:
        result = evaluate(self.out / "cache", self.state["bundle"], split="val", progress=True,
                          reporter=RichReporter(self.console))
        result["title"] = "Tiny CNN trained on synthetic cells: its subject-disjoint validation fold"
        write_report(result, self.out / "evaluate", bundle_path=Path(self.state["bundle"]))
        self.summary["metrics"] = {k: result.get(k) for k in ("n", "weighted_f1", "weighted_f1_ci", "accuracy", "roc_auc")}
        return (f"subject-disjoint val fold: {result.get('n')} cells, weighted F1 {result.get('weighted_f1'):.3f} "
                f"{format_ci(result.get('weighted_f1_ci'))}, ROC-AUC {result.get('roc_auc') or float('nan'):.3f}")

    def stage_export(self) -> str:
        from ..export import export_bundle
        from .export import print_report

        res = export_bundle(self.state["bundle"], self.out / "onnx")
        print_report(res.report, self.console)
        self.state["onnx_dir"] = self.out / "onnx"
        return f"FP32 + FP16 ONNX in {self.out / 'onnx'}"

    def stage_engine(self) -> str:
        from ..engines.build import BuildError, build_engine, pick_flavour
        from .build_engine import print_summary as print_engine

        try:
            flavour, why = pick_flavour("auto")
        except BuildError as exc:
            return f"skipped: {exc}"
        engine = self.out / "engine" / "model.engine"
        engine.parent.mkdir(parents=True, exist_ok=True)
        info = build_engine(self.state["onnx_dir"], engine, backend="auto", min_batch=1, opt_batch=16, max_batch=64,
                            reporter=RichReporter())
        print_engine(info, engine, self.console)
        self.state["engine"] = engine
        return f"{flavour} ({why}): {engine.name}, {engine.stat().st_size / 1e6:.1f} MB"

    def stage_infer(self) -> str:
        cache = load_cache(self.out / "cache")
        val = [r["path"] for r in cache.manifest if r.get("split") == "val"] or [r["path"] for r in cache.manifest]
        # the engine built in stage 6 is offered to `auto`, which runs it when a GPU can, else says why not
        res = run_inference(self.state.get("onnx_dir") or self.state["bundle"], val, self.out / "infer" / "predictions.csv",
                            batch=16, backend=self.backend, engine=self.state.get("engine"), progress=True,
                            reporter=RichReporter())
        print_stats(res.stats, self.console)
        self.summary["infer"] = {k: res.stats.get(k) for k in ("backend", "backend_reason", "batch", "n_files",
                                                           "throughput_img_s")}
        return (f"{res.stats['n_files']} files with {res.stats['backend']} ({res.reason}); "
                f"{res.stats['throughput_img_s']:.0f} img/s end to end")

    def stage_real(self) -> str:
        """The shipped model on real C-NMC cells, scored only on the cells it was never trained on."""
        real_dir = self.real_dir
        if real_dir is None or not real_dir.is_dir():
            return "skipped: no real cells (../shared/data/cnmc_sample not found; pass --real DIR)"
        res = run_inference(None, [real_dir], self.out / "real" / "predictions.csv", batch=16, backend=self.backend,
                            progress=True, reporter=RichReporter(self.console))
        print_stats(res.stats, self.console)
        rs = score_unseen(res.results, self.out / "real")
        rs.update(dir=str(real_dir), backend=res.stats["backend"])
        self.summary["real_sample"] = rs
        if _have_matplotlib():
            try:
                cells_grid(_pick_cells(real_dir, 6), self.out / "cells_grid.png", load_cache(self.out / "cache").config,
                           "Real C-NMC cells: raw (top) and Macenko-normalised (bottom)")
            except Exception as exc:  # noqa: BLE001 - the grid is illustration only
                self.console.print(f"[yellow]cell grid not drawn: {exc}")
        return rs["note"]

    def stage_station(self) -> str:
        """Microscope-station mode on a watch folder (one sample folder per subject), run once."""
        from ..station import db as sdb
        from ..station.core import Station, StationSettings
        from .station import open_predictor, predict_fn
        from .station_reporter import Reporter

        watch = self.out / "station" / "incoming"
        src = self.real_dir if self.real_dir is not None and self.real_dir.is_dir() else self.out / "data"
        files = _pick_cells(src, 24)
        for p in files:
            parsed = parse_name(p.name)
            sample = f"subject_{parsed.subject}" if parsed else "sample"
            (watch / sample).mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, watch / sample / p.name)
        pred, info = open_predictor(None, self.backend, fallback=True, device="auto", threads=0, batch_size=8,
                                    console=self.console)
        settings = StationSettings(watch_dir=watch, db_path=self.out / "station" / "station.sqlite", batch_size=8,
                                   max_wait_ms=50, settle_ms=0, poll_ms=25, once=True)
        try:
            summ = Station(settings, predict_fn(pred), info, reporter=Reporter(self.console)).run()
        finally:
            pred.close()
        conn = sdb.connect(settings.db_path, readonly=True)
        try:
            samples = sdb.sample_totals(conn)
        finally:
            conn.close()
        self.summary["station"] = {"watch_dir": str(watch), "db": str(settings.db_path), "processed": summ.processed,
                                   "errors": summ.errors, "batches": summ.batches, "samples": samples}
        return (f"{summ.processed} files from {len(samples)} samples in {summ.batches} batches → {settings.db_path.name} "
                f"({summ.errors} errors)")


def score_unseen(results: list[Any], out: Path) -> dict[str, Any]:
    """Score the shipped model on the labelled real cells it was *not* trained on (its ``trained_on.txt``
    lists the pixel digests of its training cells); write ``metrics.json`` (with the subject-bootstrap
    interval) and the plots into ``out``; return the summary the demo prints and the report shows."""
    seen_digests = read_trained_on(default_model_path())
    ok = [r for r in results if r.status == "ok" and r.true_label in CLASS_NAMES]
    digests = pixel_digests([r.path for r in ok]) if seen_digests is not None else {}
    seen = [r for r in ok if digests.get(r.path) in (seen_digests or ())]
    unseen = [r for r in ok if r not in seen]
    rs: dict[str, Any] = {"model": "shipped default (leukedge/default_model)", "files": len(results), "labelled": len(ok),
                          "in_training_set": len(seen) if seen_digests is not None else None, "scored": len(unseen),
                          "seen_files": sorted(Path(r.path).name for r in seen)}
    if seen_digests is None:
        rs["note"] = f"{len(ok)} labelled real cells; the model has no trained_on.txt, so which it saw is unknown: no score"
        return rs
    if not unseen:
        rs["note"] = f"all {len(ok)} labelled real cells are training cells of the shipped model: no honest score"
        return rs
    y = [1 if r.true_label == "all" else 0 for r in unseen]
    p = [float(r.probability) for r in unseen]
    subj = [r.subject for r in unseen]
    m = compute_metrics(y, p, subjects=subj)
    ci = subject_bootstrap_ci(y, p, subj)
    result = {**m, "title": f"Shipped default model on {len(unseen)} real C-NMC cells it never saw",
              "model": rs["model"], "weighted_f1_ci": ci, "subject_warning": few_subjects_warning(y, subj, "scored"),
              "excluded_training_cells": rs["seen_files"],
              "predictions": [{"index": i, "path": r.path, "subject": r.subject, "label": y[i], "prob_all": p[i],
                               "predicted": r.label} for i, r in enumerate(unseen)]}
    if _have_matplotlib():
        write_report(result, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2) + "\n")
    rs.update(weighted_f1=m["weighted_f1"], weighted_f1_ci=ci, accuracy=m["accuracy"], roc_auc=m["roc_auc"])
    rs["note"] = (f"{len(unseen)} of {len(ok)} labelled real cells never seen in training ({len(seen)} training cells left "
                  f"out): weighted F1 {m['weighted_f1']:.3f} {format_ci(ci)}")
    return rs


def _have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _print_final(console: Any, summary: dict[str, Any]) -> None:
    what = ("SYNTHETIC training data" if summary.get("training") else "shipped model; synthetic cells for throughput only")
    t = Table(title=f"leukedge demo: summary ({what} — not for clinical use)")
    t.add_column("stage")
    t.add_column("status")
    t.add_column("s", justify="right")
    t.add_column("result")
    for s in summary["stages"]:
        color = {"ok": "green", "skipped": "yellow"}.get(s["status"], "red")
        t.add_row(s["stage"], f"[{color}]{s['status']}", f"{s['seconds']:.1f}", s["note"])
    console.print(t)
    console.print(f"files: {summary['out_dir']}   report: [bold]{summary.get('report')}[/]   "
                  f"total {summary['total_seconds']:.0f}s")


@click.command("demo")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"),
              show_default=True, help="Output directory (replaced if it exists).")
@click.option("--train", "with_training", is_flag=True,
              help="Also train, evaluate, export and build an engine for a tiny model on the synthetic cells "
                   "(needs PyTorch: `make demo-train`).")
@click.option("--quick", is_flag=True, default=lambda: os.environ.get("LEUKEDGE_DEMO_QUICK", "") not in ("", "0"),
              help="Tiny set and few epochs (about a minute); also LEUKEDGE_DEMO_QUICK=1.")
@click.option("--real", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of real cells for the shipped default model [default: $LEUKEDGE_SAMPLE_DIR, or "
                   "../shared/data/cnmc_sample beside a source checkout].")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime", "torch"]), default="auto",
              show_default=True, help="Inference backend for the infer stages.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_cmd(out_dir: Path, with_training: bool, quick: bool, real: Path | None, backend: str, seed: int) -> None:
    """Run the pipeline end to end and write an HTML report (OUT/report.html). No data set, no GPU.

    \b
    Default (no PyTorch needed): synthetic cells → Rust preprocessing → the shipped
    model on ONNX Runtime → its score on real C-NMC cells it never saw (cells listed in
    its trained_on.txt are left out) → the microscope station on a watch folder → report.
    --train adds a tiny model trained on the synthetic cells (train, evaluate, export,
    build-engine); it needs PyTorch and is not for clinical use.
    """
    if with_training:
        if importlib.util.find_spec("torch") is None:
            raise click.ClickException("--train needs PyTorch: pip install 'leukedge[train]' (or `make demo-train`)")
    try:
        run_demo(out_dir, quick=quick, real=real, seed=seed, backend=backend, with_training=with_training)
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"demo failed: {type(exc).__name__}: {exc}") from exc
