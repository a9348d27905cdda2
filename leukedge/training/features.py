"""The training-time feature cache: with the stem and early blocks of an EfficientNet-Lite0 frozen, their outputs
for the 8 dihedral views of every cell are computed once (``CACHE/features``) and only the top is trained; the
test-time augmentation maths on those per-view outputs gives what the shipped model computes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..config import PreprocessConfig
from ..models import FrozenPrefix, dihedral_views, logit_bias, top_forward
from .augment import add_cell_noise, normalize01, to_float01
from .export import onnx_runner

#: Indices into the 8 dihedral views (:func:`leukedge.models.dihedral_views` with "d4") used by each TTA mode.
TTA_VIEW_INDEX = {"none": (0,), "flip": (0, 4), "d4": tuple(range(8))}


def _prefix_digest(model: Any, n_blocks: int) -> str:
    """sha256 of the weights and buffers of the stem and the first ``n_blocks`` blocks only."""
    h = hashlib.sha256()
    keep = ("_conv_stem.", "_bn0.", *(f"_blocks.{i}." for i in range(n_blocks)))
    for k, v in model.state_dict().items():
        if not k.startswith(keep) or k.endswith("num_batches_tracked"):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def prefix_features(model: Any, images: np.ndarray, cfg: PreprocessConfig, n_blocks: int, *,
                    store: Path | None = None, batch_size: int = 64, device: str = "cpu",
                    progress: Callable[[int, int], None] | None = None, noise: float = 0.0,
                    seed: int = 0) -> np.ndarray:
    """Outputs of the frozen stem + first ``n_blocks`` blocks of an EfficientNet-Lite0 for the 8
    dihedral views (order of :func:`leukedge.models.dihedral_views`) of every cache image, as float16
    ``(8, N, C, H, W)``.

    With ``store`` (a folder) the array is kept there as ``.npy`` under a name made of the frozen
    weights' sha256, the preprocessing hash and the image count, and reused by later runs (folds of a
    cross-validation, ``--resume``); it is written to a temporary file and renamed, so an interrupted
    run never leaves a partial one behind.

    ``noise`` (grey levels): every view of every cell gets Gaussian noise on its cell pixels first, sigma ~
    U(0, noise), drawn from ``seed`` (the training views of ``TrainConfig.noise``; the name records both).
    """
    prefix = FrozenPrefix(model, n_blocks).eval().to(device)
    key = f"prefix_k{n_blocks}_{_prefix_digest(model, n_blocks)[:16]}_{cfg.pixel_hash()[:12]}_n{len(images)}"
    if noise > 0:
        key += f"_noise{noise:g}_s{seed}"
    path = store / f"{key}.npy" if store is not None else None
    if path is not None and path.is_file():
        try:
            feats = np.load(path, mmap_mode="r")
            if feats.shape[:2] == (8, len(images)):
                return np.ascontiguousarray(feats)
        except (OSError, ValueError):
            pass
    with torch.inference_mode():
        probe = prefix(torch.zeros(1, 3, cfg.size, cfg.size, device=device))
    out = np.empty((8, len(images), *probe.shape[1:]), dtype=np.float16)
    run = onnx_runner(prefix, cfg.size) if device == "cpu" else None
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
            xs = torch.cat(dihedral_views(to_float01(x), "d4"), 0)
            if noise > 0:
                g = torch.Generator().manual_seed(seed * 1_000_003 + start)
                xs = add_cell_noise(xs, g, noise / 255.0, cfg.stain.black_threshold).clamp_(0.0, 1.0)
            xs = normalize01(xs, cfg)
            if run is not None:
                h = run(xs.numpy())
            else:
                h = prefix(xs.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
            out[:, start : start + len(x)] = h.reshape(8, len(x), *h.shape[1:])
            if progress is not None:
                progress(min(start + batch_size, len(images)), len(images))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # the store
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")  # [ddp] unique: ranks may write at once
            np.save(tmp, out)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache folder: the features are simply not kept
    return out


def feature_batches(feats: np.ndarray, labels: np.ndarray, batches: list[np.ndarray], g: Any,
                     n_views: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (cached frozen-block outputs in a random one of ``n_views`` views, labels)."""
    for b in batches:
        idx = np.sort(b)
        var = torch.randint(0, n_views, (len(idx),), generator=g).numpy()
        yield torch.from_numpy(feats[var, idx].astype(np.float32)), torch.from_numpy(labels[idx])


def feature_view_probs(model: Any, feats: np.ndarray, rows: np.ndarray, n_blocks: int,
                       views: Sequence[int] = tuple(range(8)), batch_size: int = 256) -> dict[int, np.ndarray]:
    """Class probabilities of the trainable top on the cached features of each dihedral view in ``views``."""
    model.eval()
    out = {}
    with torch.inference_mode():
        for v in views:
            prob = np.zeros((len(rows), 2), np.float64)
            for i in range(0, len(rows), batch_size):
                x = torch.from_numpy(feats[v, rows[i : i + batch_size]].astype(np.float32)).contiguous(
                    memory_format=torch.channels_last)
                prob[i : i + len(x)] = torch.softmax(top_forward(model, x, n_blocks).float(), 1).numpy()
            out[v] = prob
    return out


def tta_logits(view_probs: dict[int, np.ndarray], tta: str, threshold: float) -> np.ndarray:
    """The test-time computation of :class:`leukedge.models.TestTimeModel` on per-view probabilities:
    log of the mean over the TTA views, ``all`` logit shifted for the threshold."""
    prob = np.mean([view_probs[v] for v in TTA_VIEW_INDEX[tta]], axis=0)
    logits = np.log(np.clip(prob, 1e-6, None))
    logits[:, 1] += logit_bias(threshold)
    return logits.astype(np.float32)


def predict_features(model: Any, feats: np.ndarray, rows: np.ndarray, n_blocks: int, tta: str = "none",
                     threshold: float = 0.5, batch_size: int = 256) -> np.ndarray:
    """Logits of the trainable top on cached features, with the test-time computation of
    :class:`leukedge.models.TestTimeModel` (mean probability over the TTA views, threshold shift)."""
    return tta_logits(feature_view_probs(model, feats, rows, n_blocks, TTA_VIEW_INDEX[tta], batch_size), tta, threshold)


def check_assembled(model: Any, feats: np.ndarray, images: np.ndarray, cfg: PreprocessConfig, n_blocks: int) -> None:
    """The shipped full model must reproduce the cached-feature path it was trained on."""
    rows = np.arange(min(8, len(images)))
    with torch.inference_mode():
        x = normalize01(to_float01(torch.from_numpy(np.ascontiguousarray(images[rows]))), cfg)
        full = torch.softmax(model(x), 1)[:, 1]
        part = torch.softmax(top_forward(model, torch.from_numpy(feats[0, rows].astype(np.float32)), n_blocks), 1)[:, 1]
    diff = float((full - part).abs().max()) if len(rows) else 0.0
    if diff > 0.02:
        raise RuntimeError(f"the assembled model disagrees with the cached-feature path it was trained on (max |dP| {diff:.3f})")
