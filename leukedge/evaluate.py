"""Evaluate a model bundle on a preprocessed dataset cache.

Metrics follow the C-NMC challenge (weighted F1 over the two classes) plus accuracy, per-class
precision / recall / F1, ROC-AUC, the confusion matrix and a per-subject breakdown.  The bundle's
preprocessing hash must equal the cache's: a model is never scored on pixels it was not trained for.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from ._util import CLASS_NAMES, Reporter, callable_module, subject_sort_key
from ._util import as_int as _as_int
from .data.splits import few_subjects_warning as few_subjects_warning  # re-exported: it used to live here
from .data.splits import subject_classes

SYNTHETIC_WARNING = "SYNTHETIC data: these numbers describe generated cells, not a medical result"


# ----------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------

#: labels / probabilities / subjects as the metric functions take them: a sequence or a NumPy array
Ints = Union[Sequence[int], np.ndarray]
Floats = Union[Sequence[float], np.ndarray]
Labels = Union[Sequence[Any], np.ndarray]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating,)):
        return _clean(float(v))
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


def compute_metrics(y_true: Ints, prob: Floats, subjects: Labels | None = None,
                    threshold: float = 0.5) -> dict[str, Any]:
    """Classification metrics for labels ``y_true`` (0 hem / 1 all) and ``prob`` = P(all)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} differ in shape")
    if len(y) == 0:
        raise ValueError("no labelled images to evaluate")
    pred = (p >= threshold).astype(np.int64)
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    both = len(np.unique(y)) == 2
    out: dict[str, Any] = {
        "n": int(len(y)),
        "threshold": threshold,
        "accuracy": float(accuracy_score(y, pred)),
        "weighted_f1": float(f1_score(y, pred, labels=[0, 1], average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y, pred, labels=[0, 1], average="macro", zero_division=0)),
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "per_class": {
            CLASS_NAMES[c]: {"precision": float(prec[c]), "recall": float(rec[c]), "f1": float(f1[c]), "support": int(sup[c])}
            for c in (0, 1)
        },
        "confusion_matrix": {"labels": list(CLASS_NAMES), "rows": "true", "columns": "predicted",
                             "matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist()},
        "class_counts": {"hem": int((y == 0).sum()), "all": int((y == 1).sum())},
    }
    if subjects is not None:
        out["per_subject"] = per_subject_breakdown(subjects, y, p, threshold)
    return out


def per_subject_breakdown(subjects: Labels, y: Ints, p: Floats,
                          threshold: float = 0.5) -> list[dict[str, Any]]:
    """Per subject: n, accuracy, mean P(all), predicted blast fraction, true class."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(subjects):
        groups["?" if s in (None, "") else str(s)].append(i)
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    rows = []
    for s, idx in groups.items():
        yi, pi = y[idx], p[idx]
        labelled = yi >= 0
        classes = sorted({CLASS_NAMES[int(v)] for v in yi[labelled]})
        rows.append({
            "subject": s,
            "n": len(idx),
            "true_class": "/".join(classes) if classes else "unknown",
            "accuracy": float(((pi[labelled] >= threshold).astype(int) == yi[labelled]).mean()) if labelled.any() else None,
            "mean_prob_all": float(pi.mean()),
            "predicted_blast_fraction": float((pi >= threshold).mean()),
        })

    return sorted(rows, key=lambda r: subject_sort_key(r["subject"]))


#: bootstrap replicates of :func:`subject_bootstrap_ci` (and the confidence level)
BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_LEVEL = 0.95


def subject_bootstrap_ci(y_true: Ints, prob: Floats, subjects: Labels, *,
                         threshold: float = 0.5, n_boot: int = BOOTSTRAP_REPLICATES, level: float = BOOTSTRAP_LEVEL,
                         seed: int = 0) -> dict[str, Any] | None:
    """Weighted F1 with a confidence interval from a subject-level bootstrap.

    Cells of one subject are not independent (same patient, stain, session), so whole subjects are
    resampled with replacement, separately within the normal and the leukemic subjects (every replicate
    keeps both classes and the same number of subjects of each); a replicate's weighted F1 is scikit-learn's
    over all cells of the drawn subjects (a subject drawn k times counts k times: ``sample_weight``). Returns
    the point estimate, the percentile interval and what it rests on, or None with fewer than 2 subjects
    of each class (then no interval says anything)."""
    from sklearn.metrics import f1_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    subj = np.array(["?" if s in (None, "") else str(s) for s in subjects], dtype=object)
    keep = y >= 0
    y, p, subj = y[keep], p[keep], subj[keep]
    classes = subject_classes(y, subj)
    groups = [sorted(s for s, c in classes.items() if c == k) for k in (0, 1)]
    if min(len(g) for g in groups) < 2:
        return None
    pred = (p >= threshold).astype(np.int64)
    index = {s: i for i, s in enumerate(sorted(classes))}
    cell_subject = np.array([index[s] for s in subj], dtype=np.int64)
    rng = np.random.default_rng(seed)
    scores = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        draws = np.zeros(len(index), dtype=np.float64)
        for g in groups:
            picked = rng.integers(0, len(g), size=len(g))
            np.add.at(draws, [index[g[i]] for i in picked], 1.0)
        scores[b] = f1_score(y, pred, labels=[0, 1], average="weighted", sample_weight=draws[cell_subject],
                             zero_division=0)
    alpha = (1.0 - level) / 2
    return {"weighted_f1": float(f1_score(y, pred, labels=[0, 1], average="weighted", zero_division=0)),
            "low": float(np.quantile(scores, alpha)), "high": float(np.quantile(scores, 1 - alpha)), "level": level,
            "n_boot": n_boot, "n_subjects": {"hem": len(groups[0]), "all": len(groups[1])}, "n_cells": int(len(y)),
            "method": "subject-level bootstrap (subjects resampled within each class), percentile interval"}


def format_ci(ci: dict[str, Any] | None) -> str:
    """``[0.812, 0.901] (95 % subject bootstrap, 9 + 19 subjects)``, or a note why there is none."""
    if not ci:
        return "no interval (fewer than 2 subjects of a class)"
    n = ci["n_subjects"]
    return (f"[{ci['low']:.3f}, {ci['high']:.3f}] ({100 * ci['level']:.0f} % subject bootstrap, "
            f"{n['hem']} hem + {n['all']} all subjects)")


# ----------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------
def _load_cache(cache: Any) -> tuple[Any, Path | None]:
    if isinstance(cache, (str, Path)):
        from .preprocess import load_cache

        return load_cache(cache), Path(cache)
    return cache, getattr(cache, "path", None)


def _cache_synthetic(cache: Any, cache_path: Path | None) -> bool:
    meta = getattr(cache, "meta", None) or {}
    if meta.get("synthetic"):
        return True
    if cache_path is not None:
        from .data import is_synthetic

        return bool(is_synthetic(cache_path))
    return False


def select_rows(manifest: Sequence[dict[str, Any]], split: str | None = None,
                indices: Sequence[int] | None = None) -> list[int]:
    """Rows of a cache manifest that decoded (status ok), optionally restricted to a split or indices."""
    rows = range(len(manifest)) if indices is None else [int(i) for i in indices]
    out = []
    for i in rows:
        r = manifest[i]
        if str(r.get("status", "ok")) != "ok":
            continue
        if split is not None and str(r.get("split") or "") != split:
            continue
        out.append(i)
    return out


def predict_cache(bundle: Any, images: np.ndarray, rows: Ints, *, batch_size: int = 64,
                  progress: bool = False, device: str = "cpu", reporter: Reporter | None = None) -> np.ndarray:
    """P(all) for the cache rows ``rows`` (uint8 NHWC images, normalised like the Rust core)."""
    import torch

    bundle.to(device)
    probs = np.zeros(len(rows), dtype=np.float64)
    rows = np.asarray(rows, dtype=np.int64)

    def run(update: Any = None) -> None:
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            batch = np.asarray(images[idx])
            probs[start : start + len(idx)] = bundle.predict_proba(batch, batch_size=batch_size)
            if update:
                update(len(idx))

    with torch.inference_mode():
        if progress and len(rows) and reporter is not None:
            with reporter.progress("evaluate", total=len(rows), transient=True) as task:
                run(task.advance)
        else:
            run()
    return probs


def evaluate(cache: Any, bundle: Any = None, split: str | None = None, *, indices: Sequence[int] | None = None,
             batch_size: int = 64, device: str = "cpu", progress: bool = False,
             reporter: Reporter | None = None) -> dict[str, Any]:
    """Evaluate ``bundle`` (path, :class:`~leukedge.models.Bundle`, or None = shipped default) on ``cache``
    (path or loaded cache).  ``split`` restricts to manifest rows with that split ("train", "val", ...).

    Raises :class:`~leukedge.config.ConfigMismatchError` when the preprocessing differs.
    Returns a JSON-serialisable dict; ``predictions`` lists one dict per evaluated image.
    """
    from .models import Bundle, default_bundle_path, load_bundle

    cache_obj, cache_path = _load_cache(cache)
    if not isinstance(bundle, Bundle):
        bundle_path = Path(bundle) if bundle is not None else default_bundle_path()
        bundle = load_bundle(bundle_path)
    bundle.config.require_same_pixels(cache_obj.config, what="model", against=f"cache {cache_path or ''}".strip())
    manifest = list(cache_obj.manifest)
    rows = select_rows(manifest, split, indices)
    if not rows:
        where = f" with split {split!r}" if split else ""
        raise ValueError(f"cache {cache_path or ''}: no decodable images{where} to evaluate")
    probs = predict_cache(bundle, cache_obj.images, rows, batch_size=batch_size, progress=progress, device=device,
                          reporter=reporter)
    labels = np.array([_as_int(manifest[i].get("label")) for i in rows])
    subjects = [manifest[i].get("subject") or None for i in rows]
    labelled = labels >= 0
    synthetic_data = _cache_synthetic(cache_obj, cache_path)
    result: dict[str, Any] = {
        "synthetic": bool(synthetic_data or bundle.synthetic),
        "synthetic_data": bool(synthetic_data),
        "synthetic_model": bool(bundle.synthetic),
        "cache": str(cache_path) if cache_path else None,
        "model": str(bundle.path) if bundle.path else None,
        "arch": bundle.arch,
        "preprocess_hash": bundle.preprocess_hash,
        "split": split,
        "n_images": len(rows),
        "n_labelled": int(labelled.sum()),
        "n_unlabelled": int((~labelled).sum()),
        "n_failed_in_cache": sum(1 for r in manifest if str(r.get("status", "ok")) != "ok"),
    }
    if result["synthetic"]:
        result["warning"] = SYNTHETIC_WARNING
    if labelled.any():
        m = compute_metrics(labels[labelled], probs[labelled])
        result.update(m)
        lab_subjects = [s for s, ok in zip(subjects, labelled) if ok]
        result["weighted_f1_ci"] = subject_bootstrap_ci(labels[labelled], probs[labelled], lab_subjects)
        result["subject_warning"] = few_subjects_warning(labels[labelled], lab_subjects, split or "evaluated")
    else:
        result["warning_unlabelled"] = "no labelled images: only predictions are reported"
    # Per-subject breakdown over every evaluated image (labelled or not).
    result["per_subject"] = per_subject_breakdown(subjects, labels, probs)
    result["predictions"] = [
        {"index": int(i), "path": manifest[i].get("path"), "subject": subjects[k], "label": int(labels[k]),
         "prob_all": float(probs[k]), "predicted": CLASS_NAMES[int(probs[k] >= 0.5)]}
        for k, i in enumerate(rows)
    ]
    return {k: _clean(v) for k, v in result.items()}


def find_history(bundle_path: Path | None) -> list[dict[str, Any]] | None:
    """The training history saved with a bundle (``history.json`` in the bundle or its run directory)."""
    if bundle_path is None:
        return None
    for cand in (bundle_path / "history.json", bundle_path.parent / "history.json"):
        if cand.is_file():
            try:
                data = json.loads(cand.read_text())
            except (OSError, ValueError):
                continue
            hist = data.get("history") if isinstance(data, dict) else data
            if isinstance(hist, list) and hist:
                return hist
    return None


def mistake_thumbnails(preds: Sequence[dict[str, Any]], n: int = 12, size: int = 96) -> list[tuple[np.ndarray, str]]:
    """Thumbnails of the ``n`` most confident mistakes (wrong, with P(all) farthest from 0.5) whose image files
    still decode, with a caption each (true class, P(all), subject)."""
    from ._util import load_native

    native = load_native(required=False)
    if native is None:
        return []
    wrong = [p for p in preds if p.get("label", -1) >= 0 and int(p["prob_all"] >= 0.5) != int(p["label"])]
    wrong.sort(key=lambda p: -abs(float(p["prob_all"]) - 0.5))
    thumbs: list[tuple[np.ndarray, str]] = []
    for p in wrong:
        if len(thumbs) >= n:
            break
        try:
            img = native.decode(str(p["path"]))
            h, w = img.shape[:2]
            scale = size / max(h, w)
            img = native.resize(img, max(1, round(w * scale)), max(1, round(h * scale)))
        except (OSError, ValueError, RuntimeError, TypeError):  # moved or unreadable since: no thumbnail
            continue
        thumbs.append((img, f"true {CLASS_NAMES[int(p['label'])]}, P(all) {float(p['prob_all']):.2f}\n"
                            f"subject {p.get('subject') or '?'}"))
    return thumbs


def write_report(result: dict[str, Any], out_dir: str | Path, bundle_path: Path | None = None) -> dict[str, str]:
    """Write metrics.json, predictions.csv and PNG plots into ``out_dir``; returns {name: path}."""
    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    preds = result.get("predictions", [])
    summary = {k: v for k, v in result.items() if k != "predictions"}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    files["metrics"] = str(out / "metrics.json")
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "path", "subject", "label", "prob_all", "predicted"])
        w.writeheader()
        w.writerows(preds)
    files["predictions"] = str(out / "predictions.csv")
    syn = bool(result.get("synthetic"))
    lab = [p for p in preds if p["label"] >= 0]
    if lab:
        roc = plots.plot_roc(np.array([p["label"] for p in lab]), np.array([p["prob_all"] for p in lab]),
                             out / "roc.png", synthetic=syn)
        if roc:
            files["roc"] = str(roc)
    if result.get("confusion_matrix"):
        files["confusion_matrix"] = str(plots.plot_confusion(result["confusion_matrix"]["matrix"], CLASS_NAMES,
                                                             out / "confusion_matrix.png", synthetic=syn))
    if lab:
        yl, pl = np.array([p["label"] for p in lab]), np.array([p["prob_all"] for p in lab])
        for name, made in (("pr", plots.plot_pr(yl, pl, out / "pr.png", synthetic=syn)),
                           ("calibration", plots.plot_calibration(yl, pl, out / "calibration.png", synthetic=syn)),
                           ("threshold_sweep", plots.plot_threshold_sweep(yl, pl, out / "threshold_sweep.png",
                                                                          synthetic=syn))):
            if made:
                files[name] = str(made)
        gallery = plots.plot_mistakes(mistake_thumbnails(lab), out / "mistakes.png", synthetic=syn)
        if gallery:
            files["mistakes"] = str(gallery)
    ps = plots.plot_per_subject(result.get("per_subject", []), out / "per_subject.png", synthetic=syn)
    if ps:
        files["per_subject"] = str(ps)
    hist = find_history(bundle_path)
    if hist:
        files["training_curves"] = str(plots.plot_training_curves(hist, out / "training_curves.png",
                                                                  title="Training curves of the evaluated model",
                                                                  synthetic=syn))
    return files




callable_module(__name__, evaluate)
