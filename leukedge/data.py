"""Finding C-NMC 2019 images, reading their labels and splitting them without leaking patients.

Public API (used by preprocess / train / evaluate / infer):

- :func:`parse_name` ``(name) -> ParsedName | None``: parse ``UID_<subject>_<image>_<cell>_<all|hem>.<ext>``.
- :class:`Record`: one image (path, label, class_name, subject, fold, split, layout, sha256).
- :func:`discover` ``(paths, *, recursive=True) -> list[Record]``: folders (Kaggle, original challenge,
  generic ``<class>/`` layouts), single files, globs and list files.
- :func:`assign_splits` ``(items, *, strategy="auto", val_fold=None, val_fraction=0.2, seed=0) -> list[str|None]``
  and :func:`split_records` (same, returning new :class:`Record` objects).
- :func:`group_kfold` ``(items, k=5, seed=0) -> list[(train_idx, val_idx)]``: subject-grouped, class-stratified CV.
- :func:`subject_groups` ``(items) -> ndarray[int]``: subject groups linked through identical files.
- :func:`file_sha256`, :func:`is_synthetic`, :func:`inspect_dataset`.
- Click group :data:`data_group` with ``inspect`` and ``synth``.

``items`` in the split helpers may be :class:`Record` objects or manifest rows (dicts with
``subject``, ``label``, ``path``, ``sha256`` and optionally ``fold`` / ``split``), so the
training code can split a dataset cache directly.
"""

from __future__ import annotations

import csv
import dataclasses
import glob as _glob
import hashlib
import json
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ._util import CLASS_NAMES, IMAGE_EXTENSIONS, file_sha256, load_native, subject_sort_key
from ._util import FileTooLarge as FileTooLarge  # re-exported: part of the data API
from ._util import NotRegularFile as NotRegularFile
from ._util import open_regular as open_regular

log = logging.getLogger("leukedge.data")

LIST_EXTENSIONS = (".txt", ".lst", ".list")
MAX_LIST_BYTES = 64 << 20  # about 500,000 paths of 128 characters
SYNTHETIC_MARKER = ".leukedge-synthetic"

# Folder names understood as a class in generic layouts (lower-cased).
_POSITIVE_NAMES = {"all", "leukemia", "leukemic", "blast", "blasts", "malignant", "cancer", "positive"}
_NEGATIVE_NAMES = {"hem", "normal", "healthy", "benign", "negative"}

_NAME_RE = re.compile(
    r"^UID_(?P<subject>[A-Za-z]?\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<cls>all|hem)$", re.IGNORECASE
)
_FOLD_RE = re.compile(r"^fold_?(\d+)$", re.IGNORECASE)
_GLOB_CHARS = set("*?[")


class LeakageWarning(UserWarning):
    """An image-level split puts cells of one patient on both sides: scores will be inflated."""


# ---------------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedName:
    subject: str  # "1".."n" for leukemic subjects, "H1".. for normal ones (upper-case H)
    image: int
    cell: int
    class_name: str  # "all" | "hem"
    label: int  # 1 = all, 0 = hem


def normalize_subject(subject: str) -> str:
    """Canonical subject key: ``h3`` -> ``H3``; leukemic ``1`` stays ``1`` (a different person from ``H1``)."""
    s = str(subject).strip()
    if s[:1] in ("h", "H"):
        return "H" + s[1:].lstrip("_")
    return s


def parse_name(name: str | os.PathLike) -> ParsedName | None:
    """Parse a C-NMC file name ``UID_<subject>_<image>_<cell>_<all|hem>.<ext>``.

    Accepts a bare name or a path; returns ``None`` when the name does not follow the pattern.
    """
    stem = Path(name).name
    for ext in IMAGE_EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    m = _NAME_RE.match(stem)
    if not m:
        return None
    cls = m.group("cls").lower()
    return ParsedName(
        subject=normalize_subject(m.group("subject")),
        image=int(m.group("image")),
        cell=int(m.group("cell")),
        class_name=cls,
        label=1 if cls == "all" else 0,
    )


