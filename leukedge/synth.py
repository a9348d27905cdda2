"""Deterministic synthetic C-NMC-like single-cell images (for demos and tests, never for claims).

Each image is one purple (hematoxylin/eosin-like, rendered through Beer-Lambert optical
densities) lymphocyte-like cell on a pure black background, like C-NMC 2019's segmented cells.
The two classes differ in plausible but overlapping morphology:

- ``all`` (leukemic blast): larger, higher nuclear/cytoplasm ratio, finer open chromatin,
  more irregular (sometimes cleft) nuclear outline, often visible nucleoli.
- ``hem`` (normal): smaller, rounder, coarser and darker clumped chromatin, more eccentric nucleus.

About 5 % of the cells of each class are drawn with the other class's morphology (keeping
their subject's stain), like the ambiguous cells of the real data, so no model reaches 1.0.

Every subject (patient) has its own stain (stain vectors, intensities, illumination; modest, as
the real C-NMC images are already stain-normalised) and its own shift of the morphology, so a patient-disjoint split is genuinely harder than an image-level
one, as in the real data set. The same ``seed`` always gives byte-identical files.

Public API:

- :func:`generate_dataset` ``(out, subjects=12, cells_per_subject=20, seed=0, ...) -> dict``: Kaggle layout
  ``OUT/C-NMC_Leukemia/training_data/fold_k/{all,hem}/UID_<subj>_<img>_<cell>_<all|hem>.bmp`` plus
  ``OUT/SYNTHETIC.md`` and the ``OUT/.leukedge-synthetic`` marker (see ``leukedge.data.is_synthetic``).
- :func:`make_subject` ``(label, rng) -> SubjectStyle`` and :func:`render_cell` ``(label, rng, subject, size=450) -> uint8 HxWx3``.
- :func:`make_cell` ``(label, seed=0, size=450) -> uint8 HxWx3``: one cell, e.g. for a station demo.
- :func:`write_bmp` / :func:`write_png`: dependency-free image writers.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ._util import CLASS_NAMES
from ._version import __version__
from .data.discover import SYNTHETIC_MARKER

# torchstain's reference H&E optical-density vectors (columns of the Macenko reference matrix).
_H_REF = np.array([0.5626, 0.7201, 0.4062])
_E_REF = np.array([0.2159, 0.8012, 0.5581])
_N_ANGLES = 720
# Share of cells drawn with the other class's morphology (label noise-like ambiguity).
ATYPICAL_FRACTION = 0.05


@dataclass(frozen=True)
class SubjectStyle:
    """Per-subject (patient) stain and morphology offsets."""

    h_vec: tuple[float, float, float]
    e_vec: tuple[float, float, float]
    io: float  # illumination
    h_scale: float  # hematoxylin uptake
    e_scale: float  # eosin uptake
    radius: float  # mean cell radius for this subject (px at 450x450)
    nuc_frac: float  # mean nucleus radius / cell radius
    texture_scale: float  # chromatin grain size multiplier


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.abs(v)
    return v / np.linalg.norm(v)


def make_subject(label: int, rng: np.random.Generator) -> SubjectStyle:
    """Draw a subject's stain and morphology (``label`` 1 = all, 0 = hem)."""
    h = _unit(_H_REF + rng.normal(0.0, 0.02, 3))
    e = _unit(_E_REF + rng.normal(0.0, 0.03, 3))
    if label == 1:
        radius, nuc = rng.normal(104.0, 6.0), rng.normal(0.87, 0.02)
    else:
        radius, nuc = rng.normal(93.0, 6.0), rng.normal(0.76, 0.02)
    return SubjectStyle(
        h_vec=(float(h[0]), float(h[1]), float(h[2])),
        e_vec=(float(e[0]), float(e[1]), float(e[2])),
        io=float(rng.uniform(232.0, 248.0)),
        h_scale=float(rng.uniform(0.92, 1.08)),
        e_scale=float(rng.uniform(0.9, 1.1)),
        radius=float(radius),
        nuc_frac=float(nuc),
        texture_scale=float(rng.uniform(0.9, 1.1)),
    )


