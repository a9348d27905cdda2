"""Subject-grouped, class-stratified K-fold cross-validation with exactly `leukedge train`'s recipe.

Every fold is an ordinary ``leukedge train`` run (``RUN/seed<S>/fold<K>``) on the cache rows of the
other folds, validated on its own fold's subjects, which it has never seen; identical files under
different subject names stay in one fold (:func:`leukedge.data.group_kfold`). Several seeds give
several different partitions of the subjects, because with a few dozen patients one split says
little. The out-of-fold probabilities are those of the model each fold keeps, with its test-time
computation (TTA, threshold), so they are what ``leukedge evaluate`` of that fold's bundle gives.

Outputs in ``RUN``: ``cv.json`` (recipe, per-fold and mean ± sd metrics, per-seed pooled metrics,
per-subject table, out-of-fold threshold), ``oof_predictions.csv``, ``per_subject.csv``, plots
(``cv_folds.png``, ``cv_per_subject.png``, ``cv_roc.png``) and ``report.html``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import distributed as _ddp  # [ddp] under torchrun rank 0 writes and decides
from . import training
from ._util import CLASS_NAMES, Reporter, as_int, atomic_write_json
from .artifacts import load_cache
from .baseline import area_baseline_fold, cell_areas, summarize_baseline
from .data import group_kfold, pool_rows, subjects_of
from .evaluate import compute_metrics, subject_bootstrap_ci
from .report import build_report
from .training import TEST_TIME_FIELDS, TTA_CHOICES, TrainConfig, recipe_of

CV_FILE = "cv.json"
OOF_FILE = "oof_predictions.csv"


@dataclass
class CVResult:
    out_dir: Path
    summary: dict[str, Any]
    oof: list[dict[str, Any]]


def _mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    return {"mean": float(np.mean(vals)) if vals else None,
            "sd": float(statistics.stdev(vals)) if len(vals) > 1 else 0.0, "n": len(vals)}


def best_threshold(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """The threshold on P(all) (grid 0.05-0.95) that maximises weighted F1, and that F1."""
    from sklearn.metrics import f1_score

    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    scores = [f1_score(y, (p >= t).astype(int), labels=[0, 1], average="weighted", zero_division=0) for t in grid]
    i = int(np.argmax(scores))
    return float(grid[i]), float(scores[i])


SPLITS = ("subject", "official")


def row_digests(images: np.ndarray) -> list[str]:
    """sha256 of each cached image: equal for cells that are pixel-identical in the source (the
    preprocessing is deterministic), whatever their file format or name. C-NMC holds such
    duplicates under different subject names, across official folds too."""
    return [hashlib.sha256(np.ascontiguousarray(images[i]).tobytes()).hexdigest() for i in range(len(images))]


def make_folds(manifest: Sequence[dict[str, Any]], k: int, seed: int,
               digests: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(train rows, validation rows) of the cache for each of ``k`` subject-grouped folds. With
    ``digests`` (:func:`row_digests`), pixel-identical cells are kept on one side as well."""
    rows = pool_rows(manifest)
    items = [manifest[i] if digests is None else {**manifest[i], "sha256": digests[i]} for i in rows]
    folds = []
    for tr, va in group_kfold(items, k=k, seed=seed):
        tr_rows, va_rows = [rows[i] for i in tr], [rows[i] for i in va]
        leak = {str(manifest[i].get("subject")) for i in tr_rows} & {str(manifest[i].get("subject")) for i in va_rows}
        if leak:
            raise RuntimeError(f"internal error: subjects in two folds: {sorted(leak)[:5]}")
        folds.append((tr_rows, va_rows))
    return folds


def official_folds(manifest: Sequence[dict[str, Any]], digests: Sequence[str] | None = None
                   ) -> list[tuple[int, list[int], list[int], int]]:
    """Official-fold transfer: for each official fold F of the cache, ``(F, train rows, test rows,
    dropped)``: train on every other official fold, test on F. Test cells pixel-identical to a
    training cell (``digests``) are dropped (``dropped`` counts them), and a subject found on both
    sides is refused. Needs rows of at least two official folds (``fold`` in the manifest, from the
    ``fold_N`` folders)."""
    rows = pool_rows(manifest)
    by_fold: dict[int, list[int]] = {}
    missing = 0
    for i in rows:
        f = as_int(manifest[i].get("fold"))
        if f < 0:
            missing += 1
        else:
            by_fold.setdefault(f, []).append(i)
    if len(by_fold) < 2:
        raise ValueError(f"--split official needs cells of at least two official folds (fold_N folders); this cache has "
                         f"{len(by_fold)} fold(s){f' and {missing} cells without a fold' if missing else ''}")
    out = []
    for f in sorted(by_fold):
        tr = sorted(i for g, r in by_fold.items() if g != f for i in r)
        te = by_fold[f]
        leak = {str(manifest[i].get("subject")) for i in tr} & {str(manifest[i].get("subject")) for i in te}
        if leak:
            raise ValueError(f"subjects in two official folds: {', '.join(sorted(leak)[:5])}: not an official C-NMC split")
        dropped = 0
        if digests is not None:
            seen = {digests[i] for i in tr}
            kept = [i for i in te if digests[i] not in seen]
            dropped, te = len(te) - len(kept), kept
        out.append((f, tr, te, dropped))
    return out


