"""The one-number baseline that every recipe must beat: logistic regression on the cell's area.

C-NMC images are taken at one magnification, and leukemic blasts are larger than normal cells, so the
foreground area alone (pixels brighter than the black threshold, counted at the source's native
scale) separates the classes well: trained on official fold 0 and tested on fold 1 it scores
weighted F1 0.83, ROC-AUC 0.87. ``leukedge cv`` scores it on exactly the training and test cells of
every fold and puts it beside the model as a baseline row.

The area is counted on the source image (decoded by the Rust core), or, when a source file is gone,
on the cached image if its crop keeps the scale (``crop="window"`` or ``"none"``); a bbox-cropped
cache has lost the size, so then there is no baseline.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ._util import load_native
from .evaluate import compute_metrics

NAME = "cell-area logistic regression"


def cell_areas(cache: Any, rows: Sequence[int], log: Callable[[str], None] = print) -> np.ndarray | None:
    """Foreground area (pixels with max(R,G,B) > the cache's black threshold) of each cache row, at
    the source's native scale; ``None`` (with a logged reason) where it cannot be known."""
    thr = int(cache.config.stain.black_threshold)
    native = load_native()
    areas = np.full(len(cache.manifest), np.nan)
    missing = []
    for i in rows:
        path = cache.manifest[i].get("path") or ""
        try:
            img = native.decode(path, cache.config.max_pixels)
        except (OSError, ValueError):
            missing.append(i)
            continue
        areas[i] = float((img.max(axis=2) > thr).sum())
    if not missing:
        return areas
    if cache.config.crop not in ("window", "none"):
        log(f"baseline: {len(missing)} source file(s) unreadable (e.g. {cache.manifest[missing[0]].get('path')}) and the "
            f"cache's crop {cache.config.crop!r} erases the cell size: no {NAME} baseline")
        return None
    # scale-keeping crop: count on the cached image, scaled to source pixels
    scale = (cache.config.crop_window / cache.config.size) ** 2 if cache.config.crop == "window" else 1.0
    for i in rows:
        if np.isnan(areas[i]):
            areas[i] = float((np.asarray(cache.images[i]).max(axis=2) > thr).sum()) * scale
    return areas


def fit_predict(area_train: np.ndarray, y_train: np.ndarray, area_test: np.ndarray) -> np.ndarray:
    """P(all) of the test cells from a logistic regression on the standardised area of the training cells."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = float(area_train.mean()), float(area_train.std()) or 1.0
    lr = LogisticRegression().fit(((area_train - mu) / sd)[:, None], y_train)
    return lr.predict_proba(((area_test - mu) / sd)[:, None])[:, 1]


def area_baseline_fold(areas: np.ndarray | None, train_rows: Sequence[int], test_rows: Sequence[int],
                       labels: np.ndarray, fold: int, test_fold: int | None) -> dict[str, Any] | None:
    """The baseline's weighted F1 and ROC-AUC on one fold's test cells (``None`` without areas)."""
    if areas is None:
        return None
    tr, te = np.asarray(train_rows, dtype=np.int64), np.asarray(test_rows, dtype=np.int64)
    if len(np.unique(labels[tr])) < 2:
        return None
    p = fit_predict(areas[tr], labels[tr], areas[te])
    m = compute_metrics(labels[te], p)
    return {"fold": fold, "test_fold": test_fold, "n_test": int(len(te)), "weighted_f1": m["weighted_f1"],
            "roc_auc": m["roc_auc"]}


def summarize_baseline(rows: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """cv.json's ``baseline``: per fold and mean ± sd."""
    got = [r for r in rows if r is not None]
    if not got:
        return None
    f1 = [r["weighted_f1"] for r in got]
    auc = [r["roc_auc"] for r in got if r["roc_auc"] is not None]
    return {"name": NAME, "folds": got,
            "weighted_f1": {"mean": float(np.mean(f1)), "sd": float(np.std(f1, ddof=1)) if len(f1) > 1 else 0.0},
            "roc_auc": {"mean": float(np.mean(auc)) if auc else None,
                        "sd": float(np.std(auc, ddof=1)) if len(auc) > 1 else 0.0}}


__all__ = ["NAME", "area_baseline_fold", "cell_areas", "fit_predict", "summarize_baseline"]
