"""Measure the cell quality gate (issue 25): the foreground of real cells, and what the gate rejects.

For every real cell (the 52 sample cells and, when present, a real fold such as
``../shared/data/cnmc_fold0``) it records the foreground share of the frame (mask of the stain config:
max(R, G, B) > 10) and how many border pixels are foreground, and runs the Rust pipeline with the
default gate. It also generates junk frames (black, white, grey, noise, 1x1, debris specks, small clumps,
half and quarter cells cut by the edge, at several sizes) and reports the share of them rejected.

    python benchmarks/gate_bounds.py [--fold DIR ...] [-o benchmarks/results/gate_bounds.json]

Writes the numbers quoted in ``rust_ext/src/config.rs`` (``GATE_DEFAULT``) and ``docs/reliability.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from leukedge.config import PreprocessConfig  # noqa: E402
from leukedge.synth import make_cell  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def real_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".bmp", ".png"))


def measure(paths: list[Path], native) -> dict:
    cfg = PreprocessConfig(size=32, stain=PreprocessConfig().stain.__class__(method="none"))
    pipe = cfg.pipeline()
    areas, borders, rejected = [], [], []
    for i in range(0, len(paths), 64):
        chunk = paths[i:i + 64]
        for p in chunk:
            a = native.decode(str(p))
            fg = a.max(axis=2) > 10
            areas.append(float(fg.mean()))
            b = np.concatenate([fg[0], fg[-1], fg[1:-1, 0], fg[1:-1, -1]])
            borders.append(int(b.sum()))
        _, st = pipe.run([str(p) for p in chunk], threads=2)
        rejected += [(str(p.name), s["rejected"]) for p, s in zip(chunk, st) if s["rejected"]]
    a, b = np.array(areas), np.array(borders)
    return {"n": len(paths), "area_percentiles": dict(zip(["min", "p0.1", "p1", "p50", "p99", "p99.9", "max"],
                                                          np.percentile(a, [0, 0.1, 1, 50, 99, 99.9, 100]).round(4).tolist())),
            "touching_border": int((b > 0).sum()), "max_border_pixels": int(b.max()), "n_rejected": len(rejected),
            "share_rejected": len(rejected) / max(len(paths), 1), "rejected": rejected[:20]}


def junk(size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cell = make_cell(seed % 2, seed=seed, size=size)

    def blob(r: float, cy: float, cx: float) -> np.ndarray:
        img = np.zeros((size, size, 3), np.uint8)
        img[np.hypot(yy - cy, xx - cx) < r] = rng.integers(60, 220, 3)
        return img

    half = np.zeros_like(cell)
    half[:, : size // 2] = cell[:, size // 2:]
    quarter = np.zeros_like(cell)
    quarter[: size // 2, : size // 2] = cell[size // 2:, size // 2:]
    return {
        "black": np.zeros((size, size, 3), np.uint8),
        "white": np.full((size, size, 3), 255, np.uint8),
        "grey": np.full((size, size, 3), int(rng.integers(20, 240)), np.uint8),
        "noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "dark_noise": rng.integers(0, 40, (size, size, 3), dtype=np.uint8),
        "one_pixel": rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
        "debris_speck": blob(size * 0.012, size / 2, size / 3),
        "small_clump": blob(size * 0.06, size / 3, size / 2),
        "half_cell": half,
        "quarter_cell": quarter,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fold", type=Path, action="append", default=None)
    ap.add_argument("-o", "--output", type=Path, default=REPO / "benchmarks" / "results" / "gate_bounds.json")
    a = ap.parse_args()
    from leukedge._util import load_native

    native = load_native()
    out: dict = {"gate": PreprocessConfig().gate.__dict__}
    sets = {"cnmc_sample": DATA / "cnmc_sample"}
    for f in a.fold or [DATA / "cnmc_fold0"]:
        sets[f.name] = f
    for name, folder in sets.items():
        files = real_files(folder)
        if files:
            out[name] = measure(files, native)
            print(name, {k: v for k, v in out[name].items() if k != "rejected"}, flush=True)
    pipe = PreprocessConfig(size=32).pipeline()
    kinds: dict[str, list[bool]] = {}
    for size in (96, 160, 450, 600):
        for seed in range(5):
            frames = junk(size, seed)
            _, st = pipe.run(list(frames.values()))
            for k, s in zip(frames, st):
                kinds.setdefault(k, []).append(bool(s["rejected"]))
    out["junk"] = {k: {"n": len(v), "share_rejected": sum(v) / len(v)} for k, v in kinds.items()}
    allj = [x for v in kinds.values() for x in v]
    out["junk_total"] = {"n": len(allj), "share_rejected": sum(allj) / len(allj)}
    print("junk", out["junk_total"], {k: v["share_rejected"] for k, v in out["junk"].items()})
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