def _read_fold_predictions(path: Path) -> dict[int, float] | None:
    try:
        with path.open(newline="") as fh:
            return {int(r["row"]): float(r["probability"]) for r in csv.DictReader(fh)}
    except (OSError, KeyError, ValueError):
        return None


def _same_test_time(run: Path, cfg: TrainConfig) -> bool:
    """Whether the finished fold in ``run`` predicted with ``cfg``'s test-time settings (else resuming it
    re-scores the kept model, see :data:`leukedge.training.TEST_TIME_FIELDS`)."""
    try:
        old = json.loads((run / "metrics.json").read_text()).get("train_config") or {}
    except (OSError, ValueError):
        return False
    return all(old.get(k) == getattr(cfg, k) for k in TEST_TIME_FIELDS)


def _fold_predictions(cache: str | Path, run: Path, cfg: TrainConfig, seed: int, tr: list[int], va: list[int],
                      log: Callable[[str], None], reporter: Reporter | None,
                      dctx: _ddp.DistContext | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """P(all) of one fold's validation rows and its training history: from a finished earlier run
    (``resume``, same test-time settings), else by training the fold into ``run``."""
    dctx = dctx or _ddp.DistContext()
    pred_file = run / "val_predictions.csv"
    prev = _read_fold_predictions(pred_file) if cfg.resume and _same_test_time(run, cfg) else None
    prev = dctx.broadcast(prev)  # [ddp] rank 0's files decide
    if prev is not None and set(prev) == set(va):
        probs = np.array([prev[i] for i in va])
        hist = json.loads((run / "history.json").read_text()).get("history", []) if (run / "history.json").is_file() else []
        log("  finished before: reusing its predictions")
    else:
        res = training.train(cache, run, dataclasses.replace(cfg, seed=seed, train_indices=tr, val_indices=va,
                                                             no_validation=False), reporter=reporter)
        order = {r: j for j, r in enumerate(res.val_indices)}
        probs = np.array([float(res.val_prob[order[i]]) for i in va])  # type: ignore[index]
        hist = res.history
        if dctx.is_main:  # [ddp]
            with pred_file.open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["row", "probability"])
                w.writerows([i, f"{p:.8f}"] for i, p in zip(va, probs))
    return probs, hist


def _plan(manifest: Sequence[dict[str, Any]], folds: int, seed: int, digests: Sequence[str],
          official: list[tuple[int, list[int], list[int], int]] | None) -> list[tuple[str, list[int], list[int], int, int | None]]:
    """The runs of one seed: ``(name, train rows, test rows, dropped duplicates, official test fold or None)``."""
    if official is not None:
        return [(f"test fold {f}", tr, te, dropped, f) for f, tr, te, dropped in official]
    return [(f"fold {k + 1}/{folds}", tr, va, 0, None) for k, (tr, va) in enumerate(make_folds(manifest, folds, seed, digests))]


def _fold_scores(run: Path, m: dict[str, Any], hist: list[dict[str, Any]]) -> dict[str, Any]:
    """The scores of one fold's row in cv.json (with what each test-time augmentation would have given)."""
    try:
        by_tta = (json.loads((run / "metrics.json").read_text()).get("val") or {}).get("by_tta")
    except (OSError, ValueError):
        by_tta = None
    return {"val_counts": m["class_counts"], "weighted_f1": m["weighted_f1"], "roc_auc": m["roc_auc"],
            "accuracy": m["accuracy"], "history": hist, "by_tta": by_tta,
            "best_val_f1": max((h.get("val_f1") or 0.0 for h in hist), default=float("nan"))}


def _check_args(split: str, folds: int, seeds: Sequence[int]) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if folds < 2:
        raise ValueError("--folds must be at least 2")
    if not seeds:
        raise ValueError("give at least one seed")


