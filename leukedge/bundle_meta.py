"""The former home of the ``bundle.json`` checks, now :mod:`leukedge.formats.bundle`; only names are re-exported
here, for the callers that still import them from this module."""

from __future__ import annotations

from .formats.bundle import ARCH_KWARGS as ARCH_KWARGS
from .formats.bundle import BundleMetaError as BundleMetaError
from .formats.bundle import check_arch_kwargs as check_arch_kwargs
from .formats.bundle import validate_bundle_meta as validate_bundle_meta
