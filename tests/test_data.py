"""File-name parsing, discovery of the C-NMC layouts, leak-free splits and `leukedge data inspect`."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from leukedge.cli.data import data_group
from leukedge.data import (
    LeakageWarning,
    Record,
    assign_splits,
    discover,
    file_sha256,
    group_kfold,
    inspect_dataset,
    is_synthetic,
    normalize_subject,
    parse_name,
    subject_groups,
)
from leukedge.synth import make_cell, write_bmp, write_png


def split_records(records, **kwargs):
    """:func:`assign_splits` returning copies of ``records`` with ``split`` set."""
    return [dataclasses.replace(r, split=s) for r, s in zip(records, assign_splits(records, **kwargs))]

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/cnmc_sample"
needs_sample = pytest.mark.skipif(not (SAMPLE / "C-NMC_Leukemia").is_dir(), reason=f"real C-NMC sample not found at {SAMPLE}")


# -- names ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, subject, image, cell, cls, label",
    [
        ("UID_11_1_2_all.bmp", "11", 1, 2, "all", 1),
        ("UID_H10_2_1_hem.bmp", "H10", 2, 1, "hem", 0),
        ("UID_h3_2_1_hem.bmp", "H3", 2, 1, "hem", 0),
        ("UID_57_29_1_all.bmp", "57", 29, 1, "all", 1),
        ("UID_1_1_1_all.png", "1", 1, 1, "all", 1),
        ("UID_H1_1_1_hem.PNG", "H1", 1, 1, "hem", 0),
        ("/some/where/UID_H22_1_1_hem.bmp", "H22", 1, 1, "hem", 0),
    ],
)
def test_parse_name(name, subject, image, cell, cls, label):
    p = parse_name(name)
    assert p is not None
    assert (p.subject, p.image, p.cell, p.class_name, p.label) == (subject, image, cell, cls, label)


@pytest.mark.parametrize("name", ["1.bmp", "UID_1_1_all.bmp", "UID_X_1_1_all.bmp", "UID_1_1_1_foo.bmp", "cell.png", "UID_1_1_1_all.txt"])
def test_parse_name_rejects(name):
    assert parse_name(name) is None


def test_leukemic_and_normal_subjects_differ():
    assert parse_name("UID_1_1_1_all.bmp").subject != parse_name("UID_H1_1_1_hem.bmp").subject
    assert normalize_subject("h3") == normalize_subject("H3") == "H3"
    assert normalize_subject("3") == "3"


@needs_sample
def test_real_sample_names_and_discovery():
    recs = discover(SAMPLE)
    assert len(recs) == 52
    for r in recs:
        p = parse_name(r.path.name)
        assert p is not None, r.path
        assert r.label == p.label and r.class_name == r.path.parent.name
        assert r.fold == int(r.path.parent.parent.name.split("_")[1])
        assert r.layout == "kaggle" and r.split == "train"
    assert sum(r.label == 1 for r in recs) == 26 and sum(r.label == 0 for r in recs) == 26
    subjects = {r.subject for r in recs}
    assert len(subjects) == 26
    assert "H3" in subjects and "h3" not in subjects
    assert {"1", "H1"} <= subjects
    # Official folds are subject-disjoint.
    folds_of = {}
    for r in recs:
        folds_of.setdefault(r.subject, set()).add(r.fold)
    assert all(len(f) == 1 for f in folds_of.values())


# -- discovery --------------------------------------------------------------------------------
def _img(path: Path, label: int = 1, seed: int = 0, fmt: str = "bmp") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (write_bmp if fmt == "bmp" else write_png)(path, make_cell(label, seed=seed, size=64))
    return path


def test_discover_kaggle_layout_with_prelim_csv(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    _img(root / "training_data/fold_0/all/UID_1_1_1_all.bmp", 1, 1)
    _img(root / "training_data/fold_0/hem/UID_H1_1_1_hem.bmp", 0, 2)
    _img(root / "training_data/fold_2/hem/UID_h3_1_1_hem.bmp", 0, 3)
    val = root / "validation_data"
    _img(val / "C-NMC_test_prelim_phase_data/1.bmp", 1, 4)
    _img(val / "C-NMC_test_prelim_phase_data/2.bmp", 0, 5)
    _img(val / "C-NMC_test_prelim_phase_data/3.bmp", 0, 6)  # not in the CSV
    (val / "C-NMC_test_prelim_phase_data_labels.csv").write_text(
        "Patient_ID,new_names,labels\nUID_57_29_1_all.bmp,1.bmp,1\nUID_H49_2_1_hem.bmp,2.bmp,0\n"
    )
    _img(root / "testing_data/C-NMC_test_final_phase_data/1.bmp", 1, 7)

    recs = {str(r.path.relative_to(root)): r for r in discover(tmp_path)}
    assert len(recs) == 7
    a = recs["training_data/fold_0/all/UID_1_1_1_all.bmp"]
    assert (a.label, a.subject, a.fold, a.split, a.layout) == (1, "1", 0, "train", "kaggle")
    h = recs["training_data/fold_2/hem/UID_h3_1_1_hem.bmp"]
    assert (h.label, h.subject, h.fold) == (0, "H3", 2)
    p1 = recs["validation_data/C-NMC_test_prelim_phase_data/1.bmp"]
    assert (p1.label, p1.class_name, p1.subject, p1.split, p1.fold) == (1, "all", "57", "val", None)
    p2 = recs["validation_data/C-NMC_test_prelim_phase_data/2.bmp"]
    assert (p2.label, p2.subject) == (0, "H49")
    p3 = recs["validation_data/C-NMC_test_prelim_phase_data/3.bmp"]
    assert (p3.label, p3.subject, p3.class_name) == (-1, None, "unknown")
    t = recs["testing_data/C-NMC_test_final_phase_data/1.bmp"]
    assert (t.label, t.split) == (-1, "test")
    # The prelim folder given on its own still finds the labels next to it.
    only = discover(val / "C-NMC_test_prelim_phase_data")
    assert sorted((r.path.name, r.label) for r in only) == [("1.bmp", 1), ("2.bmp", 0), ("3.bmp", -1)]


def test_discover_original_layout(tmp_path):
    root = tmp_path / "C-NMC_training_data"
    _img(root / "fold_1/all/UID_5_1_1_all.bmp", 1)
    _img(root / "fold_1/hem/UID_H5_1_1_hem.bmp", 0)
    pre = tmp_path / "C-NMC_test_prelim_phase_data"
    _img(pre / "C-NMC_test_prelim_phase_data/10.bmp", 0)
    (pre / "C-NMC_test_prelim_phase_data_labels.csv").write_text("Patient_ID,new_names,labels\nUID_H30_1_1_hem.bmp,10.bmp,0\n")
    recs = {r.path.name: r for r in discover(tmp_path)}
    assert recs["UID_5_1_1_all.bmp"].layout == "original"
    assert (recs["UID_5_1_1_all.bmp"].fold, recs["UID_5_1_1_all.bmp"].split) == (1, "train")
    assert (recs["10.bmp"].label, recs["10.bmp"].subject, recs["10.bmp"].split, recs["10.bmp"].layout) == (0, "H30", "val", "original")


def test_discover_generic_glob_and_list(tmp_path):
    g = tmp_path / "generic"
    _img(g / "all/cell_a.png", 1, fmt="png")
    _img(g / "hem/cell_b.png", 0, fmt="png")
    _img(g / "Normal/cell_c.png", 0, fmt="png")
    _img(g / "weird/cell_d.png", 1, fmt="png")
    _img(g / "loose.png", 1, fmt="png")
    (g / "notes.md").write_text("not an image")
    recs = {r.path.name: r for r in discover(g)}
    assert set(recs) == {"cell_a.png", "cell_b.png", "cell_c.png", "cell_d.png", "loose.png"}
    assert (recs["cell_a.png"].label, recs["cell_a.png"].class_name, recs["cell_a.png"].layout) == (1, "all", "generic")
    assert (recs["cell_b.png"].label, recs["cell_b.png"].class_name) == (0, "hem")
    assert recs["cell_c.png"].label == 0
    assert (recs["cell_d.png"].label, recs["cell_d.png"].class_name) == (-1, "weird")
    assert (recs["loose.png"].label, recs["loose.png"].class_name) == (-1, "unknown")

    globbed = discover(str(g / "*" / "cell_*.png"))
    assert sorted(r.path.name for r in globbed) == ["cell_a.png", "cell_b.png", "cell_c.png", "cell_d.png"]
    assert {r.path.name: r.label for r in globbed}["cell_a.png"] == 1

    lst = tmp_path / "files.txt"
    lst.write_text("# my cells\ngeneric/all/cell_a.png\n\n" + str(g / "hem") + "\n")
    listed = discover(lst)
    assert sorted(r.path.name for r in listed) == ["cell_a.png", "cell_b.png"]
    assert all(r.layout == "list" for r in listed)
    assert {r.path.name: r.label for r in listed} == {"cell_a.png": 1, "cell_b.png": 0}

    # Same file reached twice is listed once; missing entries are clear errors.
    assert len(discover([g / "all", g / "all/cell_a.png"])) == 1
    with pytest.raises(FileNotFoundError, match="nope"):
        discover(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        discover(str(tmp_path / "*.jpeg"))


# -- splits -----------------------------------------------------------------------------------
def _fake_records(n_subjects: int, seed: int, dup_pairs: int = 0) -> list[Record]:
    rng = random.Random(seed)
    recs = []
    for s in range(n_subjects):
        label = 1 if s % 3 else 0
        subj = f"{s}" if label else f"H{s}"
        for c in range(rng.randint(1, 6)):
            recs.append(Record(path=Path(f"/x/{subj}_{c}.bmp"), label=label, class_name=("hem", "all")[label],
                               subject=subj, sha256=f"{s:04d}{c:04d}"))
    for _ in range(dup_pairs):  # byte-identical files under two subjects
        a, b = rng.sample(range(len(recs)), 2)
        recs[b].sha256 = recs[a].sha256
    return recs


def _sides(items, splits, key):
    sides = {}
    for it, s in zip(items, splits):
        sides.setdefault(key(it), set()).add(s)
    return sides


@settings(max_examples=40, deadline=None)
@given(n_subjects=st.integers(4, 30), seed=st.integers(0, 10_000), frac=st.floats(0.1, 0.5), dups=st.integers(0, 3))
@example(n_subjects=4, seed=1, frac=0.5, dups=3)  # duplicates link all four subjects into one group
def test_subject_split_never_leaks(n_subjects, seed, frac, dups):
    recs = _fake_records(n_subjects, seed, dups)
    if len(set(subject_groups(recs).tolist())) < 2:
        # duplicates linked every subject into one group: no leak-free split exists, and it says so
        with pytest.raises(ValueError, match="at least 2 subjects"):
            assign_splits(recs, strategy="subject", val_fraction=frac, seed=seed)
        return
    splits = assign_splits(recs, strategy="subject", val_fraction=frac, seed=seed)
    assert set(splits) <= {"train", "val"} and "val" in splits and "train" in splits
    assert all(len(v) == 1 for v in _sides(recs, splits, lambda r: r.subject).values())
    assert all(len(v) == 1 for v in _sides(recs, splits, lambda r: r.sha256).values())
    # Deterministic for a seed.
    assert splits == assign_splits(recs, strategy="subject", val_fraction=frac, seed=seed)


@settings(max_examples=25, deadline=None)
@given(n_subjects=st.integers(6, 30), seed=st.integers(0, 10_000), k=st.integers(2, 5))
def test_group_kfold_never_leaks(n_subjects, seed, k):
    recs = _fake_records(n_subjects, seed, dup_pairs=2)
    folds = group_kfold(recs, k=k, seed=seed)
    seen = np.concatenate([v for _, v in folds])
    assert sorted(seen.tolist()) == list(range(len(recs)))  # every item validated exactly once
    groups = subject_groups(recs)
    for tr, va in folds:
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(recs)
        assert not {recs[i].subject for i in tr} & {recs[i].subject for i in va}
        assert not set(groups[tr]) & set(groups[va])


def test_group_kfold_on_manifest_dicts():
    rows = [{"subject": r.subject, "label": r.label, "sha256": r.sha256, "path": str(r.path)} for r in _fake_records(12, 1)]
    for tr, va in group_kfold(rows, k=3, seed=0):
        assert not {rows[i]["subject"] for i in tr} & {rows[i]["subject"] for i in va}


def test_duplicates_link_subjects_in_splits():
    recs = _fake_records(10, 3)
    recs[0].sha256 = "same"
    other = next(r for r in recs if r.subject != recs[0].subject)
    other.sha256 = "same"
    groups = subject_groups(recs)
    assert groups[0] == groups[recs.index(other)]
    for seed in range(10):
        sp = assign_splits(recs, strategy="subject", val_fraction=0.3, seed=seed)
        assert len({sp[i] for i, r in enumerate(recs) if r.subject in (recs[0].subject, other.subject)}) == 1


def test_duplicate_files_on_disk_are_hashed_and_kept_together(tmp_path):
    a = _img(tmp_path / "all/UID_1_1_1_all.bmp", 1, 1)
    b = tmp_path / "all/UID_2_1_1_all.bmp"
    shutil.copy(a, b)
    for s in range(3, 9):
        _img(tmp_path / f"all/UID_{s}_1_1_all.bmp", 1, s)
        _img(tmp_path / f"hem/UID_H{s}_1_1_hem.bmp", 0, s + 100)
    recs = discover(tmp_path)
    for seed in range(6):
        sp = split_records(recs, strategy="subject", val_fraction=0.3, seed=seed)
        assert len({r.split for r in sp if r.subject in ("1", "2")}) == 1
    assert file_sha256(a) == file_sha256(b)


def test_image_level_split_warns():
    recs = _fake_records(10, 0)
    with pytest.warns(LeakageWarning, match="image-level"):
        splits = assign_splits(recs, strategy="image", seed=0)
    assert "val" in splits and "train" in splits
    # The default never splits by image, and does not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeakageWarning)
        assign_splits(recs, seed=0)


def test_fold_split_and_fixed_splits():
    recs = []
    for f in range(3):
        for s in range(4):
            recs.append(Record(path=Path(f"/x/{f}_{s}"), label=s % 2, subject=f"{f}-{s}", fold=f, split="train"))
    recs.append(Record(path=Path("/x/prelim"), label=1, subject="99", split="val"))
    recs.append(Record(path=Path("/x/final"), label=-1, split="test"))
    sp = assign_splits(recs, val_fold=1)
    assert [s for r, s in zip(recs, sp) if r.fold == 1] == ["val"] * 4
    assert [s for r, s in zip(recs, sp) if r.fold in (0, 2)] == ["train"] * 8
    assert sp[-2:] == ["val", "test"]
    assert assign_splits(recs)[:12] == ["train"] * 8 + ["val"] * 4  # auto: last fold
    with pytest.raises(ValueError, match="fold 7"):
        assign_splits(recs, strategy="fold", val_fold=7)
    with pytest.raises(ValueError, match="strategy"):
        assign_splits(recs, strategy="random")


def test_too_few_subjects_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 subjects"):
        assign_splits([Record(path=Path("/a"), label=1, subject="1", sha256="a")] * 3, strategy="subject")


# -- inspect ----------------------------------------------------------------------------------
def test_inspect_finds_duplicates_unreadable_and_synthetic(tmp_path):
    from leukedge.synth import generate_dataset

    generate_dataset(tmp_path / "syn", subjects=3, cells_per_subject=2, seed=0, size=96)
    root = tmp_path / "syn/C-NMC_Leukemia/training_data"
    files = sorted(root.rglob("*.bmp"))
    dup = files[0].parent / "UID_77_9_9_all.bmp"
    shutil.copy(files[0], dup)
    (files[0].parent / "UID_78_1_1_all.bmp").write_bytes(b"BM not really a bitmap")
    report = inspect_dataset([tmp_path / "syn"])
    assert report["synthetic"] is True
    assert report["n_images"] == 8
    assert [u["path"] for u in report["unreadable"]] == [str(files[0].parent / "UID_78_1_1_all.bmp")]
    assert len(report["duplicates"]) == 1 and sorted(report["duplicates"][0]["paths"]) == sorted([str(files[0]), str(dup)])
    assert any("identical files across subjects" in w for w in report["warnings"])
    assert report["classes"]["all"] == 6 and report["classes"]["hem"] == 2

    out = tmp_path / "r.json"
    res = CliRunner().invoke(data_group, ["inspect", str(tmp_path / "syn"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC" in res.output and "unreadable" in res.output
    assert json.loads(out.read_text())["n_images"] == 8


@needs_sample
def test_inspect_real_sample_cli():
    res = CliRunner().invoke(data_group, ["inspect", str(SAMPLE), "--no-decode"])
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC" not in res.output
    report = inspect_dataset([SAMPLE], check_decode=False)
    assert report["synthetic"] is False
    assert report["n_subjects"] == {"all": 13, "hem": 13}
    assert report["class_ratio_all_to_hem"] == 1.0
    assert report["unreadable"] == [] and not any("folds" in w for w in report["warnings"])


def test_is_synthetic(tmp_path):
    assert not is_synthetic(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "syn" / "deep").mkdir(parents=True)
    (tmp_path / "syn" / ".leukedge-synthetic").write_text("x")
    assert is_synthetic(tmp_path / "syn" / "deep") and is_synthetic(tmp_path / "syn")
    assert not is_synthetic(tmp_path / "real")
    (tmp_path / "real" / "cache.json").write_text(json.dumps({"synthetic": True}))
    assert is_synthetic(tmp_path / "real")


def test_webp_cells_are_discovered_inspected_and_watched(tmp_path):
    """Fold 1 of C-NMC is shared as WebP: discovery, `data inspect` and the station's default extensions take it."""
    from PIL import Image

    from leukedge._util import IMAGE_EXTENSIONS

    assert ".webp" in IMAGE_EXTENSIONS
    root = tmp_path / "C-NMC_Leukemia" / "training_data" / "fold_1"
    for cls, subj in (("all", "34"), ("hem", "H10")):
        (root / cls).mkdir(parents=True)
        Image.fromarray(make_cell(int(cls == "all"), size=96)).save(root / cls / f"UID_{subj}_1_1_{cls}.webp", lossless=True)
    recs = discover(tmp_path)
    assert sorted((r.subject, r.label, r.fold) for r in recs) == [("34", 1, 1), ("H10", 0, 1)]
    r = CliRunner().invoke(data_group, ["inspect", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "2" in r.output