def cross_validate(cache: str | Path, out_dir: str | Path, config: TrainConfig | None = None, *, folds: int = 3,
                   seeds: Sequence[int] = (0,), split: str = "subject", log: Callable[[str], None] = print,
                   reporter: Reporter | None = None, **overrides: Any) -> CVResult:
    """Cross-validate ``config`` (a :class:`leukedge.training.TrainConfig`) on the dataset cache ``cache``.

    ``split="subject"``: ``folds`` subject-grouped, class-stratified folds per seed.
    ``split="official"``: official-fold transfer, the honest analogue of new patients: for each
    official fold, train on the others and test on it (both directions with two folds), once per
    seed; ``folds`` is ignored. Either way pixel-identical cells never sit on both sides, and the
    summary carries the one-number baseline (:mod:`leukedge.baseline`, logistic regression on the
    cell's foreground area) scored on the same test cells.

    Folds already finished in ``out_dir`` (their ``val_predictions.csv``) are reused when
    ``config.resume`` is set; an interrupted fold continues from its checkpoints.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    _check_args(split, folds, seeds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dctx = _ddp.context(training.resolve_device(cfg.device))  # [ddp]
    loaded = load_cache(cache)
    manifest = list(loaded.manifest)
    synthetic = bool((getattr(loaded, "meta", {}) or {}).get("synthetic", False))
    labels = np.array([as_int(r.get("label")) for r in manifest])
    t0 = time.time()
    fold_rows: list[dict[str, Any]] = []
    oof: list[dict[str, Any]] = []
    digests = row_digests(loaded.images)
    official = official_folds(manifest, digests) if split == "official" else None
    folds = len(official) if official is not None else folds
    baseline_rows: list[dict[str, Any] | None] = []
    areas = cell_areas(loaded, pool_rows(manifest), log)
    for seed in seeds:
        for k, (name, tr, va, dropped, test_fold) in enumerate(_plan(manifest, folds, int(seed), digests, official)):
            run = out / f"seed{seed}" / (f"fold{k}" if test_fold is None else f"official{test_fold}")
            subj_va = sorted({str(manifest[i].get("subject")) for i in va})
            log(f"[bold]seed {seed} {name}[/]: train {len(tr)} cells of {len(subjects_of(manifest, tr))} subjects, "
                f"validate {len(va)} cells of {len(subj_va)} unseen subjects"
                + (f" ({dropped} test cells pixel-identical to training cells left out)" if dropped else ""))
            if seed == seeds[0]:
                baseline_rows.append(area_baseline_fold(areas, tr, va, labels, k, test_fold))
            probs, hist = _fold_predictions(cache, run, cfg, int(seed), tr, va, log, reporter, dctx)  # [ddp]
            m = compute_metrics(labels[va], probs)
            fold_rows.append({"seed": int(seed), "fold": k, "test_fold": test_fold, "dropped_duplicates": dropped,
                              "n_train": len(tr), "n_val": len(va), "val_subjects": subj_va, **_fold_scores(run, m, hist)})
            log(f"  seed {seed} fold {k}: weighted F1 {m['weighted_f1']:.4f}, ROC-AUC "
                f"{'n/a' if m['roc_auc'] is None else format(m['roc_auc'], '.4f')}")
            oof += [{"seed": int(seed), "fold": k, "row": int(i), "path": manifest[i].get("path"),
                     "subject": manifest[i].get("subject"), "label": int(labels[i]), "probability": float(p)}
                    for i, p in zip(va, probs)]
    summary = summarize(fold_rows, oof, cfg, folds=folds, seeds=seeds, synthetic=synthetic, split=split)
    summary["baseline"] = summarize_baseline(baseline_rows)
    summary["cache"] = str(cache)
    summary["seconds"] = round(time.time() - t0, 1)
    if dctx.is_main:  # [ddp]
        write_outputs(out, summary, oof)
    return CVResult(out_dir=out, summary=summary, oof=oof)


def summarize(fold_rows: list[dict[str, Any]], oof: list[dict[str, Any]], cfg: TrainConfig, *, folds: int,
              seeds: Sequence[int], synthetic: bool = False, split: str = "subject") -> dict[str, Any]:
    """cv.json: per fold, mean ± sd over every (seed, fold), pooled per seed, per subject, OOF threshold."""
    per_seed = []
    for s in seeds:
        rows = [r for r in oof if r["seed"] == int(s)]
        y = np.array([r["label"] for r in rows])
        p = np.array([r["probability"] for r in rows])
        m = compute_metrics(y, p)
        t, f1_t = best_threshold(y, p)
        ci = subject_bootstrap_ci(y, p, [r["subject"] for r in rows])
        per_seed.append({"seed": int(s), "pooled_weighted_f1": m["weighted_f1"], "pooled_roc_auc": m["roc_auc"],
                         "pooled_weighted_f1_ci": ci,
                         "per_class_f1": {c: d["f1"] for c, d in m["per_class"].items()},
                         "fold_mean_weighted_f1": float(np.mean([f["weighted_f1"] for f in fold_rows if f["seed"] == int(s)])),
                         "oof_best_threshold": t, "oof_best_threshold_weighted_f1": f1_t})
    subjects: dict[str, list[dict[str, Any]]] = {}
    for r in oof:
        subjects.setdefault(str(r["subject"]), []).append(r)
    table = []
    thr = 0.5  # the probabilities already include the recipe's threshold shift
    for subj, rows in subjects.items():
        y = np.array([r["label"] for r in rows])
        p = np.array([r["probability"] for r in rows])
        acc_by_seed = [float(((p[mask] >= thr).astype(int) == y[mask]).mean())
                       for s in seeds if (mask := np.array([r["seed"] == int(s) for r in rows])).any()]
        table.append({"subject": subj, "true_class": CLASS_NAMES[int(y.mean() > 0.5)],
                      "n": int(len(rows) // max(1, len(acc_by_seed))),
                      "accuracy": float(np.mean(acc_by_seed)), "accuracy_sd": float(np.std(acc_by_seed)),
                      "mean_prob_all": float(p.mean()), "predicted_blast_fraction": float((p >= thr).mean())})
    table.sort(key=lambda r: (r["accuracy"], r["subject"]))
    return {
        "scheme": (f"official-fold transfer (train on the other official folds, test on one; {folds} directions, "
                   f"pixel-identical cells dropped from the test side), seeds {', '.join(map(str, seeds))}"
                   if split == "official" else
                   f"{folds}-fold subject-grouped, class-stratified (pixel-identical cells linked), seeds {', '.join(map(str, seeds))}"),
        "split": split,
        "folds": folds,
        "seeds": [int(s) for s in seeds],
        "recipe": recipe_of(cfg),
        "synthetic": synthetic,
        "weighted_f1": _mean_sd([f["weighted_f1"] for f in fold_rows]),
        "roc_auc": _mean_sd([f["roc_auc"] for f in fold_rows]),
        "accuracy": _mean_sd([f["accuracy"] for f in fold_rows]),
        "weighted_f1_by_tta": {mode: _mean_sd([(f.get("by_tta") or {}).get(mode, {}).get("val_f1") for f in fold_rows])
                               for mode in TTA_CHOICES} if all(f.get("by_tta") for f in fold_rows) else None,
        "pooled_weighted_f1": _mean_sd([s["pooled_weighted_f1"] for s in per_seed]),
        # the interval of the first seed's pooled out-of-fold predictions (every subject once, by a model that never saw it)
        "pooled_weighted_f1_ci": per_seed[0]["pooled_weighted_f1_ci"] if per_seed else None,
        "oof_threshold": _mean_sd([s["oof_best_threshold"] for s in per_seed]),
        "per_seed": per_seed,
        "fold_runs": [{k: v for k, v in f.items() if k != "history"} for f in fold_rows],
        "per_subject": table,
        "worst_subjects": [r["subject"] for r in table[:3]],
        "_histories": [{"seed": f["seed"], "fold": f["fold"], "history": f["history"], "best_val_f1": f["best_val_f1"]}
                       for f in fold_rows],
    }


def write_outputs(out: Path, summary: dict[str, Any], oof: list[dict[str, Any]]) -> None:
    from . import plots

    histories = summary.pop("_histories", [])
    atomic_write_json(out / CV_FILE, summary)
    with (out / OOF_FILE).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["seed", "fold", "row", "path", "subject", "label", "probability"])
        w.writeheader()
        w.writerows(oof)
    with (out / "per_subject.csv").open("w", newline="") as fh:
        cols = ["subject", "true_class", "n", "accuracy", "accuracy_sd", "mean_prob_all", "predicted_blast_fraction"]
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(summary["per_subject"])
    syn = bool(summary.get("synthetic"))
    plots.plot_cv_folds([{"fold": f"s{h['seed']}/{h['fold']}", **h} for h in histories], out / "cv_folds.png", synthetic=syn)
    plots.plot_per_subject(summary["per_subject"], out / "cv_per_subject.png", synthetic=syn)
    seed0 = summary["seeds"][0]
    rows = [r for r in oof if r["seed"] == seed0]
    plots.plot_roc(np.array([r["label"] for r in rows]), np.array([r["probability"] for r in rows]), out / "cv_roc.png",
                   title=f"Out-of-fold ROC (seed {seed0})", synthetic=syn)
    build_report(out, title="leukedge cross-validation")


