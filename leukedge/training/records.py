"""What a training run writes as it goes: ``results.csv`` (one row per epoch), TensorBoard event files, and the
checkpoint weights (safetensors)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Sequence

from safetensors.torch import load_file, save_file

from .._util import atomic_write_text

#: one row per epoch, as Ultralytics and Lightning users expect (rewritten whole after every epoch)
RESULTS_CSV = "results.csv"
RESULTS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_f1", "val_acc", "val_auc", "lr", "seconds",
                   "best_so_far")
#: TensorBoard event files (``tensorboard --logdir RUN/tensorboard``), written when tensorboard is installed
TENSORBOARD_DIR = "tensorboard"


def write_results_csv(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """``results.csv``: the epoch history, one row per epoch (empty cells where there was no validation)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RESULTS_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for rec in history:
        w.writerow({k: "" if rec.get(k) is None else rec.get(k) for k in RESULTS_COLUMNS})
    atomic_write_text(path, buf.getvalue())


class EpochLogger:
    """Per-epoch scalars as TensorBoard event files in ``RUN/tensorboard/`` (``train/loss``, ``val/f1`` ...),
    when the ``tensorboard`` package is installed; otherwise nothing (``results.csv`` is always written)."""

    def __init__(self, log_dir: Path, enabled: bool = True) -> None:
        self.log_dir, self.enabled = log_dir, enabled
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None and self.enabled:
            try:
                import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.enabled = False
                return None
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def write(self, rec: dict[str, Any]) -> None:
        w = self._open()
        if w is None:
            return
        epoch = int(rec["epoch"])
        for key, tag in (("train_loss", "train/loss"), ("train_acc", "train/accuracy"), ("val_loss", "val/loss"),
                         ("val_f1", "val/weighted_f1"), ("val_acc", "val/accuracy"), ("val_auc", "val/roc_auc"),
                         ("lr", "lr"), ("seconds", "epoch_seconds")):
            if rec.get(key) is not None:
                w.add_scalar(tag, float(rec[key]), epoch)
        w.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def state_dict_cpu(model: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def save_weights(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def load_weights(path: Path) -> dict[str, Any]:
    return load_file(str(path))