def class_label(folder_name: str) -> int:
    """Label for a class folder name: 1 for all/leukemia..., 0 for hem/normal..., -1 otherwise."""
    n = folder_name.strip().lower()
    if n in _POSITIVE_NAMES:
        return 1
    if n in _NEGATIVE_NAMES:
        return 0
    return -1


# ---------------------------------------------------------------------------------------------
# Records and discovery
# ---------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One image file and what is known about it.

    ``label``: 1 = all (leukemic), 0 = hem (normal), -1 unknown. ``split``: "train" / "val" / "test"
    / None (the source partition after :func:`discover`; :func:`split_records` assigns train/val).
    ``layout``: "kaggle", "original", "generic", "list" or "file" (how it was found).
    """

    path: Path
    label: int = -1
    class_name: str = "unknown"
    subject: str | None = None
    fold: int | None = None
    split: str | None = None
    layout: str = "generic"
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _read_label_csv(path: Path) -> dict[str, tuple[str | None, int]]:
    """Read ``Patient_ID,new_names,labels`` (C-NMC prelim labels) -> {new_name: (subject, label)}."""
    out: dict[str, tuple[str | None, int]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = {k.strip().lower(): k for k in (reader.fieldnames or [])}
            if "new_names" not in fields or "labels" not in fields:
                return {}
            for row in reader:
                name = (row.get(fields["new_names"]) or "").strip()
                if not name:
                    continue
                try:
                    label = int(str(row.get(fields["labels"]) or "").strip())
                except ValueError:
                    label = -1
                subject = None
                if "patient_id" in fields:
                    parsed = parse_name(row.get(fields["patient_id"]) or "")
                    if parsed is not None:
                        subject = parsed.subject
                        if label == -1:
                            label = parsed.label
                out[name] = (subject, label if label in (0, 1) else -1)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        log.warning("cannot read label file %s: %s", path, exc)
        return {}
    return out


class _LabelFiles:
    """Finds and caches ``*labels*.csv`` files next to or above an image folder."""

    def __init__(self) -> None:
        self._by_dir: dict[Path, dict[str, tuple[str | None, int]]] = {}

    def _dir_map(self, d: Path) -> dict[str, tuple[str | None, int]]:
        if d not in self._by_dir:
            merged: dict[str, tuple[str | None, int]] = {}
            try:
                csvs = sorted(p for p in d.iterdir() if p.suffix.lower() == ".csv" and "label" in p.name.lower())
            except OSError:
                csvs = []
            for p in csvs:
                merged.update(_read_label_csv(p))
            self._by_dir[d] = merged
        return self._by_dir[d]

    def lookup(self, image: Path) -> tuple[str | None, int] | None:
        d = image.parent
        for _ in range(3):  # the folder itself, validation_data/, and the original release's nesting
            hit = self._dir_map(d).get(image.name)
            if hit is not None:
                return hit
            if d.parent == d:
                break
            d = d.parent
        return None


def _describe(path: Path, root: Path | None, labels: _LabelFiles, layout_hint: str | None = None) -> Record:
    """Work out label, subject, fold and split of one image from its path."""
    rec = Record(path=path)
    _layout_fold_split(rec, [p.lower() for p in path.parts], layout_hint)
    parsed = parse_name(path.name)
    if parsed is not None:
        rec.label, rec.class_name, rec.subject = parsed.label, parsed.class_name, parsed.subject
    else:
        hit = labels.lookup(path)
        if hit is not None:
            subject, label = hit
            rec.subject = subject
            rec.label = label
            rec.class_name = CLASS_NAMES[label] if label in (0, 1) else "unknown"
    _label_from_folders(rec, root)
    return rec


def _layout_fold_split(rec: Record, lower: list[str], layout_hint: str | None) -> None:
    """Layout (Kaggle, original challenge, generic), official fold and split from the path's folder names."""
    if any(p in ("c-nmc_leukemia",) for p in lower):
        rec.layout = "kaggle"
    elif any(p.startswith("c-nmc_training_data") or p.startswith("c-nmc_test_") for p in lower):
        rec.layout = "original"
    else:
        rec.layout = layout_hint or "generic"
    for p in lower[:-1]:
        m = _FOLD_RE.match(p)
        if m:
            rec.fold = int(m.group(1))
    if any(p in ("training_data",) or p.startswith("c-nmc_training_data") for p in lower[:-1]):
        rec.split = "train"
    elif any("test_prelim_phase" in p for p in lower[:-1]):
        rec.split = "val"  # the challenge's preliminary test = Kaggle's validation_data (labelled)
    elif any("test_final_phase" in p for p in lower[:-1]) or "testing_data" in lower[:-1]:
        rec.split = "test"  # final test phase: unlabelled


