"""Finding C-NMC 2019 images and reading what their paths say: the one parser of the layouts.

- :func:`parse_name` ``(name) -> ParsedName | None``: parse ``UID_<subject>_<image>_<cell>_<all|hem>.<ext>``.
- :class:`Record`: one image (path, label, class_name, subject, fold, split, layout, sha256).
- :func:`discover` ``(paths, *, recursive=True) -> list[Record]``: folders (Kaggle, original challenge,
  generic ``<class>/`` layouts), single files, globs and list files.
- :func:`source_split` ``(path)``: the C-NMC partition a file lies in (train / val / test / None), the rule
  :func:`discover` applies and the training code applies again to a cache's manifest paths.
- :func:`is_synthetic`: whether a file or folder is leukedge's synthetic data.
"""

from __future__ import annotations

import csv
import dataclasses
import glob as _glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from .._util import CLASS_NAMES, IMAGE_EXTENSIONS, FileTooLarge, NotRegularFile, open_regular
from ..formats.bundle import META_FILE, read_bundle_object
from ..formats.cache import read_cache_object

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


def _split_of_folders(folders: list[str]) -> str | None:
    if any(p == "training_data" or p.startswith("c-nmc_training_data") for p in folders):
        return "train"
    if any("test_prelim_phase" in p for p in folders):
        return "val"  # the challenge's preliminary test = Kaggle's validation_data (labelled)
    if any("test_final_phase" in p for p in folders) or "testing_data" in folders:
        return "test"  # final test phase: unlabelled
    return None


def source_split(path: str | os.PathLike) -> str | None:
    """The C-NMC partition the file at ``path`` lies in, from its folder names: "train" (``training_data``),
    "val" (the labelled preliminary test set), "test" (the unlabelled final test set) or None (no C-NMC
    partition). :func:`discover` records it as ``Record.split``; a cache's manifest column ``split`` holds the
    split preprocess assigned instead, so the training code asks this function again for a new split."""
    parts = PurePosixPath(os.fspath(path).replace("\\", "/")).parts  # "\\" too: a manifest written on Windows
    return _split_of_folders([p.lower() for p in parts[:-1]])


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
    rec.split = _split_of_folders(lower[:-1])


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
        dirs: list[str] = []
        files: list[str] = []
        for e in entries:
            try:
                (dirs if e.is_dir() else files).append(e.name)
            except OSError:
                continue
        out.extend(Path(dirpath) / f for f in files if is_image_file(f) and not f.startswith("."))
        subdirs = [d for d in dirs if not d.startswith(".") and first_visit(os.path.join(dirpath, d))]
        stack.extend(os.path.join(dirpath, d) for d in reversed(subdirs))
    return out


def is_glob_pattern(s: str) -> bool:
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
        if is_glob_pattern(s) and not p.exists():
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
        for meta in (read_cache_object(d), read_bundle_object(d) if (d / META_FILE).is_file() else None):
            if meta is not None and meta.get("synthetic") is True:
                return True
    return False


