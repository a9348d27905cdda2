"""Microscope-station mode: watch a folder, classify each new cell image once it is complete,
store results in SQLite (see docs/station.md).

``station_group`` is the Click group registered as ``leukedge station``; :class:`Station` is the
loop, with the prediction step injected as one callable.
"""

from .batcher import DeadlineBatcher
from .cli import open_predictor, predict_fn, station_group
from .core import ModelInfo, Station, StationError, StationSettings, StationSummary
from .scanner import Scanner, is_ignored_name, make_sample_fn

__all__ = [
    "DeadlineBatcher", "ModelInfo", "Scanner", "Station", "StationError", "StationSettings", "StationSummary",
    "is_ignored_name", "make_sample_fn", "open_predictor", "predict_fn", "station_group",
]
