"""``leukedge demo``: the whole pipeline end to end on synthetic cells, with an HTML report.

Stages: synth → preprocess (Macenko) → train (tiny CNN) → evaluate (subject-disjoint fold) →
export (FP32 + FP16 ONNX) → build-engine (TensorRT-RTX / TensorRT, or a line saying why not) →
infer --batch (best available backend) → the shipped real default model on real C-NMC cells →
report.html.  Needs no data set and no GPU.  ``--quick`` (or ``LEUKEDGE_DEMO_QUICK=1``) runs the
same stages on a tiny set.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from .. import synth
from .._util import IMAGE_EXTENSIONS
from ..artifacts import load_cache
from ..config import PreprocessConfig, StainConfig
from ..evaluate import evaluate, write_report
from ..infer import run_inference
from ..preprocess import run_preprocess
from ..train import TrainConfig, train
from ._console import RichReporter
from .infer import print_stats
from .preprocess import print_summary

_REPO_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "cnmc_sample"  # leukedge/cli/demo.py


def default_real_dir() -> Path | None:
    """The 52 real C-NMC cells beside the checkout (``../shared/data/cnmc_sample``), if present."""
    env = os.environ.get("LEUKEDGE_SAMPLE_DIR")
    for cand in ([Path(env)] if env else []) + [_REPO_SAMPLE, Path.cwd().parent / "shared" / "data" / "cnmc_sample"]:
        if cand.is_dir():
            return cand
    return None


@dataclass(frozen=True)
class DemoSize:
    subjects: int
    cells_per_subject: int
    size: int
    epochs: int
    batch: int


FULL = DemoSize(subjects=18, cells_per_subject=30, size=64, epochs=14, batch=32)
QUICK = DemoSize(subjects=9, cells_per_subject=10, size=48, epochs=4, batch=16)


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

    from .._util import load_native

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
             backend: str = "auto", console: Any = None) -> dict[str, Any]:
    """Run every stage into ``out_dir`` and return the summary (also written to demo_summary.json)."""
    from rich.console import Console

    from ..report import build_report

    demo = _Demo(Path(out_dir).resolve(), QUICK if quick else FULL, seed=seed, backend=backend, real=real,
                 console=console or Console())
    out, summary = demo.out, demo.summary
    summary["quick"] = quick
    t_start = time.perf_counter()
    for name, fn, required in demo.stages():
        _run_stage(demo.console, demo.log, name, fn, required=required)
    if not (out / "cells_grid.png").exists():
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

    def __init__(self, out: Path, size: DemoSize, *, seed: int, backend: str, real: str | Path | None, console: Any) -> None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        self.out, self.size, self.seed, self.backend, self.real, self.console = out, size, seed, backend, real, console
        self.log = StageLog()
        self.state: dict[str, Any] = {}
        self.summary: dict[str, Any] = {"synthetic": True, "quick": False, "out_dir": str(out), "stages": self.log.stages}

    def stages(self) -> list[tuple[str, Callable[[], str], bool]]:
        return [("1. synth", self.stage_synth, True), ("2. preprocess", self.stage_preprocess, True),
                ("3. train", self.stage_train, True), ("4. evaluate", self.stage_evaluate, True),
                ("5. export", self.stage_export, True), ("6. build-engine", self.stage_engine, False),
                ("7. infer", self.stage_infer, True), ("8. real cells", self.stage_real, False)]

    def stage_synth(self) -> str:
        size = self.size
        info = synth.generate_dataset(self.out / "data", subjects=size.subjects, cells_per_subject=size.cells_per_subject,
                                      seed=self.seed)
        n = self.size.subjects * self.size.cells_per_subject
        return f"{n} synthetic cells, {self.size.subjects} subjects, Kaggle layout in {self.out / 'data'}" if info is not None else ""

    def stage_preprocess(self) -> str:
        cfg = PreprocessConfig(stain=StainConfig(method="macenko"), size=self.size.size, crop="bbox")
        s = run_preprocess([self.out / "data"], self.out / "cache", cfg, progress=True, reporter=RichReporter(self.console))
        print_summary(s, self.console)
        if s.n_failed:
            raise RuntimeError(f"{s.n_failed} synthetic cells failed to preprocess: {s.failures[:3]}")
        return f"{s.n_ok} cells → {self.size.size}px, Macenko, {s.n_stain_fallback} stain fallbacks, splits {s.splits}"

    def stage_train(self) -> str:
        cfg = TrainConfig(arch="tiny", epochs=self.size.epochs, batch_size=self.size.batch, lr=3e-3, seed=self.seed, patience=0,
                          progress=True)
        res = train(self.out / "cache", self.out / "train", cfg, reporter=RichReporter(quiet=cfg.quiet, bars=cfg.progress))
        self.state["bundle"] = res.bundle_path
        return f"tiny CNN, best epoch {res.best_epoch}, val weighted F1 {res.best_val_f1:.3f}"

    def stage_evaluate(self) -> str:
        result = evaluate(self.out / "cache", self.state["bundle"], split="val", progress=True, reporter=RichReporter())
        write_report(result, self.out / "evaluate", bundle_path=Path(self.state["bundle"]))
        self.summary["metrics"] = {k: result.get(k) for k in ("n", "weighted_f1", "accuracy", "roc_auc")}
        return (f"subject-disjoint val fold: {result.get('n')} cells, weighted F1 {result.get('weighted_f1'):.3f}, "
                f"ROC-AUC {result.get('roc_auc') or float('nan'):.3f}")

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
        real_dir = Path(self.real) if self.real else default_real_dir()
        if real_dir is None or not real_dir.is_dir():
            return "skipped: no real cells (../shared/data/cnmc_sample not found; pass --real DIR)"
        res = run_inference(None, [real_dir], self.out / "real" / "predictions.csv", batch=16, backend=self.backend,
                            progress=True, reporter=RichReporter())
        print_stats(res.stats, self.console)
        from ..data import parse_name
        from ..evaluate import compute_metrics

        y, p = [], []
        for r in res.results:
            parsed = parse_name(Path(r.path).name)
            if r.status == "ok" and parsed is not None and parsed.label >= 0:
                y.append(parsed.label)
                p.append(r.probability)
        rs: dict[str, Any] = {"dir": str(real_dir), "files": len(res.results), "backend": res.stats["backend"],
                              "model": "shipped default (leukedge/default_model)"}
        if y:
            m = compute_metrics(y, p)
            rs.update(labelled=len(y), weighted_f1=m["weighted_f1"], accuracy=m["accuracy"], roc_auc=m["roc_auc"])
            (self.out / "real" / "metrics.json").write_text(json.dumps({**m, "title": "Shipped default model on real cells",
                                                                    "model": rs["model"]}, indent=2) + "\n")
        self.summary["real_sample"] = rs
        try:
            cells_grid(_pick_cells(real_dir, 6), self.out / "cells_grid.png", load_cache(self.out / "cache").config,
                       "Real C-NMC cells: raw (top) and Macenko-normalised (bottom)")
        except Exception as exc:  # noqa: BLE001 - the grid is illustration only
            self.console.print(f"[yellow]cell grid not drawn: {exc}")
        wf1 = rs.get("weighted_f1")
        return f"{len(res.results)} real cells, weighted F1 {wf1:.3f}" if wf1 is not None else f"{len(res.results)} real cells"


def _print_final(console: Any, summary: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="leukedge demo: summary (SYNTHETIC training data — not for clinical use)")
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
@click.option("--quick", is_flag=True, default=lambda: os.environ.get("LEUKEDGE_DEMO_QUICK", "") not in ("", "0"),
              help="Tiny set and few epochs (about a minute); also LEUKEDGE_DEMO_QUICK=1.")
@click.option("--real", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of real cells for the shipped default model [default: ../shared/data/cnmc_sample if present].")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime", "torch"]), default="auto",
              show_default=True, help="Inference backend for the infer stages.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_cmd(out_dir: Path, quick: bool, real: Path | None, backend: str, seed: int) -> None:
    """Run the whole pipeline end to end on synthetic C-NMC-like cells and write an HTML report.

    No data set and no GPU are needed. The model it trains is trained on synthetic data and is
    not for clinical use; the shipped default model (trained on real C-NMC fold 0) is run on
    real cells when they are available.
    """
    try:
        run_demo(out_dir, quick=quick, real=real, seed=seed, backend=backend)
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"demo failed: {type(exc).__name__}: {exc}") from exc
