"""Matplotlib (Agg, headless) figures for training and evaluation reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SYNTHETIC_NOTE = "SYNTHETIC DATA - not a medical result"


def _title(text: str, synthetic: bool) -> str:
    return f"{text}\n[{SYNTHETIC_NOTE}]" if synthetic else text


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "Training",
                         synthetic: bool = False, best_epoch: int | None = None) -> Path:
    """Loss (train/val), validation weighted F1 / accuracy / ROC-AUC and learning rate per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.plot(epochs, [h.get("train_loss") for h in history], "o-", label="train loss")
    if any(h.get("val_loss") is not None for h in history):
        ax.plot(epochs, [h.get("val_loss") for h in history], "s-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for key, label in (("val_f1", "val weighted F1"), ("val_acc", "val accuracy"), ("val_auc", "val ROC-AUC")):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            ax.plot(epochs, [np.nan if v is None else v for v in vals], "o-", label=label)
    has_val = any(h.get("val_f1") is not None for h in history)
    if best_epoch is not None and has_val:
        ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch {best_epoch}")
    if not has_val:
        ax.plot(epochs, [h.get("train_acc") for h in history], "o-", label="train accuracy")
        ax.text(0.5, 0.2, "no validation set\n(fixed epoch budget)", ha="center", transform=ax.transAxes, color="grey")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(epochs, [h.get("lr") for h in history], "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate (end of epoch)")
    ax.grid(alpha=0.3)
    fig.suptitle(_title(title, synthetic))
    return _save(fig, path)


def plot_roc(y_true: np.ndarray, prob: np.ndarray, path: str | Path, *, title: str = "ROC (class 'all')",
             synthetic: bool = False) -> Path | None:
    """ROC curve of P(all); returns None when only one class is present."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y_true, prob)
    auc = roc_auc_score(y_true, prob)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("false positive rate (hem called all)")
    ax.set_ylabel("true positive rate (all found)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title(_title(title, synthetic), fontsize=10)
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, *,
                   title: str = "Confusion matrix", synthetic: bool = False) -> Path:
    cm = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n({frac[i, j]:.0%})", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(_title(title, synthetic), fontsize=10)
    return _save(fig, path)


def plot_per_subject(per_subject: Sequence[dict[str, Any]], path: str | Path, *, synthetic: bool = False) -> Path | None:
    """Predicted blast fraction per subject, coloured by the subject's true class."""
    rows = [r for r in per_subject if r.get("n", 0) > 0]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(rows) + 2), 3.8))
    colours = ["tab:red" if r.get("true_class") == "all" else "tab:blue" if r.get("true_class") == "hem" else "grey"
               for r in rows]
    ax.bar(range(len(rows)), [r["predicted_blast_fraction"] for r in rows], color=colours)
    ax.set_xticks(range(len(rows)), [str(r["subject"]) for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("predicted blast (all) fraction")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_title(_title("Per subject (red: all subject, blue: hem subject)", synthetic), fontsize=10)
    return _save(fig, path)


def plot_cv_folds(folds: Sequence[dict[str, Any]], path: str | Path, *, synthetic: bool = False) -> Path:
    """Validation weighted F1 per epoch for each cross-validation fold."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for f in folds:
        hist = f.get("history", [])
        ax.plot([h["epoch"] for h in hist], [h.get("val_f1") for h in hist], "o-",
                label=f"fold {f['fold']} (best {f.get('best_val_f1', float('nan')):.3f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation weighted F1")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(_title("Subject-grouped cross-validation", synthetic), fontsize=10)
    return _save(fig, path)


def plot_pr(y_true: np.ndarray, prob: np.ndarray, path: str | Path, *, synthetic: bool = False) -> Path | None:
    """Precision-recall curve of each class (P(all) for 'all', 1 - P(all) for 'hem'); None with one class."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for cls, yy, score, colour in (("all", y == 1, p, "tab:red"), ("hem", y == 0, 1 - p, "tab:blue")):
        prec, rec, _ = precision_recall_curve(yy, score)
        ax.plot(rec, prec, lw=2, color=colour, label=f"{cls}: AP {average_precision_score(yy, score):.3f} "
                                                     f"(base rate {yy.mean():.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(_title("Precision-recall", synthetic), fontsize=10)
    return _save(fig, path)


def plot_calibration(y_true: np.ndarray, prob: np.ndarray, path: str | Path, *, bins: int = 10,
                     synthetic: bool = False) -> Path | None:
    """Reliability diagram: the fraction of 'all' cells per bin of P(all) against the bin's mean P(all),
    with the cells per bin below; None with one class."""
    from sklearn.calibration import calibration_curve

    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return None
    frac, mean_p = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(4.8, 5.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
    ax.plot(mean_p, frac, "o-", lw=2, label="this model")
    ax.set_ylabel("fraction of cells that are 'all'")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(_title("Calibration of P(all)", synthetic), fontsize=10)
    ax2.hist(p, bins=bins, range=(0, 1), color="tab:grey")
    ax2.set_xlabel("predicted P(all)")
    ax2.set_ylabel("cells")
    return _save(fig, path)


def plot_threshold_sweep(y_true: np.ndarray, prob: np.ndarray, path: str | Path, *, threshold: float = 0.5,
                         synthetic: bool = False) -> Path | None:
    """Weighted F1, recall of each class and accuracy as the decision threshold on P(all) moves from 0 to 1
    (the model's own threshold is marked); None with one class."""
    from sklearn.metrics import f1_score, recall_score

    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return None
    ts = np.linspace(0.02, 0.98, 49)
    curves: dict[str, list[float]] = {"weighted F1": [], "recall all": [], "recall hem": []}
    for t in ts:
        pred = (p >= t).astype(int)
        curves["weighted F1"].append(float(f1_score(y, pred, average="weighted", zero_division=0)))
        curves["recall all"].append(float(recall_score(y, pred, pos_label=1, zero_division=0)))
        curves["recall hem"].append(float(recall_score(y, pred, pos_label=0, zero_division=0)))
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for (name, vals), style in zip(curves.items(), ("-", "--", ":")):
        ax.plot(ts, vals, style, lw=2, label=name)
    best = int(np.argmax(curves["weighted F1"]))
    ax.axvline(threshold, color="grey", lw=1, label=f"model threshold ({threshold:g})")
    ax.plot(ts[best], curves["weighted F1"][best], "k*", ms=10, label=f"best here {ts[best]:.2f}: {curves['weighted F1'][best]:.3f}")
    ax.set_xlabel("decision threshold on P(all)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower center", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(_title("Threshold sweep (picked on these cells: optimistic)", synthetic), fontsize=10)
    return _save(fig, path)


def plot_mistakes(thumbs: Sequence[tuple[np.ndarray, str]], path: str | Path, *, synthetic: bool = False) -> Path | None:
    """A gallery of cell thumbnails (RGB uint8 arrays) with a caption each: the most confident mistakes."""
    if not thumbs:
        return None
    cols = min(6, len(thumbs))
    rows = (len(thumbs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, caption) in zip(axes.flat, thumbs):
        ax.imshow(img)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(_title("Most confident mistakes", synthetic), fontsize=10)
    return _save(fig, path)
