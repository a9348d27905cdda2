"""Synthetic C-NMC-like cells: layout, format, determinism and a real class difference."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from leukedge.cli.data import data_group
from leukedge.data import discover, is_synthetic, parse_name
from leukedge.synth import generate_dataset, make_cell, make_subject, render_cell, write_bmp, write_png


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.bmp"))}


def test_layout_names_and_markers(tmp_path):
    s = generate_dataset(tmp_path / "d", subjects=6, cells_per_subject=3, seed=5)
    assert s["n_images"] == 18 and s["classes"] == {"all": 12, "hem": 6}
    files = sorted((tmp_path / "d/C-NMC_Leukemia/training_data").rglob("*.bmp"))
    assert len(files) == 18
    for f in files:
        p = parse_name(f.name)
        assert p is not None and f.parent.name == p.class_name
        assert f.parent.parent.name in ("fold_0", "fold_1", "fold_2")
        assert p.subject.startswith("H") == (p.label == 0)
    assert (tmp_path / "d/.leukedge-synthetic").is_file()
    assert "SYNTHETIC" in (tmp_path / "d/SYNTHETIC.md").read_text()
    assert is_synthetic(files[0]) and is_synthetic(tmp_path / "d")
    recs = discover(tmp_path / "d")
    folds = {}
    for r in recs:
        folds.setdefault(r.subject, set()).add(r.fold)
    assert all(len(v) == 1 for v in folds.values())  # folds are subject-disjoint
    assert len({r.fold for r in recs}) == 3


def test_bmp_is_24bit_450_black_background(tmp_path):
    generate_dataset(tmp_path, subjects=2, cells_per_subject=2, seed=0)
    f = next(tmp_path.rglob("*.bmp"))
    raw = f.read_bytes()
    assert raw[:2] == b"BM" and len(raw) == 608454  # same size as a C-NMC file
    with Image.open(f) as im:
        assert im.format == "BMP" and im.mode == "RGB" and im.size == (450, 450)
        a = np.asarray(im)
    black = (a == 0).all(axis=2)
    assert 0.6 < black.mean() < 0.97  # mostly pure black, like C-NMC (76-91 %)
    fg = a[a.max(axis=2) > 10].astype(float).mean(axis=0)
    assert fg[1] < fg[0] and fg[1] < fg[2]  # purple: green absorbed most


def test_writers_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)  # odd width exercises BMP row padding
    write_bmp(tmp_path / "a.bmp", img)
    write_png(tmp_path / "a.png", img)
    for name in ("a.bmp", "a.png"):
        with Image.open(tmp_path / name) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), img)


def test_deterministic(tmp_path):
    generate_dataset(tmp_path / "a", subjects=3, cells_per_subject=2, seed=11)
    generate_dataset(tmp_path / "b", subjects=3, cells_per_subject=2, seed=11)
    generate_dataset(tmp_path / "c", subjects=3, cells_per_subject=2, seed=12)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db
    assert set(da.values()).isdisjoint(dc.values())
    assert np.array_equal(make_cell(1, seed=3, size=128), make_cell(1, seed=3, size=128))


def _features(img: np.ndarray) -> tuple[float, float]:
    fg = img.max(axis=2) > 10
    g = img[..., 1].astype(float)
    # fine texture: mean absolute difference of neighbouring foreground pixels
    both = fg[:, 1:] & fg[:, :-1]
    fine = np.abs(np.diff(g, axis=1))[both].mean()
    return float(fg.sum()), float(fine)


def test_classes_differ_but_overlap():
    areas = {0: [], 1: []}
    for label in (0, 1):
        for s in range(24):
            rng = np.random.default_rng([label, s])
            img = render_cell(label, rng, make_subject(label, rng))
            areas[label].append(_features(img)[0])
    a_all, a_hem = np.array(areas[1]), np.array(areas[0])
    assert a_all.mean() > 1.15 * a_hem.mean()  # blasts are larger
    # ...but not separable by size alone: the ranges overlap.
    assert a_all.min() < a_hem.max()


def test_cli_synth(tmp_path):
    res = CliRunner().invoke(data_group, ["synth", str(tmp_path / "o"), "--subjects", "3", "--cells-per-subject", "2", "--seed", "4",
                                          "--size", "128", "--format", "png"])
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "o").rglob("*.png"))
    assert len(files) == 6
    with Image.open(files[0]) as im:
        assert im.size == (128, 128)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, subjects=1, cells_per_subject=1)
    res = CliRunner().invoke(data_group, ["synth", str(tmp_path / "x"), "--subjects", "1"])
    assert res.exit_code != 0
