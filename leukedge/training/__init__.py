"""Training a classifier on a dataset cache (``leukedge train``).

- :mod:`.recipe`: :class:`TrainConfig`, the single source of every setting's default, and recipe files (no torch).
"""

from __future__ import annotations

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

__all__ = [
    "AUGMENT_MODES",
    "RECIPES_DIR",
    "RECIPE_FIELDS",
    "SELECT_CHOICES",
    "TEST_TIME_FIELDS",
    "TTA_CHOICES",
    "TrainConfig",
    "default_of",
    "load_recipe",
    "recipe_of",
    "resolve_recipe",
    "shipped_recipes",
]
