"""`leukedge cv`: subject-grouped folds, several seeds, out-of-fold predictions that agree with
`leukedge evaluate`, the recipe file, and the cached-feature training path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("leukedge._native", reason="the Rust extension is not built (pip install -e .)")
from click.testing import CliRunner  # noqa: E402

from leukedge.cli import main  # noqa: E402
from leukedge.config import PreprocessConfig, StainConfig  # noqa: E402
from leukedge.cv import best_threshold, cross_validate, make_folds  # noqa: E402
from leukedge.evaluate import evaluate  # noqa: E402
from leukedge.preprocess import load_cache, run_preprocess  # noqa: E402
from leukedge.synth import generate_dataset  # noqa: E402
from leukedge.training import TrainConfig, load_recipe  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv")
    generate_dataset(root / "data", subjects=8, cells_per_subject=12, seed=3, folds=1, size=96)
    cfg = PreprocessConfig(stain=StainConfig(method="none"), size=32)
    run_preprocess([root / "data"], root / "cache", cfg, progress=False)
    return root / "cache"


def _oof(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_folds_are_subject_disjoint_for_every_seed(cache):
    manifest = list(load_cache(cache).manifest)
    for seed in (0, 1, 2):
        folds = make_folds(manifest, 3, seed)
        seen: set[int] = set()
        for tr, va in folds:
            assert not {manifest[i]["subject"] for i in tr} & {manifest[i]["subject"] for i in va}
            assert not seen & set(va)
            seen |= set(va)
        assert len(seen) == sum(1 for r in manifest if r.get("status", "ok") == "ok")
    # different seeds partition the subjects differently
    a = [sorted({manifest[i]["subject"] for i in va}) for _, va in make_folds(manifest, 3, 0)]
    b = [sorted({manifest[i]["subject"] for i in va}) for _, va in make_folds(manifest, 3, 1)]
    assert a != b


def test_cv_oof_predictions_agree_with_evaluate(cache, tmp_path):
    cfg = TrainConfig(arch="tiny", epochs=1, batch_size=16, seed=0, progress=False, quiet=True, tta="flip",
                      select="last")
    res = cross_validate(cache, tmp_path / "cv", cfg, folds=2, seeds=[0, 1], log=lambda *_: None)
    s = res.summary
    assert len(s["fold_runs"]) == 4 and s["weighted_f1"]["n"] == 4
    assert s["weighted_f1"]["mean"] == pytest.approx(np.mean([f["weighted_f1"] for f in s["fold_runs"]]))
    oof = _oof(tmp_path / "cv" / "oof_predictions.csv")
    assert len(oof) == 2 * len(load_cache(cache).manifest)
    for run in s["fold_runs"]:
        rows = [r for r in oof if int(r["seed"]) == run["seed"] and int(r["fold"]) == run["fold"]]
        bundle = tmp_path / "cv" / f"seed{run['seed']}" / f"fold{run['fold']}" / "bundle"
        ev = evaluate(cache, bundle, indices=[int(r["row"]) for r in rows])
        got = {p["index"]: p["prob_all"] for p in ev["predictions"]}
        assert max(abs(got[int(r["row"])] - float(r["probability"])) for r in rows) < 1e-5
        assert ev["weighted_f1"] == pytest.approx(run["weighted_f1"], abs=1e-9)
        assert ev["roc_auc"] == pytest.approx(run["roc_auc"], abs=1e-9)
        assert json.loads((bundle / "bundle.json").read_text())["test_time"]["tta"] == "flip"
    subjects = s["per_subject"]
    assert [r["accuracy"] for r in subjects] == sorted(r["accuracy"] for r in subjects)  # worst first
    assert s["worst_subjects"] == [r["subject"] for r in subjects[:3]]
    html = (tmp_path / "cv" / "report.html").read_text()
    assert "Cross-validation" in html and "data:image/png;base64" in html
    for name in ("cv.json", "per_subject.csv", "cv_folds.png", "cv_per_subject.png", "cv_roc.png"):
        assert (tmp_path / "cv" / name).is_file(), name


def test_cv_resume_reuses_finished_folds(cache, tmp_path):
    cfg = TrainConfig(arch="tiny", epochs=1, batch_size=16, progress=False, quiet=True, select="last")
    first = cross_validate(cache, tmp_path / "cv", cfg, folds=2, seeds=[0], log=lambda *_: None)
    msgs: list[str] = []
    again = cross_validate(cache, tmp_path / "cv", cfg, folds=2, seeds=[0], log=msgs.append, resume=True)
    assert sum("reusing" in m for m in msgs) == 2
    assert again.summary["weighted_f1"] == first.summary["weighted_f1"]


def test_recipe_file_sets_train_options_and_cli_wins(cache, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('description = "test"\n[train]\narch = "tiny"\nepochs = 1\nbatch-size = 16\ntta = "d4"\nlr = 0.002\n')
    assert load_recipe(recipe) == {"arch": "tiny", "epochs": 1, "batch_size": 16, "tta": "d4", "lr": 0.002}
    r = CliRunner().invoke(main, ["train", str(cache), "-o", str(tmp_path / "run"), "--recipe", str(recipe),
                                  "--lr", "0.003", "--quiet", "--no-validation"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "run" / "bundle" / "bundle.json").read_text())
    assert meta["recipe"]["file"] == str(recipe)
    assert meta["recipe"]["settings"]["lr"] == 0.003 and meta["recipe"]["settings"]["tta"] == "d4"
    assert meta["test_time"] == {"members": 1, "tta": "d4", "views": 8, "threshold": 0.5}
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n")
    r = CliRunner().invoke(main, ["train", str(cache), "-o", str(tmp_path / "run2"), "--recipe", str(bad)])
    assert r.exit_code != 0 and "unknown setting 'learning_rate'" in r.output and "Traceback" not in r.output


def test_cv_command_prints_tables(cache, tmp_path):
    r = CliRunner().invoke(main, ["cv", str(cache), "-o", str(tmp_path / "cv"), "--folds", "2", "--seeds", "0",
                                  "--arch", "tiny", "--epochs", "1", "--batch-size", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "weighted F1" in r.output and "worst subjects" in r.output
    s = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert s["recipe"]["settings"]["select"] == "last"  # cv's default: a fixed epoch budget
    r = CliRunner().invoke(main, ["cv", str(cache), "-o", str(tmp_path / "x"), "--seeds", "0,0"])
    assert r.exit_code != 0 and "distinct seeds" in r.output


def test_feature_cache_training_matches_the_shipped_model(cache, tmp_path):
    """Frozen blocks + dihedral augmentation train on cached features; the bundle (full model with
    TTA) gives what the cached path predicted, and the features are reused by the next fold."""
    cfg = TrainConfig(arch="efficientnet_lite0", pretrained=True, freeze_blocks=8, augment="dihedral", epochs=1,
                      batch_size=16, progress=False, quiet=True, tta="d4", threshold=0.4)
    assert cfg.uses_feature_cache()
    res = cross_validate(cache, tmp_path / "cv", cfg, folds=2, seeds=[0], log=lambda *_: None)
    assert len(list((Path(cache) / "features").glob("prefix_k8_*.npy"))) == 1
    oof = _oof(tmp_path / "cv" / "oof_predictions.csv")
    run = res.summary["fold_runs"][0]
    rows = [r for r in oof if int(r["fold"]) == 0]
    ev = evaluate(cache, tmp_path / "cv" / "seed0" / "fold0" / "bundle", indices=[int(r["row"]) for r in rows])
    got = {p["index"]: p["prob_all"] for p in ev["predictions"]}
    # cached features are float16: agreement to a few 1e-3
    assert max(abs(got[int(r["row"])] - float(r["probability"])) for r in rows) < 0.02
    assert run["by_tta"] is not None and set(run["by_tta"]) == {"none", "flip", "d4"}
    assert res.summary["weighted_f1_by_tta"]["d4"]["n"] == 2


def test_noise_trains_on_noisy_cached_views_and_validates_on_clean_ones(cache, tmp_path):
    """--noise with the feature cache: a second cache of noisy views (named by noise and seed) is what the top is
    trained on, while validation (and so the out-of-fold scores) reads the clean views: the bundle reproduces them."""
    cfg = TrainConfig(arch="efficientnet_lite0", pretrained=True, freeze_blocks=8, augment="dihedral", epochs=1,
                      batch_size=16, progress=False, quiet=True, noise=4.0)
    cross_validate(cache, tmp_path / "cv", cfg, folds=2, seeds=[0], log=lambda *_: None)
    names = sorted(p.name for p in (Path(cache) / "features").glob("prefix_k8_*.npy"))
    assert len(names) == 2 and sum("_noise4_s0" in n for n in names) == 1, names
    noisy = np.load(next(p for p in (Path(cache) / "features").glob("prefix_k8_*_noise4_*.npy")))
    clean = np.load(next(p for p in (Path(cache) / "features").glob("prefix_k8_*.npy") if "noise" not in p.name))
    assert noisy.shape == clean.shape and not np.array_equal(noisy, clean)
    oof = _oof(tmp_path / "cv" / "oof_predictions.csv")
    rows = [r for r in oof if int(r["fold"]) == 0]
    ev = evaluate(cache, tmp_path / "cv" / "seed0" / "fold0" / "bundle", indices=[int(r["row"]) for r in rows])
    got = {p["index"]: p["prob_all"] for p in ev["predictions"]}
    assert max(abs(got[int(r["row"])] - float(r["probability"])) for r in rows) < 0.02
    meta = json.loads((tmp_path / "cv" / "seed0" / "fold0" / "bundle" / "bundle.json").read_text())
    assert meta["recipe"]["settings"]["noise"] == 4.0


def test_cell_noise_leaves_the_background_black():
    import torch

    from leukedge.training.augment import add_cell_noise

    x = torch.zeros(6, 3, 16, 16)
    x[:, :, 4:12, 4:12] = 0.5
    y = add_cell_noise(x, torch.Generator().manual_seed(0), 4 / 255)
    assert torch.equal(y[:, :, :4], x[:, :, :4]) and not torch.equal(y, x)
    assert float((y - x).abs().max()) < 8 * 4 / 255  # within 8 sigma of the largest sigma
    assert torch.equal(add_cell_noise(x, torch.Generator().manual_seed(0), 0.0), x)


def test_best_threshold():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
    t, f1 = best_threshold(y, p)
    assert 0.6 < t <= 0.7 and f1 == 1.0


def test_resume_with_other_test_time_settings_rescores_and_other_recipe_is_refused(cache, tmp_path):
    cfg = TrainConfig(arch="tiny", epochs=1, batch_size=16, progress=False, quiet=True, select="last")
    first = cross_validate(cache, tmp_path / "cv", cfg, folds=2, seeds=[0], log=lambda *_: None)
    msgs: list[str] = []
    flip = cross_validate(cache, tmp_path / "cv", cfg, folds=2, seeds=[0], log=msgs.append, resume=True, tta="flip")
    assert not any("reusing" in m for m in msgs)  # re-scored with the new TTA, not reused
    meta = json.loads((tmp_path / "cv" / "seed0" / "fold0" / "bundle" / "bundle.json").read_text())
    assert meta["test_time"]["tta"] == "flip"
    hist = json.loads((tmp_path / "cv" / "seed0" / "fold0" / "history.json").read_text())["history"]
    assert len(hist) == 1  # no epoch was trained again
    assert [r["probability"] for r in flip.oof] != [r["probability"] for r in first.oof]
    with pytest.raises(ValueError, match="lr 0.001, now 0.002"):
        cross_validate(cache, tmp_path / "cv", cfg, folds=2, seeds=[0], log=lambda *_: None, resume=True, lr=0.002)


@pytest.fixture(scope="module")
def two_fold_cache(tmp_path_factory) -> Path:
    """Synthetic cells in two official folds (fold_0, fold_1), one cell of fold 1 a pixel copy of a fold-0
    cell under another subject's name (as in C-NMC), WebP beside BMP."""
    root = tmp_path_factory.mktemp("cv_official")
    generate_dataset(root / "data", subjects=8, cells_per_subject=10, seed=5, folds=2, size=96)
    files = sorted((root / "data").rglob("*.bmp"))
    f0 = [p for p in files if "fold_0" in str(p)]
    f1 = [p for p in files if "fold_1" in str(p)]
    assert f0 and f1
    donor = f0[0]
    victim_subject = f1[0].name.split("_")[1]
    cls = donor.parent.name
    copy = root / "data" / "C-NMC_Leukemia" / "training_data" / "fold_1" / cls / f"UID_{victim_subject}_999_1_{cls}.bmp"
    copy.write_bytes(donor.read_bytes())
    from PIL import Image

    webp = f1[1].with_suffix(".webp")
    Image.open(f1[1]).save(webp, lossless=True)
    f1[1].unlink()
    cfg = PreprocessConfig(stain=StainConfig(method="none"), crop="window", crop_window=80, size=32)
    run_preprocess([root / "data"], root / "cache", cfg, progress=False)
    return root / "cache"


