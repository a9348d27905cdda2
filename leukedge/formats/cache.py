"""The dataset cache of ``leukedge preprocess``: ``cache.json``, ``config.json``, ``manifest.csv``, ``images.npy``.

:func:`load_cache` / :class:`Cache` read it, :func:`read_manifest` / :func:`write_manifest` the manifest; the cache's
format version (:data:`CACHE_VERSION`), file names and manifest columns are defined here only.
:func:`load_config_source` reads the preprocessing of ``preprocess --config`` (a cache's ``config.json``, or the
``preprocess`` section of a ``bundle.json``, which may be a partial one).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._util import IMAGE_EXTENSIONS, path_text
from ..config import PreprocessConfig
from .bundle import META_FILE

CACHE_VERSION = 1
CACHE_META_FILE = "cache.json"
CACHE_CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.csv"
IMAGES_FILE = "images.npy"
MANIFEST_FIELDS = ("index", "path", "label", "class_name", "subject", "fold", "split", "status", "error", "sha256", "stain_fallback")


def _opt_int(v: str) -> int | None:
    v = (v or "").strip()
    return int(v) if v not in ("", "None") else None


def _opt_str(v: str) -> str | None:
    v = v if v is not None else ""
    return v if v not in ("", "None") else None


def _typed_row(row: dict[str, str], where: str = "manifest") -> dict[str, Any]:
    label = int(row["label"])
    if label not in (-1, 0, 1):  # it used to be an IndexError deep in training
        raise ValueError(f"{where}: row {row.get('index')}: label {label} is not -1 (unknown), 0 (hem) or 1 (all)")
    return {
        "index": int(row["index"]),
        "path": row["path"],
        "label": label,
        "class_name": row["class_name"],
        "subject": _opt_str(row["subject"]),
        "fold": _opt_int(row["fold"]),
        "split": _opt_str(row["split"]),
        "status": row["status"],
        "error": _opt_str(row["error"]),
        "sha256": _opt_str(row["sha256"]),
        "stain_fallback": str(row["stain_fallback"]).strip().lower() in ("1", "true", "yes"),
    }


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``manifest.csv`` into typed dicts (label/index int, fold int|None, stain_fallback bool)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(MANIFEST_FIELDS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks column(s) {', '.join(sorted(missing))}")
        return [_typed_row(r, str(path)) for r in reader]


def write_manifest(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(MANIFEST_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            row = {k: ("" if r.get(k) is None else r.get(k)) for k in MANIFEST_FIELDS}
            row["path"] = path_text(str(row["path"]))  # a name that is not UTF-8 (or holds a CR): escaped, readable
            w.writerow(row)


@dataclass
class Cache:
    """A loaded dataset cache. ``images`` is a read-only memmap ``(N, S, S, 3)`` uint8."""

    path: Path
    images: np.ndarray
    manifest: list[dict[str, Any]]
    config: PreprocessConfig
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def labels(self) -> np.ndarray:
        """int64 labels per row (1 = all, 0 = hem, -1 unknown)."""
        return np.array([r["label"] for r in self.manifest], dtype=np.int64)

    @property
    def subjects(self) -> list[str | None]:
        return [r["subject"] for r in self.manifest]

    @property
    def splits(self) -> list[str | None]:
        return [r["split"] for r in self.manifest]

    @property
    def folds(self) -> list[int | None]:
        return [r["fold"] for r in self.manifest]

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self.manifest]

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic", False))

    @property
    def pixel_hash(self) -> str:
        return self.config.pixel_hash()

    def ok_indices(self) -> np.ndarray:
        """Indices of rows that were processed successfully."""
        return np.array([i for i, r in enumerate(self.manifest) if r["status"] == "ok"], dtype=np.int64)

    def indices(self, split: str | None = None, *, ok: bool = True, labelled: bool = False) -> np.ndarray:
        """Row indices filtered by split ("train"/"val"/"test"; None = any), status ok, label known."""
        out = []
        for i, r in enumerate(self.manifest):
            if split is not None and r["split"] != split:
                continue
            if ok and r["status"] != "ok":
                continue
            if labelled and r["label"] not in (0, 1):
                continue
            out.append(i)
        return np.array(out, dtype=np.int64)


def read_cache_object(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object of ``folder/cache.json`` as it is, unchecked (None when missing, unreadable or not an
    object): for a glance at one key of something that may not be a cache at all (``is_synthetic``). Caches are
    opened with :func:`load_cache`."""
    try:
        d = json.loads((Path(folder) / CACHE_META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _holds_images(folder: Path, limit: int = 2000) -> bool:
    """Whether an image file is among the first ``limit`` entries found under ``folder`` (a bounded look)."""
    for n, (_, _, files) in enumerate(os.walk(folder)):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files) or n >= limit:
            return n < limit
    return False


def _not_a_cache(p: Path) -> str:
    """Why ``p`` cannot be loaded as a cache, and the command that makes one (never one that writes into an
    image folder)."""
    if p.is_dir() and not any((p / f).exists() for f in ("metrics.json", META_FILE, IMAGES_FILE)) and _holds_images(p):
        return (f"{p} holds images, not a complete dataset cache: preprocess them first, e.g. "
                f"`leukedge preprocess {p} -o {p.name or 'data'}_cache`, then train on {p.name or 'data'}_cache")
    if p.is_dir() and (p / IMAGES_FILE).exists():
        return f"{p}: not a complete dataset cache (no cache.json: the preprocessing run was interrupted); run it again"
    return f"{p}: not a complete dataset cache (no cache.json); make one with `leukedge preprocess IMAGES -o {p}`"


def load_cache(path: str | os.PathLike) -> Cache:
    """Load a dataset cache folder (or its ``cache.json``) written by ``leukedge preprocess``.

    Raises ``FileNotFoundError`` for a folder without ``cache.json`` (not a cache, or an interrupted
    run) and ``ValueError`` when the files disagree with each other.
    """
    p = Path(path)
    if p.is_file() and p.name == CACHE_META_FILE:
        p = p.parent
    meta_file = p / CACHE_META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(_not_a_cache(p))
    meta = json.loads(meta_file.read_text())
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{p}: cache version {meta.get('version')!r} is not this leukedge's ({CACHE_VERSION}); "
                         f"run `leukedge preprocess` again to rebuild it")
    config = PreprocessConfig.load(p / CACHE_CONFIG_FILE)
    manifest = read_manifest(p / MANIFEST_FILE)
    images = np.load(p / IMAGES_FILE, mmap_mode="r")
    if images.ndim != 4 or images.shape[0] != len(manifest) or images.shape[1:] != (config.size, config.size, 3) or images.dtype != np.uint8:
        raise ValueError(
            f"{p}: images.npy {images.shape} {images.dtype} does not match manifest ({len(manifest)} rows) "
            f"and config size {config.size}"
        )
    if meta.get("pixel_hash") != config.pixel_hash():
        raise ValueError(f"{p}: cache.json pixel_hash does not match config.json; the cache was modified by hand")
    return Cache(path=p, images=images, manifest=manifest, config=config, meta=meta)


def load_config_source(path: str | os.PathLike) -> PreprocessConfig:
    """Read a PreprocessConfig from a ``config.json``, a ``bundle.json`` (its ``"preprocess"`` key),
    a model bundle folder or a dataset cache folder."""
    p = Path(path)
    if p.is_dir():
        for name in (META_FILE, CACHE_CONFIG_FILE):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise ValueError(f"{path}: folder holds neither bundle.json nor config.json")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: cannot read a preprocessing config: {exc}") from exc
    if isinstance(d, dict) and isinstance(d.get("preprocess"), dict):
        d = d["preprocess"]
    try:
        return PreprocessConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{p}: not a valid preprocessing config: {exc}") from exc
