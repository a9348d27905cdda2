"""Honest numbers, visible: the subject-level bootstrap interval of weighted F1, the warning for a
validation split with fewer than 2 subjects of a class, results.csv / TensorBoard per epoch, the
"(best)" marker under select="last", shipped recipes by name, and the pixel digests of training cells."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leukedge.evaluate import few_subjects_warning, format_ci, subject_bootstrap_ci


def _cohort(n_hem_subjects: int, n_all_subjects: int, cells: int, seed: int = 0, hard_hem: int = 0):
    """Synthetic predictions: each subject's cells right with a subject-specific accuracy."""
    rng = np.random.default_rng(seed)
    y, p, s = [], [], []
    for k, n in ((0, n_hem_subjects), (1, n_all_subjects)):
        for j in range(n):
            acc = 0.35 if (k == 0 and j < hard_hem) else rng.uniform(0.8, 0.98)
            right = rng.random(cells) < acc
            prob = np.where(right == (k == 1), 0.8, 0.2)
            y += [k] * cells
            p += list(prob)
            s += [f"{'H' if k == 0 else ''}{j + 1}"] * cells
    return np.array(y), np.array(p), s


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_subjects():
    y, p, s = _cohort(4, 8, 40, hard_hem=1)
    ci = subject_bootstrap_ci(y, p, s, n_boot=400)
    from sklearn.metrics import f1_score

    assert ci["weighted_f1"] == pytest.approx(f1_score(y, (p >= 0.5).astype(int), average="weighted"))
    assert ci["low"] < ci["weighted_f1"] < ci["high"]
    assert ci["n_subjects"] == {"hem": 4, "all": 8} and ci["n_cells"] == len(y) and ci["level"] == 0.95
    # one poorly classified person among few subjects: a wide interval; the same people with many more
    # subjects around them: narrower
    y2, p2, s2 = _cohort(40, 80, 40, hard_hem=10)
    ci2 = subject_bootstrap_ci(y2, p2, s2, n_boot=400)
    assert (ci2["high"] - ci2["low"]) < (ci["high"] - ci["low"])
    # deterministic for a seed
    assert subject_bootstrap_ci(y, p, s, n_boot=400) == ci
    assert "subject bootstrap" in format_ci(ci) and "4 hem + 8 all" in format_ci(ci)


def test_bootstrap_resamples_subjects_not_cells():
    """Many cells of few subjects: a cell-level bootstrap would give a narrow interval; the subject-level one
    must stay as wide as the subjects disagree."""
    y, p, s = _cohort(3, 3, 400, hard_hem=1, seed=3)
    ci = subject_bootstrap_ci(y, p, s, n_boot=400)
    rng = np.random.default_rng(0)
    from sklearn.metrics import f1_score

    pred = (p >= 0.5).astype(int)
    cell_level = [f1_score(y[i], pred[i], average="weighted") for i in (rng.integers(0, len(y), len(y)) for _ in range(200))]
    cell_width = np.quantile(cell_level, 0.975) - np.quantile(cell_level, 0.025)
    assert ci["high"] - ci["low"] > 3 * cell_width


def test_no_interval_and_a_warning_with_one_subject_of_a_class():
    y, p, s = _cohort(1, 5, 30)
    assert subject_bootstrap_ci(y, p, s) is None
    assert "fewer than 2 subjects" in format_ci(None)
    w = few_subjects_warning(y, s)
    assert w and "only 1 hem subject (H1, 30 cells)" in w and "all subject" not in w
    assert few_subjects_warning(*_cohort(2, 2, 5)[::2]) is None
    w0 = few_subjects_warning(np.array([1, 1]), ["1", "2"], "val")
    assert w0 and "0 hem subjects" in w0 and "val split" in w0


# -- training: warning, results.csv, TensorBoard, "(best)" ------------------------------------------
def _cache(tmp_path: Path, subjects: int = 8, cells: int = 8, folds: int = 1) -> Path:
    pytest.importorskip("leukedge._native")
    from leukedge.config import PreprocessConfig, StainConfig
    from leukedge.preprocess import run_preprocess
    from leukedge.synth import generate_dataset

    generate_dataset(tmp_path / "data", subjects=subjects, cells_per_subject=cells, seed=1, folds=folds, size=96)
    run_preprocess([tmp_path / "data"], tmp_path / "cache", PreprocessConfig(stain=StainConfig(method="none"), size=32),
                   progress=False)
    return tmp_path / "cache"


