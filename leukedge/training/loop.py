"""The building blocks of a training run that hold no run state: learning-rate schedule, device and seeding,
batches read from the cache, predictions and validation metrics."""

from __future__ import annotations

import math
import os
import random
from typing import Any, Iterator

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch.utils.data import DataLoader

from ..config import PreprocessConfig
from .augment import normalize01, to_float01


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 2 % at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def resolve_device(name: str) -> str:
    """``auto`` as cuda when a CUDA device is available, else cpu; ``cuda`` only when one is."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} must be auto, cpu or cuda")
    return name


def seed_everything(seed: int, device: str) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


class BatchSet:
    """Indexable batches of (uint8 NHWC images, labels) read from the (memory-mapped) cache."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batches: list[np.ndarray]) -> None:
        self.images, self.labels, self.batches = images, labels, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        idx = np.sort(self.batches[i])
        return torch.from_numpy(np.ascontiguousarray(self.images[idx])), torch.from_numpy(self.labels[idx])


def iterate_batches(images: np.ndarray, labels: np.ndarray, batches: list[np.ndarray], workers: int) -> Iterator[Any]:
    """The batches of (uint8 NHWC images, labels), read in this process or by ``workers`` DataLoader workers."""
    if workers <= 0:
        ds = BatchSet(images, labels, batches)
        return (ds[i] for i in range(len(ds)))
    # An own generator keeps the DataLoader from drawing on the global RNG (dropout), so results
    # do not depend on the number of workers.
    return iter(DataLoader(BatchSet(images, labels, batches),  # type: ignore[arg-type]  # a map-style set without the Dataset base batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=False, generator=torch.Generator().manual_seed(0)))


def predict_rows(model: Any, images: np.ndarray, rows: np.ndarray, cfg: PreprocessConfig, device: str,
                 batch_size: int = 128, amp: bool = False, channels_last: bool = False) -> np.ndarray:
    """Logits (float32 numpy, N x 2) of ``model`` for the cache rows, in the order of ``rows``."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[rows[i : i + batch_size]]))
            x = normalize01(to_float01(x.to(device)), cfg)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", enabled=(amp and device == "cuda")):
                out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


def val_metrics(logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Validation loss, weighted F1, accuracy and ROC-AUC (None with one class) of ``logits`` at P(all) >= 0.5."""
    lt = torch.from_numpy(logits)
    loss = float(torch.nn.functional.cross_entropy(lt, torch.from_numpy(y)).item())
    prob = torch.softmax(lt, 1)[:, 1].numpy()
    pred = (prob >= 0.5).astype(np.int64)
    return {
        "val_loss": loss,
        "val_f1": float(f1_score(y, pred, labels=[0, 1], average="weighted", zero_division=0)),
        "val_acc": float(accuracy_score(y, pred)),
        "val_auc": float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else None,
    }
