"""How leukedge splits data without leaking patients: the one split policy.

- :func:`assign_splits` ``(items, *, strategy="auto", val_fold=None, val_fraction=0.2, seed=0) -> list[str|None]``:
  train/val for found files (``leukedge preprocess --split-by``); :func:`choose_strategy` resolves ``"auto"``.
- :func:`group_kfold` ``(items, k=5, seed=0) -> list[(train_idx, val_idx)]``: subject-grouped, class-stratified CV.
- :func:`subject_groups` ``(items) -> ndarray[int]``: subject groups linked through identical files.
- On a dataset cache's manifest: :func:`usable_rows` (decoded and labelled), :func:`pool_rows` (those outside the
  unlabelled test set), :func:`subjects_of`, :func:`class_counts` and :func:`make_split`, the train/validation
  rows of a training run (``leukedge train``'s precedence of explicit rows, ``--no-validation``, the cache's own
  split and a new one).

``items`` may be :class:`~leukedge.data.discover.Record` objects or manifest rows (dicts with ``subject``,
``label``, ``path``, ``sha256`` and optionally ``fold`` / ``split``), so a cache is split directly.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .._util import CLASS_NAMES, as_int, file_sha256, subject_sort_key
from .discover import Record, source_split

log = logging.getLogger("leukedge.data")


class LeakageWarning(UserWarning):
    """An image-level split puts cells of one patient on both sides: scores will be inflated."""


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
    from sklearn.model_selection import StratifiedGroupKFold  # optional (train extra): leukedge.data imports without it

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
#: the ``split`` values of the items :func:`assign_splits` splits (the others, "val" and "test", keep theirs)
POOL_SPLITS = (None, "", "train")


def official_folds_of(items: Sequence[Any]) -> list[int]:
    """The official folds (``fold_N`` folders) that ``items`` lie in, sorted."""
    return sorted({int(f) for f in (_get(it, "fold") for it in items) if f not in (None, "")})


def choose_strategy(items: Sequence[Any], strategy: str, val_fold: int | None) -> str:
    """``strategy`` with ``"auto"`` resolved: "fold" when ``items`` span at least two official folds or a
    validation fold is named, else "subject"."""
    if strategy != "auto":
        return strategy
    return "fold" if (len(official_folds_of(items)) >= 2 or val_fold is not None) else "subject"


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
    pool = [i for i, s in enumerate(splits) if s in POOL_SPLITS]
    for i in pool:
        splits[i] = "train"
    if not pool or strategy == "none":
        return splits
    pool_items = [items[i] for i in pool]
    strategy = choose_strategy(pool_items, strategy, val_fold)
    val: Sequence[int] | np.ndarray
    if strategy == "fold":
        val = _fold_val(pool_items, val_fold)
    else:
        val = _grouped_val(pool_items, strategy == "image", val_fraction, seed, link_duplicates)
    for j in val:
        splits[pool[int(j)]] = "val"
    if strategy == "fold":
        _check_fold_leaks(pool_items, [splits[i] for i in pool])
    return splits


def _fold_val(pool_items: Sequence[Any], val_fold: int | None) -> list[int]:
    """Pool positions in the validation fold (``val_fold``, default the highest official fold)."""
    folds = official_folds_of(pool_items)
    if not folds:
        raise ValueError("split by fold: none of the files lies in an official fold_N folder")
    vf = folds[-1] if val_fold is None else int(val_fold)
    if vf not in folds:
        raise ValueError(f"validation fold {vf} not found; folds present: {folds}")
    return [j for j, it in enumerate(pool_items) if _get(it, "fold") not in (None, "") and int(_get(it, "fold")) == vf]


def _grouped_val(pool_items: Sequence[Any], image_level: bool, val_fraction: float, seed: int,
                 link_duplicates: bool) -> np.ndarray:
    """Pool positions of the first of ``round(1 / val_fraction)`` class-stratified folds, grouped by subject (or,
    ``image_level``, only by identical file content: a leak, warned about)."""
    labels = np.array([_label_of(it) for it in pool_items], dtype=np.int64)
    k = max(2, int(round(1.0 / val_fraction)))
    if image_level:
        msg = (
            "image-level split: cells of the same patient land in both train and validation, so "
            "validation scores are inflated (C-NMC: 0.95-0.97 instead of ~0.85-0.91) and are NOT "
            "comparable with patient-disjoint results"
        )
        warnings.warn(msg, LeakageWarning, stacklevel=3)
        log.warning(msg)
        if link_duplicates:
            groups = subject_groups([{"sha256": _get(it, "sha256") or (file_sha256(it.path) if isinstance(it, Record) else None)}
                                     for it in pool_items])
        else:
            groups = np.arange(len(pool_items))
    else:
        groups = subject_groups(pool_items, link_duplicates=link_duplicates)
        missing = sum(1 for it in pool_items if _get(it, "subject") in (None, ""))
        if missing:
            log.warning("%d file(s) have no subject id; each is treated as its own subject", missing)
    return _stratified_group_folds(labels, groups, k, seed)[0]


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



# ---------------------------------------------------------------------------------------------
# The rows of a dataset cache a training run uses
# ---------------------------------------------------------------------------------------------
class SplitSettings(Protocol):
    """What :func:`make_split` reads of a training configuration (:class:`leukedge.training.TrainConfig`)."""

    seed: int
    limit: int | None
    val_fold: int | None
    val_fraction: float
    image_level_split: bool
    resplit: bool
    no_validation: bool
    train_indices: list[int] | None
    val_indices: list[int] | None


def usable_rows(manifest: Sequence[dict[str, Any]]) -> list[int]:
    """Rows that decoded and carry a label (0 hem / 1 all)."""
    return [i for i, r in enumerate(manifest) if str(r.get("status", "ok")) == "ok" and as_int(r.get("label")) in (0, 1)]


def pool_rows(manifest: Sequence[dict[str, Any]]) -> list[int]:
    """The usable rows outside the cache's test split: what training, validation and cross-validation draw on."""
    return [i for i in usable_rows(manifest) if str(manifest[i].get("split") or "") != "test"]