def _label_from_folders(rec: Record, root: Path | None) -> None:
    """Class folders: the nearest ancestor with a known class name, else the generic root/<class>/file;
    used where the file name gave no label, checked against it otherwise."""
    path, parts = rec.path, rec.path.parts
    folder_label, folder_class = -1, None
    # Search up to and including the folder that was passed in (``data/hem`` labels its files).
    stop = len(root.parts) - 1 if root is not None and root in path.parents else 0
    for i in range(len(parts) - 2, stop - 1, -1):
        lab = class_label(parts[i])
        if lab != -1:
            folder_label, folder_class = lab, parts[i].lower()
            break
    if (folder_class is None and root is not None and path.parent.parent == root and rec.fold is None
            and rec.split is None and rec.label == -1):
        folder_class = path.parent.name  # generic <class>/ layout with an unknown class name
    if folder_class is not None:
        if rec.label == -1 and rec.class_name == "unknown":
            rec.label = folder_label
            rec.class_name = CLASS_NAMES[folder_label] if folder_label in (0, 1) else folder_class
        elif folder_label != -1 and folder_label != rec.label:
            log.warning("%s: file name says %s but folder says %s; using the file name", path, rec.class_name, folder_class)


def _walk_images(root: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    out: list[Path] = []
    # Symlinked folders are followed, but each real folder is walked once: a link to an ancestor
    # (``a -> ..``) would otherwise make the walk endless, and two of them exponential.
    seen: set[tuple[int, int]] = set()
    try:
        st = os.stat(root)
        seen.add((st.st_dev, st.st_ino))
    except OSError:
        pass

    def first_visit(d: str) -> bool:
        try:
            st = os.stat(d)
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in seen:
            log.warning("%s: folder already walked (symlink loop or second link); skipped", d)
            return False
        seen.add(key)
        return True

    # An explicit stack, not os.walk: on Python 3.11 os.walk recurses once per level, and a folder 1,500
    # levels deep raised RecursionError. Same order as os.walk (top-down, sorted).
    stack = [str(root)]
    while stack:
        dirpath = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        dirs, files = [], []
        for e in entries:
            try:
                (dirs if e.is_dir() else files).append(e.name)
            except OSError:
                continue
        out.extend(Path(dirpath) / f for f in files if is_image_file(f) and not f.startswith("."))
        subdirs = [d for d in dirs if not d.startswith(".") and first_visit(os.path.join(dirpath, d))]
        stack.extend(os.path.join(dirpath, d) for d in reversed(subdirs))
    return out


def _is_glob(s: str) -> bool:
    return any(c in _GLOB_CHARS for c in s)


def discover(paths: str | os.PathLike | Iterable[str | os.PathLike], *, recursive: bool = True) -> list[Record]:
    """Find images under ``paths`` and describe each as a :class:`Record`.

    Each entry may be a folder (walked recursively), an image file, a glob pattern
    (``'data/**/*.bmp'``) or a list file (``.txt``/``.lst``/``.list``: one path per line, relative to
    the list file, ``#`` comments; entries may themselves be folders or globs).

    Understood layouts: Kaggle ``C-NMC_Leukemia/training_data/fold_N/{all,hem}/`` with
    ``validation_data/C-NMC_test_prelim_phase_data/{n}.bmp`` labelled by
    ``C-NMC_test_prelim_phase_data_labels.csv`` and unlabelled ``testing_data/``; the original
    challenge layout (``C-NMC_training_data/``, nested prelim folder); generic ``<class>/`` folders.
    Files whose label cannot be determined get ``label=-1``. Duplicated paths are listed once.
    Raises ``FileNotFoundError`` for an entry that does not exist or matches nothing.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found = _Discovery(recursive)
    for entry in paths:
        found.handle(entry, None, None)
    return found.records


class _Discovery:
    """The records found so far by :func:`discover` (each path once) and how each kind of entry is read."""

    def __init__(self, recursive: bool) -> None:
        self.recursive = recursive
        self.labels = _LabelFiles()
        self.records: list[Record] = []
        self.seen: set[Path] = set()
        self.lists: set[Path] = set()  # list files being read (a list that names itself is read once)

    def add(self, rec: Record) -> None:
        key = rec.path.resolve()
        if key not in self.seen:
            self.seen.add(key)
            self.records.append(rec)

    def handle(self, entry: str | os.PathLike, layout_hint: str | None, base: Path | None) -> None:
        s = os.fspath(entry)
        p = Path(s).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        if _is_glob(s) and not p.exists():
            self.handle_glob(s, p, layout_hint)
            return
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_dir():
            for img in _walk_images(p, self.recursive):
                self.add(_describe(img, p, self.labels, layout_hint))
        elif p.suffix.lower() in LIST_EXTENSIONS:
            self.handle_list(p)
        else:
            # A single file: anything we were asked for explicitly is listed, even an odd extension,
            # so that a broken or unsupported file is reported rather than silently skipped.
            self.add(_describe(p, None, self.labels, layout_hint or "file"))

    def handle_list(self, p: Path) -> None:
        """A list file: a regular file (a FIFO would block, /dev/zero never ends) of at most
        :data:`MAX_LIST_BYTES`, read once even when it names itself or another list names it again."""
        key = p.resolve()
        if key in self.lists:
            log.warning("%s: list file already read (it names itself, or a list names it twice); skipped", p)
            return
        self.lists.add(key)
        try:
            with open_regular(p, MAX_LIST_BYTES) as f:
                text = f.read(MAX_LIST_BYTES + 1).decode("utf-8", "surrogateescape")
        except (NotRegularFile, FileTooLarge) as exc:
            raise ValueError(f"{p}: cannot be read as a list file: {exc.strerror}") from exc
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                self.handle(line, "list", p.parent)

    def handle_glob(self, s: str, p: Path, layout_hint: str | None) -> None:
        matches = sorted(_glob.glob(str(p), recursive=True))
        if not matches:
            raise FileNotFoundError(f"{s}: the pattern matches no file")
        for m in matches:
            mp = Path(m)
            if mp.is_dir():
                self.handle(mp, layout_hint, None)
            elif is_image_file(mp):
                self.add(_describe(mp, None, self.labels, layout_hint or "file"))


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------
def _get(item: Any, key: str, default: Any = None) -> Any:
    if isinstance(item, dict):
        return item.get(key, default)
    return getattr(item, key, default)


def _label_of(item: Any) -> int:
    v = _get(item, "label", -1)
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


def subject_groups(items: Sequence[Any], *, link_duplicates: bool = True) -> np.ndarray:
    """Integer group id per item: items share a group when they have the same subject or (with
    ``link_duplicates``) the same file content (sha256), transitively. Items without a subject
    form their own group unless linked by content. sha256 is computed for :class:`Record` items
    that lack it (and stored on them)."""
    n = len(items)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, it in enumerate(items):
        keys = []
        subj = _get(it, "subject")
        if subj not in (None, ""):
            keys.append("s:" + str(subj))
        if link_duplicates:
            sha = _get(it, "sha256")
            if not sha and isinstance(it, Record) and it.path.is_file():
                sha = it.sha256 = file_sha256(it.path)
            if sha:
                keys.append("h:" + str(sha))
        for k in keys:
            if k in first:
                union(i, first[k])
            else:
                first[k] = i
    roots = [find(i) for i in range(n)]
    _, ids = np.unique(np.asarray(roots, dtype=np.int64), return_inverse=True)
    return ids.astype(np.int64)


def _stratified_group_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Validation index sets of a class-stratified, group-disjoint k-fold split."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"a grouped split needs at least 2 subjects, found {n_groups}")
    # sklearn needs k <= number of groups and k <= the size of the largest class.
    k = min(k, n_groups, int(np.bincount(np.unique(labels, return_inverse=True)[1]).max()))
    if k < 2:
        raise ValueError("a grouped split needs at least 2 items of one class")
    with warnings.catch_warnings():
        # "The least populated class has only n members": expected with few subjects.
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
        sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return [val for _, val in sgkf.split(np.zeros(len(labels)), labels, groups)]


def group_kfold(items: Sequence[Any], k: int = 5, seed: int = 0, *, link_duplicates: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Subject-grouped, class-stratified k-fold cross-validation.

    Returns ``k`` pairs ``(train_idx, val_idx)`` of indices into ``items`` (Records or manifest
    dicts). No subject (nor any identical file) appears on both sides of a pair; each item is in
    exactly one validation fold. ``k`` is reduced to the number of subject groups if larger.
    """
    if k < 2:
        raise ValueError("k must be >= 2")
    labels = np.array([_label_of(it) for it in items], dtype=np.int64)
    groups = subject_groups(items, link_duplicates=link_duplicates)
    folds = _stratified_group_folds(labels, groups, k, seed)
    all_idx = np.arange(len(items))
    out = []
    for val in folds:
        val = np.sort(val)
        out.append((np.setdiff1d(all_idx, val), val))
    return out


SPLIT_STRATEGIES = ("auto", "fold", "subject", "image", "none")


def assign_splits(
    items: Sequence[Any],
    *,
    strategy: str = "auto",
    val_fold: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    link_duplicates: bool = True,
) -> list[str | None]:
    """Assign "train"/"val" to the training pool and return one split name per item.

    Items whose ``split`` is already "val" or "test" (C-NMC's labelled prelim and unlabelled final
    test sets) keep it; the rest (split None or "train") form the pool. Strategies:

    - ``"fold"``: official folds; pool items with ``fold == val_fold`` become "val" (``val_fold``
      defaults to the highest fold).
    - ``"subject"``: subject-grouped, class-stratified split with about ``val_fraction`` of the
      subjects in "val" (seeded). Identical files (same sha256) are always kept on the same side.
    - ``"image"``: image-level random stratified split. It leaks patients across the split, so
      it emits a :class:`LeakageWarning`; only use it when asked to explicitly.
    - ``"auto"``: "fold" when the pool spans at least two official folds, else "subject".
    - ``"none"``: keep the existing splits; the pool is all "train".
    """
    if strategy not in SPLIT_STRATEGIES:
        raise ValueError(f"split strategy {strategy!r} is not one of {', '.join(SPLIT_STRATEGIES)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    splits: list[str | None] = [_get(it, "split") for it in items]
    pool = [i for i, s in enumerate(splits) if s in (None, "", "train")]
    for i in pool:
        splits[i] = "train"
    if not pool or strategy == "none":
        return splits
    pool_items = [items[i] for i in pool]
    folds = sorted({int(f) for f in (_get(it, "fold") for it in pool_items) if f not in (None, "")})
    if strategy == "auto":
        strategy = "fold" if (len(folds) >= 2 or val_fold is not None) else "subject"

    if strategy == "fold":
        if not folds:
            raise ValueError("split by fold: none of the files lies in an official fold_N folder")
        vf = folds[-1] if val_fold is None else int(val_fold)
        if vf not in folds:
            raise ValueError(f"validation fold {vf} not found; folds present: {folds}")
        for i, it in zip(pool, pool_items):
            f = _get(it, "fold")
            if f not in (None, "") and int(f) == vf:
                splits[i] = "val"
        _check_fold_leaks(pool_items, [splits[i] for i in pool])
        return splits

    labels = np.array([_label_of(it) for it in pool_items], dtype=np.int64)
    k = max(2, int(round(1.0 / val_fraction)))
    if strategy == "image":
        msg = (
            "image-level split: cells of the same patient land in both train and validation, so "
            "validation scores are inflated (C-NMC: 0.95-0.97 instead of ~0.85-0.91) and are NOT "
            "comparable with patient-disjoint results"
        )
        warnings.warn(msg, LeakageWarning, stacklevel=2)
        log.warning(msg)
        if link_duplicates:
            groups = subject_groups([{"sha256": _get(it, "sha256") or (file_sha256(it.path) if isinstance(it, Record) else None)}
                                     for it in pool_items])
        else:
            groups = np.arange(len(pool_items))
        val = _stratified_group_folds(labels, groups, k, seed)[0]
    else:
        groups = subject_groups(pool_items, link_duplicates=link_duplicates)
        missing = sum(1 for it in pool_items if _get(it, "subject") in (None, ""))
        if missing:
            log.warning("%d file(s) have no subject id; each is treated as its own subject", missing)
        val = _stratified_group_folds(labels, groups, k, seed)[0]
    for j in val:
        splits[pool[int(j)]] = "val"
    return splits


def _check_fold_leaks(items: Sequence[Any], splits: Sequence[str | None]) -> None:
    sides: dict[str, set[str]] = defaultdict(set)
    for it, s in zip(items, splits):
        subj = _get(it, "subject")
        if subj not in (None, "") and s:
            sides[str(subj)].add(s)
    leaked = sorted(s for s, v in sides.items() if len(v) > 1)
    if leaked:
        msg = f"subjects in both train and val folds: {', '.join(leaked[:10])}"
        warnings.warn(msg, LeakageWarning, stacklevel=3)


def split_records(records: Sequence[Record], **kwargs: Any) -> list[Record]:
    """:func:`assign_splits` returning copies of ``records`` with ``split`` set."""
    splits = assign_splits(records, **kwargs)
    return [dataclasses.replace(r, split=s) for r, s in zip(records, splits)]


# ---------------------------------------------------------------------------------------------
# Synthetic data marker
# ---------------------------------------------------------------------------------------------
def is_synthetic(path: str | os.PathLike) -> bool:
    """True when ``path`` (a file or folder) is synthetic leukedge data: it or a parent folder holds
    the ``.leukedge-synthetic`` marker written by ``leukedge data synth``, or it is (inside) a dataset
    cache / model bundle whose ``cache.json`` / ``bundle.json`` says ``"synthetic": true``."""
    p = Path(path).expanduser()
    try:
        p = p.resolve()
    except OSError:
        return False
    for d in [p, *p.parents] if p.is_dir() else list(p.parents):
        if (d / SYNTHETIC_MARKER).exists():
            return True
        for meta in ("cache.json", "bundle.json"):
            f = d / meta
            if f.is_file():
                try:
                    if json.loads(f.read_text()).get("synthetic") is True:
                        return True
                except (OSError, ValueError, AttributeError):
                    pass
    return False


# ---------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------
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
    n_all, n_hem = classes.get("all", 0), classes.get("hem", 0)
    unreadable = [{"path": str(r.path), "error": e} for r, e in zip(records, problems) if e]
    unreadable += [{"path": str(r.path), "error": "cannot read file"} for r, h, e in zip(records, hashes, problems) if h is None and not e]
    roots = [str(p) for p in paths]
    return {
        "roots": roots,
        "synthetic": any(is_synthetic(p) for p in paths if not _is_glob(os.fspath(p))) or (bool(records) and is_synthetic(records[0].path)),
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


