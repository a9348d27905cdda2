#!/usr/bin/env python
"""A fold ensemble on official-fold transfer: is averaging K models, each trained on K-1 of K subject-grouped
parts of the training fold, better on the other official fold than one model trained on all of it?

For each official test fold F of CACHE (``leukedge cv --split official``'s directions, pixel copies of training
cells dropped from the test fold): the training fold's patients are split into K subject-grouped parts
(``leukedge.cv.make_folds``); model k trains on every part but k, with RECIPE (the shipped one by default) and is
scored on fold F, which none of them saw. The ensemble is the mean of the K models' P(all) (each already shifted
by the recipe's threshold, so 0.5 decides). Runs are kept in OUT/test{F}/part{k} and reused (``--resume``).

Usage::

    python scripts/fold_ensemble.py CACHE -o OUT [--k 3] [--recipe default] [--seed 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from leukedge.cv import _fold_predictions, make_folds, official_folds, row_digests
from leukedge.formats.cache import load_cache
from leukedge.training import TrainConfig, load_recipe


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {"weighted_f1": float(f1_score(y, (p >= 0.5).astype(int), average="weighted")),
            "roc_auc": float(roc_auc_score(y, p))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the summary here too")
    a = ap.parse_args()

    cache = load_cache(a.cache)
    manifest = list(cache.manifest)
    digests = row_digests(np.asarray(cache.images))
    labels = np.array([int(r.get("label") or 0) for r in manifest])
    cfg = dataclasses.replace(TrainConfig(**load_recipe(a.recipe)), recipe=a.recipe, resume=True, progress=False,
                              quiet=True)
    summary: dict = {"recipe": a.recipe, "k": a.k, "seed": a.seed, "cache": str(a.cache), "directions": {}}
    t0 = time.time()
    for f, tr, te, dropped in official_folds(manifest, digests):
        sub = [manifest[i] for i in tr]
        parts = make_folds(sub, a.k, a.seed, digests=[digests[i] for i in tr])
        y = labels[te]
        probs = []
        for k, (keep, _) in enumerate(parts):
            rows = [tr[j] for j in keep]
            run = a.out / f"test{f}" / f"part{k}"
            run.mkdir(parents=True, exist_ok=True)
            print(f"[{time.time() - t0:5.0f}s] test fold {f}: model {k + 1}/{a.k} on {len(rows)} of {len(tr)} training "
                  f"cells ({len({str(manifest[i].get('subject')) for i in rows})} subjects)", flush=True)
            p, _ = _fold_predictions(a.cache, run, cfg, a.seed, rows, te, print, None)
            probs.append(p)
            print(f"    weighted F1 {scores(y, p)['weighted_f1']:.4f}", flush=True)
        ens = np.mean(probs, axis=0)
        summary["directions"][f"test_fold_{f}"] = {
            "test_cells": len(te), "dropped_pixel_copies": dropped, "training_cells": len(tr),
            "models": [scores(y, p) for p in probs], "ensemble": scores(y, ens)}
        print(f"test fold {f}: ensemble {summary['directions'][f'test_fold_{f}']['ensemble']}", flush=True)
    summary["seconds"] = round(time.time() - t0)
    text = json.dumps(summary, indent=1)
    (a.out / "fold_ensemble.json").write_text(text)
    if a.json:
        a.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