def subjects_of(manifest: Sequence[dict[str, Any]], rows: Sequence[int]) -> set[str]:
    """The subjects of ``rows`` (rows without one are left out)."""
    return {str(manifest[i].get("subject")) for i in rows if manifest[i].get("subject") not in (None, "")}


def class_counts(manifest: Sequence[dict[str, Any]], rows: Sequence[int]) -> dict[str, int]:
    """Cells of each class among ``rows``, by class name."""
    labels = [as_int(manifest[i].get("label")) for i in rows]
    return {name: labels.count(k) for k, name in enumerate(CLASS_NAMES)}


def _explicit_split(rows: Sequence[int], cfg: SplitSettings) -> tuple[str, list[int], list[int]]:
    if cfg.train_indices is None or cfg.val_indices is None:
        raise ValueError("train_indices and val_indices must be given together")
    ok = set(rows)
    train = sorted(int(i) for i in cfg.train_indices)
    val = sorted(int(i) for i in cfg.val_indices)
    bad = [i for i in train + val if i not in ok]
    if bad:
        raise ValueError(f"explicit split uses {len(bad)} row(s) that failed or have no label, e.g. {bad[:5]}")
    return "explicit", train, val


def _new_or_cache_split(manifest: Sequence[dict[str, Any]], cfg: SplitSettings,
                        log: Callable[[str], None]) -> tuple[str, list[int], list[int]]:
    """No validation, the cache's own split, or a new one (see :func:`make_split`)."""
    rows = pool_rows(manifest)
    if cfg.limit is not None and cfg.limit < len(rows):
        rng = np.random.default_rng(cfg.seed)
        rows = sorted(int(i) for i in rng.choice(rows, size=cfg.limit, replace=False))
    cache_splits = {str(manifest[i].get("split") or "") for i in rows}
    if cfg.no_validation:
        return "none", list(rows), []
    if not cfg.resplit and cfg.val_fold is None and not cfg.image_level_split and {"train", "val"} <= cache_splits:
        return ("cache", [i for i in rows if manifest[i].get("split") == "train"],
                [i for i in rows if manifest[i].get("split") == "val"])
    # the cache's split column holds what preprocess assigned; a new split starts from the C-NMC partitions
    items = [{**manifest[i], "split": source_split(str(manifest[i].get("path") or ""))} for i in rows]
    pool = [it for it in items if it["split"] in POOL_SPLITS]
    strategy = "image" if cfg.image_level_split else choose_strategy(pool, "auto", cfg.val_fold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LeakageWarning)
        splits = assign_splits(items, strategy=strategy, val_fold=cfg.val_fold, val_fraction=cfg.val_fraction,
                               seed=cfg.seed)
    for w in caught:
        if issubclass(w.category, LeakageWarning):
            log(f"[bold red]WARNING: {w.message}[/]")
    return (strategy, [r for r, s in zip(rows, splits) if s == "train"],
            [r for r, s in zip(rows, splits) if s == "val"])