def test_train_warns_about_thin_validation_and_writes_results_csv(tmp_path):
    pytest.importorskip("torch")
    from leukedge._util import PlainReporter
    from leukedge.training import RESULTS_COLUMNS, TrainConfig, train

    cache = _cache(tmp_path)
    log = tmp_path / "log.txt"
    with log.open("w") as fh:
        res = train(cache, tmp_path / "run", TrainConfig(arch="tiny", epochs=4, batch_size=8, lr=0.05, patience=0,
                                                         threads=1, select="last", val_fraction=0.25, seed=0),
                    reporter=PlainReporter(stream=fh))
    text = log.read_text()
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert "estimated time per epoch: about" in text
    # 8 subjects, a fifth of them held out: fewer than 2 subjects of some class in validation
    assert len(split["val_subjects"]) <= 3
    assert "warning: the validation split holds only" in text and split["subject_warning"] in text
    rows = list(csv.DictReader((tmp_path / "run" / "results.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == list(RESULTS_COLUMNS)
    hist = res.history
    for r, h in zip(rows, hist):
        assert float(r["train_loss"]) == pytest.approx(h["train_loss"])
    # select="last": an epoch is "(best)" only if it beats every earlier one, never because it is kept
    f1s = [h["val_f1"] for h in hist]
    best_lines = [ln for ln in text.splitlines() if ln.startswith("epoch ") and ln.rstrip().endswith("(best)")]
    expect = [e for e, f in enumerate(f1s, start=1) if all(f > g + 1e-9 for g in f1s[: e - 1])]
    assert [int(ln.split()[1]) for ln in best_lines] == expect
    assert [r["best_so_far"] == "True" for r in rows] == [e in expect for e in range(1, 5)]
    assert res.best_epoch == 4  # the last epoch is kept whatever its score
    tb = tmp_path / "run" / "tensorboard"
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not tb.exists()
    else:
        events = list(tb.glob("events.out.tfevents.*"))
        assert events
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_thin_validation_warning_from_a_one_subject_class_split(tmp_path):
    pytest.importorskip("torch")
    from leukedge.training import TrainConfig, make_split

    manifest = [{"subject": s, "label": lab, "status": "ok", "split": "train" if s not in ("H2", "5") else "val"}
                for s, lab in [("1", 1), ("2", 1), ("3", 1), ("5", 1), ("H1", 0), ("H2", 0)] for _ in range(4)]
    msgs: list[str] = []
    split = make_split(manifest, TrainConfig(arch="tiny"), msgs.append)
    assert split["val_subjects"] == ["5", "H2"]
    w = few_subjects_warning([manifest[i]["label"] for i in split["val_indices"]],
                             [manifest[i]["subject"] for i in split["val_indices"]])
    assert w and "1 hem subject (H2, 4 cells)" in w and "1 all subject (5, 4 cells)" in w


# -- recipes shipped inside the package --------------------------------------------------------------
def test_shipped_recipe_by_name_from_any_directory(tmp_path):
    from leukedge.training import RECIPES_DIR, load_recipe, resolve_recipe, shipped_recipes

    assert "default" in shipped_recipes()
    assert RECIPES_DIR.parent.name == "leukedge"  # inside the package: a wheel carries it
    assert resolve_recipe("default") == RECIPES_DIR / "default.toml"
    assert resolve_recipe("recipes/default.toml") == RECIPES_DIR / "default.toml"  # the old checkout spelling
    assert load_recipe("default")["select"] == "last"
    with pytest.raises(ValueError, match="shipped: default"):
        resolve_recipe("nonesuch")
    # a separate process started far from the checkout (what an installed package sees)
    import os

    import leukedge

    code = ("import leukedge.training as t, json; print(json.dumps(t.load_recipe('default')))")
    env = {**os.environ, "PYTHONPATH": str(Path(leukedge.__file__).resolve().parents[1])}  # this package, not cwd's
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout)["arch"] == "efficientnet_lite0"


def test_recipes_are_package_data_of_the_wheel():
    """maturin packs every file under leukedge/ that git tracks and pyproject does not exclude: the recipes
    must be tracked there and not excluded (checked for real by building a wheel in scripts/check_wheel.sh)."""
    repo = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "leukedge/recipes"], cwd=repo, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert "leukedge/recipes/default.toml" in tracked
    import tomllib

    maturin = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["maturin"]
    assert not any("recipes" in str(x) for x in maturin.get("exclude", []))