def _outline(rng: np.random.Generator, roughness: float, kmax: int, elong: float) -> np.ndarray:
    """Relative radius r(theta) on ``_N_ANGLES`` angles: 1 + ellipse + random harmonics."""
    theta = np.linspace(-np.pi, np.pi, _N_ANGLES, endpoint=False)
    r = 1.0 + elong * np.cos(2.0 * (theta - rng.uniform(0, np.pi)))
    for k in range(3, kmax + 1):
        r += rng.normal(0.0, roughness / np.sqrt(k)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r


def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Smooth zero-mean, unit-variance noise with features about ``cell_px`` pixels wide."""
    h, w = shape
    gh, gw = int(np.ceil(h / cell_px)) + 2, int(np.ceil(w / cell_px)) + 2
    grid = rng.standard_normal((gh, gw))
    y = np.arange(h) / cell_px + rng.uniform(0, 1)
    x = np.arange(w) / cell_px + rng.uniform(0, 1)
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = y - y0, x - x0
    fy = fy * fy * (3 - 2 * fy)
    fx = fx * fx * (3 - 2 * fx)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bot = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    n = top * (1 - fy)[:, None] + bot * fy[:, None]
    return (n - n.mean()) / (n.std() + 1e-9)


def render_cell(label: int, rng: np.random.Generator, subject: SubjectStyle, size: int = 450) -> np.ndarray:
    """Render one cell of class ``label`` (1 = all, 0 = hem) as a ``(size, size, 3)`` uint8 image
    with an exactly black (0,0,0) background.

    Long on purpose: one drawing recipe (shape, nucleus, texture, stain) whose order of random draws
    defines the generated bytes (same seed, same image); split into steps, that order would be hidden."""
    # A minority of cells looks like the other class (as in the real data, where many cells are
    # ambiguous even to experts): this caps the achievable score below 1.0.
    atypical = rng.random() < ATYPICAL_FRACTION
    blast = (label == 1) != atypical
    scale = size / 450.0
    shift = 0.0 if not atypical else (10.0 if blast else -10.0)
    nf_shift = 0.0 if not atypical else (0.08 if blast else -0.08)
    R = float(np.clip(rng.normal(subject.radius + shift, 9.0), 58.0, 150.0)) * scale
    nf = float(np.clip(rng.normal(subject.nuc_frac + nf_shift, 0.045), 0.6, 0.95))

    cell_r = _outline(rng, 0.035 if blast else 0.022, 6, rng.uniform(0.0, 0.12))
    nuc_r = _outline(rng, 0.06 if blast else 0.03, 9, rng.uniform(0.0, 0.10 if blast else 0.08))
    if blast and rng.random() < 0.35:  # nuclear cleft / notch
        theta = np.linspace(-np.pi, np.pi, _N_ANGLES, endpoint=False)
        c, wdt = rng.uniform(-np.pi, np.pi), rng.uniform(0.12, 0.3)
        d = np.angle(np.exp(1j * (theta - c)))
        nuc_r = nuc_r - rng.uniform(0.1, 0.25) * np.exp(-0.5 * (d / wdt) ** 2)

    half = int(np.ceil(R * 1.35)) + 4
    cy = size / 2 + rng.normal(0.0, 10.0 * scale)
    cx = size / 2 + rng.normal(0.0, 10.0 * scale)
    y0, y1 = max(0, int(cy) - half), min(size, int(cy) + half)
    x0, x1 = max(0, int(cx) - half), min(size, int(cx) + half)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    rho = np.hypot(dy, dx)
    ang_idx = ((np.arctan2(dy, dx) + np.pi) * (_N_ANGLES / (2 * np.pi))).astype(np.int64) % _N_ANGLES
    cell_a = np.clip(R * cell_r[ang_idx] - rho + 0.5, 0.0, 1.0)

    # Nucleus: offset from the cell centre (more eccentric in normal lymphocytes).
    rn = R * nf
    off = (R - rn) * rng.uniform(0.1, 0.6 if blast else 0.95)
    phi = rng.uniform(-np.pi, np.pi)
    ny, nx = dy - off * np.sin(phi), dx - off * np.cos(phi)
    nrho = np.hypot(ny, nx)
    nidx = ((np.arctan2(ny, nx) + np.pi) * (_N_ANGLES / (2 * np.pi))).astype(np.int64) % _N_ANGLES
    nuc_a = np.clip((rn * nuc_r[nidx] - nrho) / 2.5 + 0.5, 0.0, 1.0) * cell_a

    shape = rho.shape
    ts = subject.texture_scale * scale
    if blast:  # fine, open chromatin
        fine, coarse, h_nuc = rng.uniform(0.07, 0.12), rng.uniform(0.02, 0.07), 1.8
    else:  # coarse, clumped, darker chromatin
        fine, coarse, h_nuc = rng.uniform(0.03, 0.07), rng.uniform(0.09, 0.16), 1.9
    tex = fine * _value_noise(rng, shape, 3.5 * ts) + coarse * _value_noise(rng, shape, 10.0 * ts)
    h_nuc *= rng.normal(1.0, 0.05)
    H = nuc_a * h_nuc * (1.0 + tex) + (cell_a - nuc_a) * rng.uniform(0.8, 1.15) * (1 + 0.08 * _value_noise(rng, shape, 6 * ts))
    E = cell_a * rng.uniform(0.85, 1.1) + (cell_a - nuc_a) * 0.15

    # Nucleoli: lighter round spots in blasts, rare and faint in normal cells.
    n_nucleoli = rng.poisson(1.6) if blast else int(rng.random() < 0.12)
    for _ in range(n_nucleoli):
        a = rng.uniform(-np.pi, np.pi)
        rr = rn * np.sqrt(rng.uniform(0.0, 0.45))
        sy, sx = off * np.sin(phi) + rr * np.sin(a), off * np.cos(phi) + rr * np.cos(a)
        sr = rng.uniform(4.0, 8.0) * scale * (1.0 if blast else 0.7)
        spot = np.exp(-0.5 * (((dy - sy) ** 2 + (dx - sx) ** 2) / (sr * sr)))
        H = H * (1.0 - rng.uniform(0.3, 0.45) * (1.0 if blast else 0.5) * spot * nuc_a)

    H = np.maximum(H, 0.0) * subject.h_scale
    E = np.maximum(E, 0.0) * subject.e_scale
    od = H[..., None] * np.asarray(subject.h_vec) + E[..., None] * np.asarray(subject.e_vec)
    rgb = subject.io * np.exp(-od)
    rgb += rng.normal(0.0, 1.5, rgb.shape)  # sensor noise
    rgb *= cell_a[..., None]
    crop = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    # Segmentation: everything outside the (hard) mask is exactly black, as in C-NMC.
    crop[cell_a < 0.5] = 0
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[y0:y1, x0:x1] = crop
    return img


def make_cell(label: int, seed: int = 0, size: int = 450) -> np.ndarray:
    """One synthetic cell from its own subject, deterministic in ``(label, seed)``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, label, 7919]))
    return render_cell(label, rng, make_subject(label, rng), size=size)


