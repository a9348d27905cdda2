"""Finding C-NMC 2019 images, reading their labels and splitting them without leaking patients.

Three modules, each fact in one of them:

- :mod:`leukedge.data.discover`: the layouts (Kaggle, original challenge, generic ``<class>/`` folders, list
  files, globs), file names and label files, parsed once: :func:`discover`, :func:`parse_name`,
  :class:`Record`, :func:`source_split`, :func:`is_synthetic`.
- :mod:`leukedge.data.splits`: the one split policy: :func:`assign_splits`, :func:`group_kfold`,
  :func:`subject_groups`, and on a cache's manifest :func:`usable_rows`, :func:`pool_rows` and
  :func:`make_split` (a training run's train/validation rows).
- :mod:`leukedge.data.inspect`: :func:`inspect_dataset` (``leukedge data inspect``) and
  :func:`pixel_digest` / :func:`pixel_digests`.

The names below are the package's API (``from leukedge.data import discover, assign_splits``).
"""

from __future__ import annotations

from .._util import FileTooLarge, NotRegularFile, file_sha256, open_regular
from .discover import (
    LIST_EXTENSIONS,
    MAX_LIST_BYTES,
    SYNTHETIC_MARKER,
    ParsedName,
    Record,
    class_label,
    discover,
    is_image_file,
    is_synthetic,
    normalize_subject,
    parse_name,
    source_split,
)
from .inspect import inspect_dataset, pixel_digest, pixel_digests
from .splits import (
    SPLIT_STRATEGIES,
    LeakageWarning,
    assign_splits,
    choose_strategy,
    group_kfold,
    make_split,
    pool_rows,
    subject_groups,
    subjects_of,
    usable_rows,
)

__all__ = [
    "LIST_EXTENSIONS",
    "MAX_LIST_BYTES",
    "SPLIT_STRATEGIES",
    "SYNTHETIC_MARKER",
    "FileTooLarge",
    "LeakageWarning",
    "NotRegularFile",
    "ParsedName",
    "Record",
    "assign_splits",
    "choose_strategy",
    "class_label",
    "discover",
    "file_sha256",
    "group_kfold",
    "inspect_dataset",
    "is_image_file",
    "is_synthetic",
    "make_split",
    "normalize_subject",
    "open_regular",
    "parse_name",
    "pixel_digest",
    "pixel_digests",
    "pool_rows",
    "source_split",
    "subject_groups",
    "subjects_of",
    "usable_rows",
]
