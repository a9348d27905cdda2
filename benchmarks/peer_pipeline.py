"""The typical user pipeline that ``leukedge infer`` is compared with (``bench_infer.py``, peer row).

Pillow decode -> NumPy crop to the foreground bounding box (+ margin) and black padding to a square, or
the fixed native-scale window around the cell (``crop = "window"``) ->
Pillow bilinear resize -> NumPy ``(u8/255 - mean) / std``, NCHW -> the same ONNX Runtime session,
``batch`` images per call, one after another (no pipelining, no threads: what a user writes).

It implements the settings of the shipped models (``stain.method = "none"``, ``crop = "bbox"`` or ``"window"``,
``square = "pad"``, ``filter = "bilinear"``); other settings are refused rather than approximated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def check_supported(cfg: Any) -> None:
    if cfg.stain.method != "none" or cfg.crop not in ("bbox", "window") or cfg.square != "pad" or cfg.filter != "bilinear":
        raise ValueError("the peer pipeline implements stain=none, crop=bbox|window, square=pad, filter=bilinear only "
                         f"(got stain={cfg.stain.method}, crop={cfg.crop}, square={cfg.square}, filter={cfg.filter})")


def preprocess_one(path: str, cfg: Any) -> np.ndarray:
    """One image as a float32 ``(3, S, S)`` array, the way a user writes it with Pillow + NumPy."""
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB"))
    h, w = a.shape[:2]
    fg = a.max(axis=2) > cfg.stain.black_threshold
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if cfg.crop == "window":  # a fixed window of source pixels centred on the cell, kept inside the frame
        side = cfg.crop_window
        cy, cx = ((rows[0] + rows[-1] + 1) // 2, (cols[0] + cols[-1] + 1) // 2) if rows.size else (h // 2, w // 2)
        y0 = min(max(cy - side // 2, 0), max(h - side, 0)) if h >= side else -((side - h) // 2)
        x0 = min(max(cx - side // 2, 0), max(w - side, 0)) if w >= side else -((side - w) // 2)
        win = np.zeros((side, side, 3), np.uint8)
        sy, sx = max(y0, 0), max(x0, 0)
        part = a[sy:y0 + side, sx:x0 + side]
        win[sy - y0:sy - y0 + part.shape[0], sx - x0:sx - x0 + part.shape[1]] = part
        a = win
    elif rows.size:
        m = cfg.crop_margin
        y0, y1 = max(rows[0] - m, 0), min(rows[-1] + 1 + m, h)
        x0, x1 = max(cols[0] - m, 0), min(cols[-1] + 1 + m, w)
        a = a[y0:y1, x0:x1]
    h, w = a.shape[:2]
    side = max(h, w)
    sq = np.zeros((side, side, 3), np.uint8)
    oy, ox = (side - h) // 2, (side - w) // 2
    sq[oy:oy + h, ox:ox + w] = a
    im = Image.fromarray(sq).resize((cfg.size, cfg.size), Image.BILINEAR)
    x = (np.asarray(im, np.float32) / np.float32(255.0) - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return x.transpose(2, 0, 1)


def run(paths: Sequence[str], cfg: Any, infer: Callable[[np.ndarray], np.ndarray], batch: int, dtype: str) -> dict:
    """Preprocess + infer every path in batches of ``batch``; returns throughput and the probabilities."""
    check_supported(cfg)
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(paths), batch):
        x = np.stack([preprocess_one(p, cfg) for p in paths[i:i + batch]]).astype(dtype)
        outs.append(infer(x))
    wall = time.perf_counter() - t0
    return {"throughput_img_s": len(paths) / wall, "wall_s": wall, "outputs": np.concatenate(outs)}
