"""Metrics, the preprocessing-hash guard, reports, and the shipped model on real cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from leukedge.config import ConfigMismatchError, PreprocessConfig, StainConfig  # noqa: E402
from leukedge.evaluate import compute_metrics, evaluate, per_subject_breakdown, write_report  # noqa: E402
from leukedge.models import build_model, load_bundle, save_bundle  # noqa: E402

SIZE = 40


def test_compute_metrics_matches_hand_counts():
    y = [1, 1, 1, 1, 0, 0, 0, 1]
    p = [0.9, 0.8, 0.4, 0.7, 0.2, 0.6, 0.1, 0.55]
    m = compute_metrics(y, p, subjects=["1", "1", "2", "2", "H1", "H1", "H2", "2"])
    # predictions: 1 1 0 1 0 1 0 1 -> TP 4, FN 1, TN 2, FP 1
    assert m["confusion_matrix"]["matrix"] == [[2, 1], [1, 4]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["per_class"]["all"]["precision"] == pytest.approx(4 / 5)
    assert m["per_class"]["all"]["recall"] == pytest.approx(4 / 5)
    assert m["per_class"]["hem"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["hem"]["recall"] == pytest.approx(2 / 3)
    f_all, f_hem = 0.8, 2 / 3
    assert m["weighted_f1"] == pytest.approx((5 * f_all + 3 * f_hem) / 8)
    assert m["macro_f1"] == pytest.approx((f_all + f_hem) / 2)
    # AUC by pair counting: 15 pos/neg pairs, the positive ranks higher in 13 of them.
    assert m["roc_auc"] == pytest.approx(13 / 15)
    subj = {r["subject"]: r for r in m["per_subject"]}
    assert list(subj) == ["1", "2", "H1", "H2"]
    assert subj["2"]["n"] == 3 and subj["2"]["accuracy"] == pytest.approx(2 / 3)
    assert subj["2"]["predicted_blast_fraction"] == pytest.approx(2 / 3)
    assert subj["H1"]["mean_prob_all"] == pytest.approx(0.4) and subj["H1"]["true_class"] == "hem"


def test_single_class_has_no_auc():
    m = compute_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert m["roc_auc"] is None and m["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no labelled"):
        compute_metrics([], [])
    rows = per_subject_breakdown(["h3", None], np.array([-1, -1]), np.array([0.7, 0.2]))
    assert {r["subject"] for r in rows} == {"h3", "?"} and all(r["accuracy"] is None for r in rows)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    pytest.importorskip("leukedge._native", reason="the Rust extension is not built")
    from leukedge.preprocess import run_preprocess
    from leukedge.synth import generate_dataset

    root = tmp_path_factory.mktemp("evalsynth")
    generate_dataset(root / "data", subjects=6, cells_per_subject=6, seed=3, folds=2, size=96)
    run_preprocess([root / "data"], root / "cache", PreprocessConfig(stain=StainConfig(method="none"), size=SIZE), progress=False)
    return root / "cache"


def _bundle(path: Path, cfg: PreprocessConfig) -> Path:
    torch.manual_seed(0)
    m = build_model("tiny", input_size=cfg.size, width=8).eval()
    return save_bundle(path, m, arch="tiny", arch_kwargs={"width": 8}, config=cfg, synthetic=True)


def test_evaluate_refuses_a_different_preprocessing(small_cache, tmp_path):
    from click.testing import CliRunner

    from leukedge.cli import main

    other = PreprocessConfig(stain=StainConfig(method="macenko"), size=SIZE)
    b = _bundle(tmp_path / "b", other)
    with pytest.raises(ConfigMismatchError, match=r"stain\.method: 'macenko' != 'none'"):
        evaluate(small_cache, b)
    r = CliRunner().invoke(main, ["evaluate", str(small_cache), "--model", str(b), "-o", str(tmp_path / "out")])
    assert r.exit_code != 0
    assert "refusing to evaluate" in r.output and "stain.method" in r.output
    assert not (tmp_path / "out" / "metrics.json").exists()
    # A different size is refused too (and named).
    b2 = _bundle(tmp_path / "b2", PreprocessConfig(stain=StainConfig(method="none"), size=SIZE + 8))
    with pytest.raises(ConfigMismatchError, match="size: 48 != 40"):
        evaluate(small_cache, b2)


def test_evaluate_report(small_cache, tmp_path):
    from leukedge.preprocess import load_cache

    cache = load_cache(small_cache)
    b = _bundle(tmp_path / "b", cache.config)
    res = evaluate(small_cache, b)
    assert res["synthetic"] is True and res["synthetic_data"] is True and "SYNTHETIC" in res["warning"]
    assert res["n_images"] == len(cache) == 36 and res["n_labelled"] == 36
    assert 0 <= res["weighted_f1"] <= 1 and len(res["predictions"]) == 36
    assert {r["subject"] for r in res["per_subject"]} == {r["subject"] for r in cache.manifest}
    # Probabilities agree with the bundle run directly on the cached uint8 rows.
    bundle = load_bundle(b)
    want = bundle.predict_proba(np.asarray(cache.images))
    np.testing.assert_allclose([p["prob_all"] for p in res["predictions"]], want, rtol=1e-5, atol=1e-6)
    # Split filter.
    val = evaluate(small_cache, bundle, split="val")
    assert 0 < val["n_images"] < 36 and all(cache.manifest[p["index"]]["split"] == "val" for p in val["predictions"])
    with pytest.raises(ValueError, match="split 'nope'"):
        evaluate(small_cache, bundle, split="nope")

    (b / "history.json").write_text(json.dumps({"history": [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_f1": 0.5, "val_acc": 0.5, "val_auc": 0.6, "lr": 1e-3},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.5, "val_f1": 0.7, "val_acc": 0.7, "val_auc": 0.8, "lr": 5e-4}]}))
    files = write_report(res, tmp_path / "rep", bundle_path=b)
    for key in ("metrics", "predictions", "roc", "confusion_matrix", "per_subject", "training_curves"):
        assert Path(files[key]).is_file(), key
    assert Path(files["roc"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(Path(files["metrics"]).read_text())
    assert saved["synthetic"] is True and "predictions" not in saved
    assert saved["weighted_f1"] == pytest.approx(res["weighted_f1"])


def test_default_model_on_real_sample(cnmc_sample, tmp_path):
    """Smoke test of the shipped model on the 52 real sample cells (26 subjects, 20 cells from
    fold 0, which the model was trained on). Chance is ~0.5 weighted F1."""
    pytest.importorskip("leukedge._native", reason="the Rust extension is not built")
    from leukedge.preprocess import run_preprocess

    bundle = load_bundle()
    run_preprocess([cnmc_sample], tmp_path / "cache", bundle.config, progress=False)
    res = evaluate(tmp_path / "cache", bundle)
    assert res["n_labelled"] == 52 and res["synthetic"] is False
    assert res["weighted_f1"] >= 0.65, res["weighted_f1"]
    assert res["roc_auc"] >= 0.7, res["roc_auc"]
