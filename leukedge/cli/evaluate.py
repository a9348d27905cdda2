"""`leukedge evaluate`: the command and its summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..config import ConfigMismatchError
from ..evaluate import SYNTHETIC_WARNING, evaluate, format_ci, write_report
from ._console import RichReporter


def _print_summary(result: dict[str, Any], files: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if result.get("synthetic"):
        con.print(f"[bold magenta]{SYNTHETIC_WARNING}[/]")
    con.print(f"Model {result.get('model')} ({result.get('arch')}) on {result.get('cache')}: "
              f"{result['n_images']} images, {result['n_labelled']} labelled")
    if "weighted_f1" in result:
        auc = result.get("roc_auc")
        con.print(f"[bold]weighted F1 {result['weighted_f1']:.4f}[/] {format_ci(result.get('weighted_f1_ci'))}  "
                  f"accuracy {result['accuracy']:.4f}  ROC-AUC {'n/a' if auc is None else f'{auc:.4f}'}")
        if result.get("subject_warning"):
            con.print(f"[bold yellow]warning: {result['subject_warning']}[/]")
        t = Table(title="Per class")
        for c in ("class", "precision", "recall", "F1", "support"):
            t.add_column(c, justify="left" if c == "class" else "right")
        for name, m in result["per_class"].items():
            t.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
        con.print(t)
        cm = result["confusion_matrix"]["matrix"]
        con.print(f"Confusion (rows true hem/all, columns predicted hem/all): {cm}")
    t = Table(title="Per subject")
    for c in ("subject", "class", "n", "accuracy", "mean P(all)", "blast fraction"):
        t.add_column(c, justify="left" if c in ("subject", "class") else "right")
    for r in result.get("per_subject", []):
        acc = r.get("accuracy")
        t.add_row(str(r["subject"]), r["true_class"], str(r["n"]), "-" if acc is None else f"{acc:.3f}",
                  f"{r['mean_prob_all']:.3f}", f"{r['predicted_blast_fraction']:.3f}")
    con.print(t)
    con.print("Wrote " + ", ".join(files.values()))


@click.command("evaluate")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model bundle directory (default: the model shipped with leukedge).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for metrics.json, predictions.csv and the PNG plots.")
@click.option("--split", default=None, help="Only evaluate cache rows with this split (e.g. val, train).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def evaluate_cmd(cache: str, model_path: str | None, out_dir: str, split: str | None, batch_size: int, device: str) -> None:
    """Evaluate a model bundle on the preprocessed dataset CACHE.

    Reports accuracy, per-class precision/recall/F1, weighted F1 (the C-NMC metric), ROC-AUC, the
    confusion matrix and a per-subject breakdown, as JSON and PNG plots. The cache must have been
    preprocessed with exactly the bundle's settings (see `leukedge preprocess --config`); otherwise
    the command refuses and names the settings that differ.
    """
    import torch

    from ..models import BundleError, default_bundle_path, load_bundle

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device is available")
    bpath = Path(model_path) if model_path else default_bundle_path()
    try:
        bundle = load_bundle(bpath)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        result = evaluate(cache, bundle, split=split, batch_size=batch_size, device=device, progress=True,
                          reporter=RichReporter())
    except ConfigMismatchError as exc:
        raise click.ClickException(f"refusing to evaluate: {exc}") from exc
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(f"{cache}: {exc}") from exc
    files = write_report(result, out_dir, bpath)
    _print_summary(result, files)


