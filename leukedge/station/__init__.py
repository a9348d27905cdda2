"""Microscope-station mode: watch a folder, classify each new cell image once it is complete,
store results in SQLite (see docs/station.md).

:class:`Station` is the loop, with the prediction step injected as one callable; the Click group
``leukedge station`` lives in :mod:`leukedge.cli.station`.
"""

from .batcher import DeadlineBatcher
from .core import ModelInfo, Station, StationError, StationSettings, StationSummary
from .scanner import Scanner, is_ignored_name, make_sample_fn

__all__ = [
    "DeadlineBatcher", "ModelInfo", "Scanner", "Station", "StationError", "StationSettings", "StationSummary",
    "is_ignored_name", "make_sample_fn",
]