def make_split(manifest: Sequence[dict[str, Any]], cfg: SplitSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Choose training and validation rows of a cache; returns a JSON-serialisable description.

    Order of precedence: explicit ``train_indices``/``val_indices``; ``no_validation`` (every usable
    row trains); the cache's own train/val split (written by ``leukedge preprocess``) unless
    ``resplit``, ``val_fold`` or ``image_level_split`` ask for a new one; otherwise a new split by
    :func:`assign_splits` (official folds when there are several, else by subject).
    """
    if cfg.train_indices is not None or cfg.val_indices is not None:
        strategy, train, val = _explicit_split(usable_rows(manifest), cfg)
    else:
        strategy, train, val = _new_or_cache_split(manifest, cfg, log)
    if not train or (not val and not cfg.no_validation):
        raise ValueError(f"split {strategy!r} left {len(train)} training and {len(val)} validation images; need both "
                         "(use more subjects, a different --val-fold, or --no-validation)")
    leaked = sorted(subjects_of(manifest, train) & subjects_of(manifest, val))
    if leaked and strategy != "image":
        msg = f"subjects on both sides of the {strategy} split: {', '.join(leaked[:10])}"
        if strategy in ("subject", "explicit"):
            raise RuntimeError(f"internal error: {msg}")
        log(f"[bold red]WARNING: {msg} (validation scores will be inflated)[/]")
    if strategy == "image":
        log("[bold red]WARNING: image-level split: cells of one patient are in both train and validation; "
            "validation scores are inflated and NOT comparable with patient-disjoint results.[/]")
    thin = few_subjects_warning([as_int(manifest[i].get("label")) for i in val],
                                [manifest[i].get("subject") for i in val]) if val else None
    return {
        "strategy": strategy, "val_fold": cfg.val_fold, "patient_disjoint": not leaked, "leaked_subjects": leaked,
        "train_indices": train, "val_indices": val,
        "train_counts": class_counts(manifest, train), "val_counts": class_counts(manifest, val),
        "train_subjects": sorted(subjects_of(manifest, train)), "val_subjects": sorted(subjects_of(manifest, val)),
        "subject_warning": thin,  # fewer than 2 validation subjects of a class (None: enough)
    }


def subject_classes(y: Sequence[Any] | np.ndarray, subjects: Sequence[Any] | np.ndarray) -> dict[str, int]:
    """Each subject's class (the majority label of its labelled cells; C-NMC subjects hold one class)."""
    votes: dict[str, list[int]] = defaultdict(list)
    for label, s in zip(y, subjects):
        if int(label) >= 0:
            votes["?" if s in (None, "") else str(s)].append(int(label))
    return {s: int(np.mean(v) >= 0.5) for s, v in votes.items()}


def few_subjects_warning(y: Sequence[Any] | np.ndarray, subjects: Sequence[Any] | np.ndarray, split_name: str = "validation") -> str | None:
    """A warning when ``split_name`` holds fewer than 2 subjects of a class: its score then describes one
    person (or none) of that class, not the class. None when every class has 2 or more subjects."""
    classes = subject_classes(y, subjects)
    problems = []
    for k, name in enumerate(CLASS_NAMES):
        who = sorted((s for s, c in classes.items() if c == k), key=subject_sort_key)
        if len(who) < 2:
            cells = sum(1 for label, s in zip(y, subjects) if int(label) == k and str(s) in who)
            problems.append(f"{len(who)} {name} subject" + (f" ({who[0]}, {cells} cells)" if who else "s"))
    if not problems:
        return None
    return (f"the {split_name} split holds only {' and '.join(problems)}: its scores describe that person rather than "
            "the class; cross-validate (`leukedge cv`) or hold out more subjects (--val-fraction with --resplit)")