# ---------------------------------------------------------------------------------------------
# Writers (no Pillow needed; byte-identical for identical pixels)
# ---------------------------------------------------------------------------------------------
def write_bmp(path: str | Path, rgb: np.ndarray) -> None:
    """Write a 24-bit BGR bottom-up Windows BMP (the C-NMC format)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    row = w * 3
    pad = (4 - row % 4) % 4
    data = np.zeros((h, row + pad), dtype=np.uint8)
    data[:, :row] = rgb[::-1, :, ::-1].reshape(h, row)
    size = 54 + data.size
    header = struct.pack("<2sIHHI", b"BM", size, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, data.size, 2835, 2835, 0, 0)
    with open(path, "wb") as f:
        f.write(header + info + data.tobytes())


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB image encoded as PNG bytes."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = np.zeros((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 1:] = rgb.reshape(h, w * 3)

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return png + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b"")


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an 8-bit RGB PNG."""
    with open(path, "wb") as f:
        f.write(encode_png(rgb))


_README = """# SYNTHETIC DATA - not real cells

This folder was generated by `leukedge data synth` (leukedge {version}) with
`--subjects {subjects} --cells-per-subject {cells} --seed {seed} --all-fraction {frac:.3f} --folds {folds} --size {size}`.

The images imitate the C-NMC 2019 layout and look (one purple-stained cell on pure black,
file names `UID_<subject>_<image>_<cell>_<all|hem>`), but every cell is drawn by a random
generator. "all" cells are made larger, with a higher nuclear/cytoplasm ratio, finer chromatin,
more irregular nuclei and nucleoli; "hem" cells smaller, rounder, with coarser, darker chromatin.
Each subject has its own stain and morphology offsets.

Results obtained on this data say only that the software runs; they say NOTHING about
leukemia detection. Every leukedge report made from it is marked SYNTHETIC.
The marker file `.leukedge-synthetic` lets tools detect this (`leukedge.data.is_synthetic`).

{n_all} all + {n_hem} hem images from {n_all_subj} leukemic and {n_hem_subj} normal subjects.
"""


