#!/usr/bin/env python
"""Reproduce leukedge's shipped default model (``leukedge/default_model``) with the product's own commands.

It runs, in order (each step resumes or reuses its output when restarted)::

    leukedge preprocess FOLD0 FOLD1 -o WORK/cache <PREPROCESS>
    leukedge cv    WORK/cache -o WORK/cv_official --split official --seeds 0 --recipe R --resume
    leukedge cv    WORK/cache -o WORK/cv_subject --folds 2 --seeds 0,1 --recipe R --resume
    leukedge train WORK/cache -o WORK/final --recipe R --no-validation --resume
    leukedge export WORK/final/bundle -o WORK/final/bundle/export --int8 --calibrate WORK/cache
    leukedge calibrate-ood WORK/final/bundle WORK/cache --split any

then copies the bundle (with its export, both CV summaries, plots and the model card) into the package.
FOLD0 / FOLD1 are C-NMC 2019 training folds 0 and 1 (``../shared/data/cnmc_fold0`` PNG, 3,527 cells of
28 subjects; ``../shared/data/cnmc_fold1`` lossless WebP, 3,581 cells of 14 subjects). The official-fold
run trains on one fold and tests on the other, both ways: the honest analogue of new patients, and the
measure every recipe choice was made on (see the model card).
Last it writes the bundle's ``trained_on.txt`` (``scripts/write_trained_on.py``: pixel digests of every
training cell, so that no score counts a cell the model saw).
The INT8 graphs are calibrated on the training cache (subjects held out for their check), with the fewest leading
convolutions kept FP32 that let each pass its bound against FP32 (``leukedge.quantize.INT8_TOL``); a graph that
still fails is not shipped.

Run time on the 2-core development machine (shared with other jobs): preprocessing 1-2 min; frozen-block
features of the 7,108 cells x 8 views once per cache and per training set; each CV run a few minutes
(see ``README.md`` of the model for the measured times).

Usage::

    python scripts/train_default.py [--data DIR ...] [--work DIR] [--out leukedge/default_model] [--skip-cv]
    python scripts/train_default.py --work DIR --attach-cv   # a CV that finished after the model shipped
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: this tree's leukedge
from leukedge.formats.export import read_export_manifest, write_export_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = Path("recipes") / "default.toml"  # relative to REPO (the commands run there): the bundle records it so
SIZE = 192  # px
# A fixed 384 px window of source pixels centred on the cell, resized to 192 px: the cell keeps its size
# (blasts are larger; bbox cropping made every cell fill the frame). See the model card for the comparison.
PREPROCESS = ["--stain", "none", "--crop", "window", "--crop-window", "384", "--size", str(SIZE), "--split-by", "subject"]
SUBJECT_CV = ["--folds", "2", "--seeds", "0,1"]  # 2 x 2 subject-grouped folds: what a 2-core machine affords beside the rest
OFFICIAL_CV = ["--split", "official", "--seeds", "0"]
DATA = [REPO.parent / "shared" / "data" / "cnmc_fold0", REPO.parent / "shared" / "data" / "cnmc_fold1"]
CV_FILES = ("cv.json", "cv_folds.png", "cv_per_subject.png", "cv_roc.png", "per_subject.csv")


def leukedge(*args: str) -> None:
    cmd = [sys.executable, "-m", "leukedge.cli", *args]
    print(f"[{time.strftime('%H:%M:%S')}] leukedge {' '.join(args)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def _cv_metrics(cv: dict, prefix: str) -> dict:
    out = {f"{prefix}_scheme": cv["scheme"], f"{prefix}_weighted_f1_mean": cv["weighted_f1"]["mean"],
           f"{prefix}_weighted_f1_sd": cv["weighted_f1"]["sd"], f"{prefix}_roc_auc_mean": cv["roc_auc"]["mean"],
           f"{prefix}_roc_auc_sd": cv["roc_auc"]["sd"], f"{prefix}_worst_subjects": cv["worst_subjects"]}
    if cv.get("baseline"):
        out[f"{prefix}_baseline_weighted_f1_mean"] = cv["baseline"]["weighted_f1"]["mean"]
    if cv.get("split") == "official":
        out[f"{prefix}_per_direction"] = [{"test_fold": f["test_fold"], "weighted_f1": f["weighted_f1"],
                                           "roc_auc": f["roc_auc"], "n": f["n_val"]} for f in cv["fold_runs"]]
    return out


def _add_cv_metrics(meta: dict, cv_dirs: dict[str, Path]) -> None:
    for name, d in cv_dirs.items():
        meta["metrics"].update(_cv_metrics(json.loads((d / "cv.json").read_text()), f"cv_{name}"))


def _copy_cv_files(out: Path, cv_dirs: dict[str, Path]) -> None:
    for name, d in cv_dirs.items():
        for f in CV_FILES:
            if (d / f).is_file():
                shutil.copy2(d / f, out / f"{name}_{f}")


def attach_cv(out: Path, cv_dirs: dict[str, Path]) -> None:
    """The finished CV runs' summaries into ``out/bundle.json`` and their files next to it (``--attach-cv``): what
    the full run does after training, for a CV that finished after the model shipped. Only runs with a cv.json."""
    done = {k: d for k, d in cv_dirs.items() if (d / "cv.json").is_file()}
    if not done:
        sys.exit(f"no finished CV run (cv.json) in {', '.join(map(str, cv_dirs.values()))}")
    meta = json.loads((out / "bundle.json").read_text())
    _add_cv_metrics(meta, done)
    (out / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    _copy_cv_files(out, done)
    print(f"attached {', '.join(done)} CV to {out}", flush=True)


def export_int8(bundle: Path, cache: Path) -> None:
    """FP32 + FP16 + INT8 export (each INT8 graph's FP32 prefix searched, ``--int8-fp32-convs auto``); an INT8 graph
    that still fails its bound is removed (the rest of the export is kept)."""
    try:
        leukedge("export", str(bundle), "-o", str(bundle / "export"), "--int8", "--calibrate", str(cache))
    except subprocess.CalledProcessError:
        exp = bundle / "export"
        report = json.loads((exp / "export_report.json").read_text())
        others_ok = all(r["all"].get("pass") for r in report.get("results", {}).values())
        if not others_ok or "int8" not in report:
            raise
        # export.json keeps each graph's check ("passed" false, export_report.json the numbers) but no longer lists
        # a file that is not there
        manifest = read_export_manifest(exp)
        for key in ("int8", "int8_trt"):
            if report.get(key, {}).get("all", {}).get("pass"):
                continue
            print(f"{key} graph not shipped: {'; '.join(report[key]['failures'])}", flush=True)
            entry = manifest.get("files", {}).pop(key, None)
            if entry:
                (exp / Path(entry["path"]).name).unlink(missing_ok=True)
        write_export_manifest(exp, manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", default=DATA, help="Data folders (official folds 0 and 1).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/leukedge_default"), help="Cache and runs (outside the repo).")
    ap.add_argument("--out", type=Path, default=REPO / "leukedge" / "default_model")
    ap.add_argument("--skip-cv", action="store_true", help="Only train and export the final model.")
    ap.add_argument("--attach-cv", action="store_true",
                    help="Only attach the finished CV runs in WORK (cv.json summaries into bundle.json's metrics, their "
                         "files next to it) to the model already in --out: no training, the weights and export stay.")
    args = ap.parse_args()
    data = [d.resolve() for d in args.data]
    args.work, args.out = args.work.resolve(), args.out.resolve()
    for d in data:
        if not d.is_dir():
            sys.exit(f"{d}: data folder not found")
    t0 = time.time()
    cache, final = args.work / f"folds01_window384_{SIZE}", args.work / "final"
    cv_dirs = {"official": args.work / "cv_official", "subject": args.work / "cv_subject"}
    if args.attach_cv:
        attach_cv(args.out, cv_dirs)
        return
    leukedge("preprocess", *map(str, data), "-o", str(cache), *PREPROCESS)
    if not args.skip_cv:
        leukedge("cv", str(cache), "-o", str(cv_dirs["official"]), *OFFICIAL_CV, "--recipe", str(RECIPE), "--resume")
        leukedge("cv", str(cache), "-o", str(cv_dirs["subject"]), *SUBJECT_CV, "--recipe", str(RECIPE), "--resume")
    leukedge("train", str(cache), "-o", str(final), "--recipe", str(RECIPE), "--no-validation", "--resume")
    bundle = final / "bundle"
    meta = json.loads((bundle / "bundle.json").read_text())
    if not args.skip_cv:  # the bundle carries its cross-validated scores
        _add_cv_metrics(meta, cv_dirs)
    meta["data"] = ("C-NMC 2019 training folds 0 and 1 (real cells): 7,108 images, 42 subjects "
                    "(fold 0: 3,527 cells of 28 subjects; fold 1: 3,581 cells of 14 subjects)")
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    export_int8(bundle, cache)
    # the out-of-distribution (energy) threshold: 99.5 % quantile of the training cells, stored in bundle.json
    leukedge("calibrate-ood", str(bundle), str(cache), "--split", "any")
    readme = (args.out / "README.md").read_text() if (args.out / "README.md").is_file() else None
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(bundle, args.out)
    if readme is not None:  # the model card is written by hand from the cv.json files
        (args.out / "README.md").write_text(readme)
    if not args.skip_cv:
        _copy_cv_files(args.out, cv_dirs)
    shutil.copy2(final / "training_curves.png", args.out / "training_curves.png")
    # trained_on.txt: pixel digests of every training cell, so that no score counts a cell the model saw
    subprocess.run([sys.executable, str(REPO / "scripts" / "write_trained_on.py"), str(args.out), *map(str, data)],
                   check=True, cwd=REPO)
    print(f"default model written to {args.out} in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
