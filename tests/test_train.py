"""Training on a small synthetic cache (synth -> Rust preprocess -> train), splits, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("leukedge._native", reason="the Rust extension is not built (pip install -e .)")

from leukedge.config import PreprocessConfig, StainConfig  # noqa: E402
from leukedge.training import TrainConfig, augment_batch, make_split, normalize01, to_float01, train  # noqa: E402

SIZE = 48
FAST = dict(arch="tiny", batch_size=32, lr=3e-3, patience=0, threads=1, quiet=True, progress=False)


def build_synth_cache(root: Path, subjects: int, cells: int, folds: int = 3, seed: int = 0) -> Path:
    from leukedge.preprocess import run_preprocess
    from leukedge.synth import generate_dataset

    generate_dataset(root / "data", subjects=subjects, cells_per_subject=cells, seed=seed, folds=folds, size=128)
    cfg = PreprocessConfig(stain=StainConfig(method="none"), size=SIZE)
    run_preprocess([root / "data"], root / "cache", cfg, progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory) -> Path:
    return build_synth_cache(tmp_path_factory.mktemp("synth"), subjects=24, cells=20)


@pytest.fixture(scope="module")
def trained(synth_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(synth_cache, out, TrainConfig(epochs=6, seed=0, **FAST))


def test_tiny_model_learns_synthetic_cells(trained, synth_cache):
    res = trained
    hist = res.history
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    losses = [h["train_loss"] for h in hist]
    assert losses[-1] < 0.8 * losses[0], losses
    # Chance is ~0.5 weighted F1 (and a constant "all" prediction scores ~0.5 here); the
    # subject-disjoint validation fold must be clearly better.
    assert res.best_val_f1 >= 0.7, [h["val_f1"] for h in hist]
    assert res.metrics["val"]["roc_auc"] >= 0.75
    assert res.best_epoch == max(hist, key=lambda h: h["val_f1"])["epoch"]
    for name in ("history.json", "metrics.json", "split.json", "training_curves.png", "bundle/model.safetensors",
                 "bundle/bundle.json", "bundle/history.json", "checkpoints/best.safetensors", "checkpoints/state.json"):
        assert (res.out_dir / name).is_file(), name
    # state.json names the last epoch's weights and optimiser; no older epoch's files are left behind
    state = json.loads((res.out_dir / "checkpoints" / "state.json").read_text())
    assert (state["weights"], state["optim"]) == ("last-0006.safetensors", "optim-0006.pt")
    assert sorted(f.name for f in (res.out_dir / "checkpoints").iterdir()) == sorted(
        ["best.safetensors", "state.json", state["weights"], state["optim"]])
    meta = json.loads((res.bundle_path / "bundle.json").read_text())
    from leukedge.preprocess import load_cache

    assert meta["synthetic"] is True and meta["arch"] == "tiny"
    assert meta["preprocess_hash"] == load_cache(synth_cache).config.pixel_hash()
    assert meta["metrics"]["val_weighted_f1"] == pytest.approx(res.best_val_f1)
    # The bundle holds the best epoch's weights: re-evaluating it reproduces the best val F1.
    from leukedge.evaluate import evaluate

    ev = evaluate(synth_cache, res.bundle_path, indices=json.loads((res.out_dir / "split.json").read_text())["val_indices"])
    assert ev["weighted_f1"] == pytest.approx(res.best_val_f1, abs=1e-6)


def test_split_is_patient_disjoint(trained, synth_cache):
    from leukedge.preprocess import load_cache

    cache = load_cache(synth_cache)
    split = json.loads((trained.out_dir / "split.json").read_text())
    tr, va = split["train_indices"], split["val_indices"]
    assert tr and va and not set(tr) & set(va)
    s_tr = {cache.manifest[i]["subject"] for i in tr}
    s_va = {cache.manifest[i]["subject"] for i in va}
    assert s_tr and s_va and not s_tr & s_va
    assert split["patient_disjoint"] is True and split["leaked_subjects"] == []
    assert set(split["val_subjects"]) == s_va
    # Every labelled, decoded image is used exactly once.
    assert sorted(tr + va) == [i for i, r in enumerate(cache.manifest) if r["status"] == "ok" and r["label"] in (0, 1)]
    assert trained.metrics["split"]["patient_disjoint"] is True


def test_split_strategies(synth_cache):
    from leukedge.preprocess import load_cache

    m = load_cache(synth_cache).manifest
    logs: list[str] = []
    # Official folds (synth writes 3 subject-disjoint fold_k folders).
    sp = make_split(m, TrainConfig(val_fold=1), logs.append)
    assert sp["strategy"] == "fold" and {m[i]["fold"] for i in sp["val_indices"]} == {1}
    assert 1 not in {m[i]["fold"] for i in sp["train_indices"]}
    # Subject-grouped split when the folds are ignored (rows look fold-less).
    no_folds = [{**r, "fold": None, "split": None} for r in m]
    sp = make_split(no_folds, TrainConfig(seed=3), logs.append)
    assert sp["strategy"] == "subject" and sp["patient_disjoint"]
    assert not set(sp["train_subjects"]) & set(sp["val_subjects"])
    assert set(sp["val_counts"]) == {"hem", "all"} and min(sp["val_counts"].values()) > 0
    assert not logs
    # Image-level split: allowed only on request, and loud about the leak.
    sp = make_split(no_folds, TrainConfig(image_level_split=True), logs.append)
    assert sp["strategy"] == "image" and sp["patient_disjoint"] is False and sp["leaked_subjects"]
    assert any("inflated" in line for line in logs)
    # Explicit rows that leak a subject are refused.
    subj = m[0]["subject"]
    same = [i for i, r in enumerate(m) if r["subject"] == subj]
    with pytest.raises(RuntimeError, match="both sides"):
        make_split(m, TrainConfig(train_indices=same[:2], val_indices=same[2:4]), logs.append)


def test_resume_continues_exactly(synth_cache, tmp_path):
    cfg = TrainConfig(epochs=3, seed=1, limit=200, resplit=True, **FAST)
    ref = train(synth_cache, tmp_path / "straight", cfg)
    first = train(synth_cache, tmp_path / "resumed", cfg, on_epoch_end=lambda rec: rec["epoch"] < 1)
    assert len(first.history) == 1
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 1
    res = train(synth_cache, tmp_path / "resumed", cfg, resume=True)
    assert len(res.history) == 3
    for a, b in zip(ref.history, res.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_f1"] == pytest.approx(b["val_f1"], abs=1e-9)
    from safetensors.torch import load_file

    wa = load_file(str(ref.bundle_path / "model.safetensors"))
    wb = load_file(str(res.bundle_path / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_resume_after_a_kill_inside_the_checkpoint(synth_cache, tmp_path, monkeypatch):
    """A run killed after epoch 2's weights were written but before its optimiser and state.json resumes
    from the consistent epoch-1 checkpoint and ends exactly like an uninterrupted run."""
    cfg = TrainConfig(epochs=3, seed=1, limit=200, resplit=True, **FAST)
    ref = train(synth_cache, tmp_path / "straight", cfg)
    real_save = torch.save

    def killed_in_epoch_2(obj, f, *a, **k):
        if "optim-0002" in str(f):
            raise KeyboardInterrupt("killed between the checkpoint's files")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(synth_cache, tmp_path / "torn", cfg)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = tmp_path / "torn" / "checkpoints"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 1 and (ckpt / "last-0002.safetensors").is_file()  # epoch 2's weights are there, unnamed
    res = train(synth_cache, tmp_path / "torn", cfg, resume=True)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    for a, b in zip(ref.history, res.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_f1"] == pytest.approx(b["val_f1"], abs=1e-9)
    assert not (ckpt / "last-0002.safetensors").exists() and (ckpt / "last-0003.safetensors").is_file()


def test_mixup_mixes_batches_and_the_loss(synth_cache, tmp_path):
    """mixup: the batch is a convex mix of itself and a permutation, lam is reproducible per (seed, epoch, batch),
    training with it still learns, and the recipe records it; alpha 0 leaves the batch alone."""
    from leukedge.training import mixup_batch

    x = torch.arange(4 * 3, dtype=torch.float32).view(4, 3)
    y = torch.tensor([0, 1, 1, 0])
    xm, ym, lam = mixup_batch(x, y, 0.4, torch.Generator().manual_seed(0), (5, 2, 7))
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    assert 0.0 < lam < 1.0 and ym.tolist() == y[perm].tolist()
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm])
    assert mixup_batch(x, y, 0.4, torch.Generator().manual_seed(9), (5, 2, 7))[2] == lam  # same draw after --resume
    assert mixup_batch(x, y, 0.4, torch.Generator().manual_seed(0), (5, 3, 7))[2] != lam
    assert mixup_batch(x, y, 0.0, torch.Generator(), (5, 2, 7))[0] is x
    with pytest.raises(ValueError, match="mixup"):
        TrainConfig(mixup=-1)

    res = train(synth_cache, tmp_path / "mix", TrainConfig(epochs=4, seed=0, mixup=0.4, **FAST))
    assert res.metrics["val"]["roc_auc"] >= 0.7
    bundle = json.loads((res.out_dir / "bundle" / "bundle.json").read_text())
    assert bundle["recipe"]["settings"]["mixup"] == 0.4


def test_no_validation_trains_fixed_epochs(synth_cache, tmp_path):
    res = train(synth_cache, tmp_path / "nv", TrainConfig(epochs=2, limit=120, no_validation=True, **FAST))
    assert res.split["strategy"] == "none" and res.metrics["val"] is None
    assert [h["val_f1"] for h in res.history] == [None, None] and res.best_epoch == 2
    assert res.split["train_counts"]["all"] + res.split["train_counts"]["hem"] == 120


def test_augmentation_keeps_background_black_and_shapes():
    g = torch.Generator().manual_seed(0)
    u8 = torch.zeros(6, 32, 32, 3, dtype=torch.uint8)
    u8[:, 8:24, 10:22] = torch.tensor([150, 60, 170], dtype=torch.uint8)
    x = augment_batch(to_float01(u8), g)
    assert x.shape == (6, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    # Corners stay black: geometric transforms pad with black, colour changes are multiplicative,
    # noise is added to the cell only.
    assert float(x[:, :, :3, :3].abs().max()) == 0.0
    assert not torch.equal(x, augment_batch(to_float01(u8), torch.Generator().manual_seed(1)))


def test_normalisation_matches_the_rust_identity_rule():
    from leukedge.config import normalize_uint8

    cfg = PreprocessConfig(size=16)
    u8 = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    ours = normalize01(to_float01(torch.from_numpy(u8)), cfg).numpy()
    np.testing.assert_array_equal(ours, normalize_uint8(u8, cfg))


def test_cli_train_then_evaluate(synth_cache, tmp_path):
    from click.testing import CliRunner

    from leukedge.cli import main

    run = tmp_path / "cli_run"
    r = CliRunner().invoke(main, ["train", str(synth_cache), "-o", str(run), "--arch", "tiny", "--epochs", "1",
                                  "--limit", "120", "--resplit", "--threads", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (run / "bundle" / "bundle.json").is_file()
    r = CliRunner().invoke(main, ["evaluate", str(synth_cache), "--model", str(run / "bundle"), "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["synthetic"] is True and m["n_images"] == 480
    assert (tmp_path / "ev" / "training_curves.png").is_file()
    r = CliRunner().invoke(main, ["train", str(tmp_path / "ev"), "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "not a complete dataset cache" in r.output
