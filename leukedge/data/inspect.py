"""Summaries of a data set and pixel digests of cells.

- :func:`inspect_dataset` ``(paths) -> dict``: counts per split/fold/class/subject, class ratio, unreadable
  files, exact duplicates and leaks (``leukedge data inspect``).
- :func:`pixel_digest` / :func:`pixel_digests`: sha256 of a cell's decoded pixels (``trained_on.txt``).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._util import CLASS_NAMES, POSITIVE_CLASS, file_sha256, load_native, subject_sort_key
from .discover import Record, discover, is_glob_pattern, is_synthetic

NEGATIVE_CLASS = CLASS_NAMES[0]

def _readability_checker() -> tuple[str, Any] | None:
    """(name, check(path) -> None | reason): the Rust decoder if built, else a Pillow header check."""
    native = load_native(required=False)
    if native is not None:
        def check(path: Path) -> None:
            native.decode(str(path))

        return "leukedge._native.decode", check
    try:
        from PIL import Image
    except ImportError:
        return None

    def check_pil(path: Path) -> None:
        with Image.open(path) as im:
            im.verify()

    return "Pillow header check", check_pil


def _check_readable(path: Path, check: Any) -> str | None:
    """None if ``check`` accepts the image, else the reason."""
    try:
        check(path)
        return None
    except Exception as exc:  # noqa: BLE001 - every failure is a finding, never a crash
        return f"{type(exc).__name__}: {exc}"


def _count_records(records: Sequence[Record]) -> tuple[Counter, Counter, Counter, dict[str, dict[str, Any]]]:
    """Images per (split, fold, class), per class, per layout, and per subject (with its classes, folds, splits)."""
    by_cell: Counter[tuple[str, str, str]] = Counter()
    classes: Counter[str] = Counter()
    layouts: Counter[str] = Counter()
    subj: dict[str, dict[str, Any]] = {}
    for r in records:
        by_cell[(r.split or "-", "-" if r.fold is None else str(r.fold), r.class_name)] += 1
        classes[r.class_name] += 1
        layouts[r.layout] += 1
        if r.subject is not None:
            s = subj.setdefault(r.subject, {"subject": r.subject, "classes": Counter(), "images": 0, "folds": set(), "splits": set()})
            s["images"] += 1
            s["classes"][r.class_name] += 1
            if r.fold is not None:
                s["folds"].add(r.fold)
            if r.split:
                s["splits"].add(r.split)
    return by_cell, classes, layouts, subj


def _duplicates(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Groups of byte-identical files (same sha256), with their subjects and labels."""
    dup_groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.sha256:
            dup_groups[r.sha256].append(r)
    return [
        {"sha256": h, "paths": [str(r.path) for r in rs], "subjects": sorted({r.subject or "?" for r in rs}),
         "labels": sorted({r.label for r in rs})}
        for h, rs in sorted(dup_groups.items()) if len(rs) > 1
    ]


def _inspection_warnings(subj: dict[str, dict[str, Any]], duplicates: list[dict[str, Any]]) -> list[str]:
    """Leaks: a subject in several folds or classes, identical files across subjects or labels."""
    warnings_out: list[str] = []
    for s in subj.values():
        if len(s["folds"]) > 1:
            warnings_out.append(f"subject {s['subject']} appears in folds {sorted(s['folds'])} (folds should be subject-disjoint)")
        if len(s["classes"]) > 1:
            warnings_out.append(f"subject {s['subject']} has cells of several classes: {dict(s['classes'])}")
    for d in duplicates:
        if len(d["subjects"]) > 1:
            warnings_out.append(f"identical files across subjects {d['subjects']}: {', '.join(d['paths'])}")
        if len(d["labels"]) > 1:
            warnings_out.append(f"identical files with different labels: {', '.join(d['paths'])}")
    return warnings_out


def inspect_dataset(paths: Sequence[str | os.PathLike], *, check_decode: bool = True, threads: int = 0) -> dict[str, Any]:
    """Summarise a data set: counts per split/fold/class/subject, class ratio, unreadable files,
    exact duplicates (sha256) and leaks (a subject in two folds, a duplicate across subjects).
    Returns a JSON-serialisable dict."""
    records = discover(paths)
    workers = threads or min(8, os.cpu_count() or 1)
    checker = _readability_checker() if check_decode else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes = list(pool.map(lambda r: _safe_sha(r.path), records))
        if checker is not None:
            problems = list(pool.map(lambda r: _check_readable(r.path, checker[1]), records))
        else:
            problems = [None] * len(records)
    for r, h in zip(records, hashes):
        r.sha256 = h

    by_cell, classes, layouts, subj = _count_records(records)
    duplicates = _duplicates(records)
    warnings_out = _inspection_warnings(subj, duplicates)
    n_all, n_hem = classes.get(POSITIVE_CLASS, 0), classes.get(NEGATIVE_CLASS, 0)
    unreadable = [{"path": str(r.path), "error": e} for r, e in zip(records, problems) if e]
    unreadable += [{"path": str(r.path), "error": "cannot read file"} for r, h, e in zip(records, hashes, problems) if h is None and not e]
    roots = [str(p) for p in paths]
    return {
        "roots": roots,
        "synthetic": any(is_synthetic(p) for p in paths if not is_glob_pattern(os.fspath(p))) or (bool(records) and is_synthetic(records[0].path)),
        "n_images": len(records),
        "layouts": dict(layouts),
        "classes": dict(classes),
        "class_ratio_all_to_hem": (n_all / n_hem) if n_hem else None,
        "by_split_fold_class": [
            {"split": k[0], "fold": k[1], "class": k[2], "images": v} for k, v in sorted(by_cell.items())
        ],
        "subjects": [
            {"subject": s["subject"], "class": "/".join(sorted(s["classes"])), "images": s["images"],
             "folds": sorted(s["folds"]), "splits": sorted(s["splits"])}
            for s in sorted(subj.values(), key=lambda s: subject_sort_key(s["subject"]))
        ],
        "n_subjects": {c: sum(1 for s in subj.values() if c in s["classes"]) for c in sorted(classes)},
        "unlabelled": sum(1 for r in records if r.label == -1),
        "no_subject": sum(1 for r in records if r.subject is None),
        "decode_check": checker[0] if checker else "none",
        "unreadable": unreadable,
        "duplicates": duplicates,
        "warnings": warnings_out,
    }


def pixel_digest(image: str | os.PathLike | np.ndarray) -> str:
    """sha256 of an image's decoded pixels: the RGB bytes (H x W x 3 uint8, row-major) that the Rust core's
    ``decode`` gives. Unlike a file hash it identifies the *cell* whatever the container (BMP, PNG, a renamed
    or re-saved copy), which is what "the model has seen this cell" means (``trained_on.txt`` of a bundle)."""
    arr = image if isinstance(image, np.ndarray) else load_native().decode(str(image))
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.uint8).tobytes()).hexdigest()


def pixel_digests(paths: Sequence[str | os.PathLike], threads: int = 0,
                  progress: Any = None) -> dict[str, str | None]:
    """:func:`pixel_digest` of many files (threads: the Rust decode releases the GIL); None for a file that
    does not decode. ``progress(n)`` is called as files finish."""
    def one(p: str | os.PathLike) -> str | None:
        try:
            return pixel_digest(p)
        except (OSError, ValueError, RuntimeError):  # undecodable: no digest (reported by the caller)
            return None
        finally:
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        return {str(p): d for p, d in zip(paths, pool.map(one, paths))}


def _safe_sha(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


