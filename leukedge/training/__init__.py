"""Training a classifier on a dataset cache (``leukedge train``, ``leukedge cv``'s folds).

- :mod:`.recipe`: :class:`TrainConfig`, the single source of every setting's default (the CLI options derive
  from it), and recipe files (``--recipe``).
- :mod:`.trainer`: :func:`train`, one run in named phases; the split it trains on is
  :func:`leukedge.data.make_split`.
- :mod:`.augment`: batch augmentation and normalisation; :mod:`.features`: the frozen-block feature cache and
  the test-time augmentation maths on it; :mod:`.export`: the frozen blocks as an ONNX Runtime session;
  :mod:`.loop`: schedule, seeding, batches, predictions and validation metrics; :mod:`.records`: results.csv,
  TensorBoard, checkpoint files.

The recipe names import without torch; the others load torch on first use (PEP 562), so the CLI can list
``leukedge train``'s options and ``leukedge.train`` stays a plain function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..data.splits import make_split, usable_rows
from .recipe import (
    AUGMENT_MODES,
    RECIPE_FIELDS,
    RECIPES_DIR,
    SELECT_CHOICES,
    TEST_TIME_FIELDS,
    TTA_CHOICES,
    TrainConfig,
    default_of,
    load_recipe,
    recipe_of,
    resolve_recipe,
    shipped_recipes,
)

# name -> submodule that defines it (these need torch)
_LAZY: dict[str, str] = {
    "train": "trainer",
    "TrainResult": "trainer",
    "augment_batch": "augment",
    "mixup_batch": "augment",
    "normalize01": "augment",
    "to_float01": "augment",
    "resolve_device": "loop",
    "predict_rows": "loop",
    "TTA_VIEW_INDEX": "features",
    "prefix_features": "features",
    "predict_features": "features",
    "tta_logits": "features",
    "RESULTS_CSV": "records",
    "RESULTS_COLUMNS": "records",
    "write_results_csv": "records",
}

__all__ = [
    "AUGMENT_MODES",
    "RECIPES_DIR",
    "RECIPE_FIELDS",
    "RESULTS_COLUMNS",
    "RESULTS_CSV",
    "SELECT_CHOICES",
    "TEST_TIME_FIELDS",
    "TTA_CHOICES",
    "TTA_VIEW_INDEX",
    "TrainConfig",
    "TrainResult",
    "augment_batch",
    "default_of",
    "load_recipe",
    "make_split",
    "mixup_batch",
    "normalize01",
    "predict_features",
    "predict_rows",
    "prefix_features",
    "recipe_of",
    "resolve_device",
    "resolve_recipe",
    "shipped_recipes",
    "to_float01",
    "train",
    "tta_logits",
    "usable_rows",
    "write_results_csv",
]

if TYPE_CHECKING:  # for type checkers; at run time these come from __getattr__
    from .augment import augment_batch, mixup_batch, normalize01, to_float01
    from .features import TTA_VIEW_INDEX, predict_features, prefix_features, tta_logits
    from .loop import predict_rows, resolve_device
    from .records import RESULTS_COLUMNS, RESULTS_CSV, write_results_csv
    from .trainer import TrainResult, train


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'leukedge.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