def _subjects_and_folds(subjects: int, all_fraction: float, folds: int, seed: int) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """``[(subject, label)]`` (leukemic ``1..n_all`` first, then ``H1..``) and each subject's fold, class-balanced."""
    n_all = int(min(max(round(subjects * all_fraction), 1), subjects - 1))
    subj_list = [(str(i + 1), 1) for i in range(n_all)] + [(f"H{i + 1}", 0) for i in range(subjects - n_all)]
    order = np.random.default_rng(np.random.SeedSequence([seed, 104729])).permutation
    fold_of: dict[str, int] = {}
    for lab in (1, 0):
        names = [s for s, lbl in subj_list if lbl == lab]
        for j, k in enumerate(order(len(names))):
            fold_of[names[int(k)]] = j % folds
    return subj_list, fold_of


def generate_dataset(
    out: str | Path,
    subjects: int = 12,
    cells_per_subject: int = 20,
    seed: int = 0,
    *,
    all_fraction: float = 2 / 3,
    folds: int = 3,
    size: int = 450,
    fmt: str = "bmp",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write a synthetic data set in the Kaggle C-NMC layout under ``out``.

    Subjects ``1..n_all`` are leukemic, ``H1..H{n_hem}`` normal (``n_all = round(subjects * all_fraction)``,
    at least one of each); subjects are spread over ``folds`` subject-disjoint ``fold_k`` folders.
    Cell ``i`` of a subject is written as image ``i // 2 + 1``, cell ``i % 2 + 1``.
    Returns ``{"root", "n_images", "n_subjects", "classes", "subjects", "paths"}``.
    """
    if subjects < 2:
        raise ValueError("need at least 2 subjects (one leukemic, one normal)")
    if fmt not in ("bmp", "png"):
        raise ValueError(f"format {fmt!r} is not bmp or png")
    out = Path(out)
    subj_list, fold_of = _subjects_and_folds(subjects, all_fraction, folds, seed)
    n_all = sum(lab for _, lab in subj_list)
    n_hem = subjects - n_all
    root = out / "C-NMC_Leukemia" / "training_data"
    out.mkdir(parents=True, exist_ok=True)
    (out / SYNTHETIC_MARKER).write_text("synthetic data generated by leukedge data synth\n")
    writer = write_bmp if fmt == "bmp" else write_png
    paths: list[str] = []
    counts = {name: 0 for name in CLASS_NAMES}
    for si, (subj, lab) in enumerate(subj_list):
        srng = np.random.default_rng(np.random.SeedSequence([seed, si, 1]))
        style = make_subject(lab, srng)
        cls = CLASS_NAMES[lab]
        d = root / f"fold_{fold_of[subj]}" / cls
        d.mkdir(parents=True, exist_ok=True)
        for ci in range(cells_per_subject):
            rng = np.random.default_rng(np.random.SeedSequence([seed, si, 2, ci]))
            img = render_cell(lab, rng, style, size=size)
            p = d / f"UID_{subj}_{ci // 2 + 1}_{ci % 2 + 1}_{cls}.{fmt}"
            writer(p, img)
            paths.append(str(p))
            counts[cls] += 1
            if progress is not None:
                progress(1)
    (out / "SYNTHETIC.md").write_text(_README.format(
        version=__version__, subjects=subjects, cells=cells_per_subject, seed=seed, frac=all_fraction, folds=folds,
        size=size, n_all=counts["all"], n_hem=counts["hem"], n_all_subj=n_all, n_hem_subj=n_hem))
    return {
        "root": str(out),
        "n_images": len(paths),
        "n_subjects": subjects,
        "classes": counts,
        "subjects": {s: {"label": lbl, "fold": fold_of[s]} for s, lbl in subj_list},
        "paths": paths,
    }