def test_official_split_trains_on_one_fold_and_tests_on_the_other(two_fold_cache, tmp_path):
    from leukedge.cv import official_folds, row_digests

    loaded = load_cache(two_fold_cache)
    manifest = list(loaded.manifest)
    assert all(r.get("status", "ok") == "ok" for r in manifest), [r for r in manifest if r.get("status") != "ok"]
    assert any(str(r["path"]).endswith(".webp") for r in manifest)
    plan = official_folds(manifest, row_digests(loaded.images))
    assert [f for f, *_ in plan] == [0, 1]
    for f, tr, te, _dropped in plan:
        assert {int(manifest[i]["fold"]) for i in te} == {f}
        assert f not in {int(manifest[i]["fold"]) for i in tr}
        assert not {manifest[i]["subject"] for i in tr} & {manifest[i]["subject"] for i in te}
    # the pixel copy is dropped from the test side in both directions (it has a twin on the training side)
    assert [d for *_, d in plan] == [1, 1]

    cfg = TrainConfig(arch="tiny", epochs=1, batch_size=16, seed=0, progress=False, quiet=True, select="last")
    res = cross_validate(two_fold_cache, tmp_path / "cv", cfg, seeds=[0], split="official", log=lambda *_: None)
    s = res.summary
    assert s["split"] == "official" and "official-fold transfer" in s["scheme"]
    assert [r["test_fold"] for r in s["fold_runs"]] == [0, 1]
    for run, (f, tr, te, _) in zip(s["fold_runs"], plan):
        bundle = tmp_path / "cv" / "seed0" / f"official{f}" / "bundle"
        split = json.loads((bundle.parent / "metrics.json").read_text())["split"]
        trained_subjects = set(split["train_subjects"])
        assert trained_subjects == {manifest[i]["subject"] for i in tr}
        assert trained_subjects and not trained_subjects & set(run["val_subjects"])
        ev = evaluate(two_fold_cache, bundle, indices=te)
        assert ev["weighted_f1"] == pytest.approx(run["weighted_f1"], abs=1e-9)
        assert ev["roc_auc"] == pytest.approx(run["roc_auc"], abs=1e-9)
        assert run["n_val"] == len(te)
    base = s["baseline"]
    assert base["name"] == "cell-area logistic regression" and len(base["folds"]) == 2
    assert all(0.0 <= b["weighted_f1"] <= 1.0 for b in base["folds"])


def test_official_split_needs_two_folds(cache, tmp_path):
    cfg = TrainConfig(arch="tiny", epochs=1, batch_size=16, progress=False, quiet=True)
    with pytest.raises(ValueError, match="at least two official folds"):
        cross_validate(cache, tmp_path / "cv", cfg, split="official", log=lambda *_: None)
