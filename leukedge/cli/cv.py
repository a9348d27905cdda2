"""`leukedge cv`: the cross-validation command and its result table."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..archs import PretrainedWeightsUnavailable
from ..cv import OOF_FILE, SPLITS, cross_validate
from ..distributed import is_main  # [ddp]
from ..evaluate import format_ci
from ._console import RichReporter
from .train import config_from_cli, run_errors, train_options


@click.command("cv")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Run directory: cv.json, oof_predictions.csv, per_subject.csv, plots, report.html, seed*/fold*/.")
@click.option("--split", type=click.Choice(SPLITS), default="subject", show_default=True,
              help="subject: K subject-grouped folds inside the pooled cells. official: official-fold transfer, train on "
                   "the other official C-NMC folds and test on one, every direction (the honest analogue of new patients; "
                   "needs a cache of two or more fold_N folders).")
@click.option("--folds", type=click.IntRange(2, 50), default=3, show_default=True, help="Number of subject-grouped folds (--split subject).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds: one partition of the subjects each.")
@train_options
@click.pass_context
def cv_cmd(ctx: click.Context, cache: str, out_dir: str, split: str, folds: int, seeds: str, **params: Any) -> None:
    """Cross-validate a training recipe on CACHE with subject-grouped, class-stratified folds.

    Takes exactly the options of `leukedge train` (or its --recipe file). Prints and writes, per fold
    and as mean ± sd over all folds of all seeds, weighted F1 and ROC-AUC; a per-subject table, worst
    subjects first; the out-of-fold predictions (CSV) and the threshold that would have maximised
    their weighted F1; plots in OUT/report.html. --resume continues an interrupted run.
    """
    seed_list = parse_seeds(seeds)
    cfg = config_from_cli(ctx, params, defaults={"select": "last"})
    main_rank = is_main()  # [ddp] under torchrun rank 0 prints
    console = Console(stderr=True, quiet=not main_rank)
    try:
        res = cross_validate(cache, out_dir, cfg, folds=folds, seeds=seed_list, split=split, log=console.print,
                             reporter=RichReporter(quiet=cfg.quiet or not main_rank, bars=cfg.progress and main_rank))
    except PretrainedWeightsUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    except run_errors() as exc:
        raise click.ClickException(str(exc) if str(cache) in str(exc) else f"{cache}: {exc}") from exc
    if not main_rank:  # [ddp]
        return
    s = res.summary
    out = Console()
    out.print(_fold_table(s))
    base = s.get("baseline")
    st = Table(title="per subject, worst first (accuracy over seeds)")
    for c in ("subject", "class", "cells", "accuracy", "mean P(all)"):
        st.add_column(c, justify="left" if c in ("subject", "class") else "right")
    for r in s["per_subject"]:
        st.add_row(r["subject"], r["true_class"], str(r["n"]), f"{r['accuracy']:.3f} ± {r['accuracy_sd']:.3f}",
                   f"{r['mean_prob_all']:.3f}")
    out.print(st)
    f1, auc = s["weighted_f1"], s["roc_auc"]
    out.print(f"[bold green]weighted F1 {f1['mean']:.4f} ± {f1['sd']:.4f}[/], ROC-AUC "
              + ("n/a" if auc["mean"] is None else f"{auc['mean']:.4f} ± {auc['sd']:.4f}")
              + f" over {f1['n']} folds ({len(seed_list)} seed(s)); worst subjects {', '.join(s['worst_subjects'])}; "
              f"out-of-fold best threshold {s['oof_threshold']['mean']:.2f} ± {s['oof_threshold']['sd']:.2f}")
    if base:
        out.print(f"baseline ({base['name']}): weighted F1 {base['weighted_f1']['mean']:.4f} ± {base['weighted_f1']['sd']:.4f}"
                  + ("" if base["roc_auc"]["mean"] is None else f", ROC-AUC {base['roc_auc']['mean']:.4f}"))
    pooled = s["per_seed"][0]
    out.print(f"pooled out-of-fold weighted F1 (seed {pooled['seed']}) {pooled['pooled_weighted_f1']:.4f} "
              f"{format_ci(s.get('pooled_weighted_f1_ci'))}")
    out.print(f"results in {res.out_dir} (cv.json, {OOF_FILE}, per_subject.csv, report.html)")


def _fold_table(s: dict[str, Any]) -> Any:
    """The per-fold table of a cv summary, with the baseline's folds dimmed below."""
    t = Table(title=f"cross-validation: {s['scheme']}")
    for c in ("seed", "fold", "val cells", "val subjects", "weighted F1", "ROC-AUC"):
        t.add_column(c, justify="right" if c not in ("val subjects",) else "left")
    for f in s["fold_runs"]:
        fold = str(f["fold"]) if f.get("test_fold") is None else f"test on official fold {f['test_fold']}"
        t.add_row(str(f["seed"]), fold, str(f["n_val"]), ", ".join(f["val_subjects"]), f"{f['weighted_f1']:.4f}",
                  "n/a" if f["roc_auc"] is None else f"{f['roc_auc']:.4f}")
    base = s.get("baseline") or {}
    for b in base.get("folds", []):
        fold = str(b["fold"]) if b.get("test_fold") is None else f"test on official fold {b['test_fold']}"
        t.add_row("baseline", fold, str(b["n_test"]), base["name"], f"{b['weighted_f1']:.4f}",
                  "n/a" if b["roc_auc"] is None else f"{b['roc_auc']:.4f}", style="dim")
    return t


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers such as 0,1,2") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"{text!r}: give distinct seeds, e.g. 0,1,2")
    return seeds


