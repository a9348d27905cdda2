"""The former home of the on-disk formats, now :mod:`leukedge.formats` (one module per file). Only names are
re-exported here, for the callers that still import them from this module; nothing is defined or parsed here.
New code imports from :mod:`leukedge.formats`."""

from __future__ import annotations

from .formats.bundle import BUNDLE_FORMAT as BUNDLE_FORMAT
from .formats.bundle import META_FILE as META_FILE
from .formats.bundle import TRAINED_ON_FILE as TRAINED_ON_FILE
from .formats.bundle import WEIGHTS_FILE as WEIGHTS_FILE
from .formats.bundle import BundleError as BundleError
from .formats.bundle import default_model_path as default_model_path
from .formats.bundle import read_bundle as read_bundle
from .formats.bundle import read_bundle_meta as read_bundle_meta
from .formats.bundle import read_trained_on as read_trained_on
from .formats.bundle import write_bundle_meta as write_bundle_meta
from .formats.bundle import write_trained_on as write_trained_on
from .formats.cache import CACHE_VERSION as CACHE_VERSION
from .formats.cache import MANIFEST_FIELDS as MANIFEST_FIELDS
from .formats.cache import Cache as Cache
from .formats.cache import load_cache as load_cache
from .formats.cache import load_config_source as load_config_source
from .formats.cache import read_manifest as read_manifest
from .formats.cache import write_manifest as write_manifest
from .formats.export import EXPORT_FP16 as EXPORT_FP16
from .formats.export import EXPORT_FP32 as EXPORT_FP32
from .formats.export import EXPORT_INT8 as EXPORT_INT8
from .formats.export import EXPORT_INT8_TRT as EXPORT_INT8_TRT
from .formats.export import META_PREFIX as META_PREFIX
from .formats.export import check_export_hashes as check_export_hashes
from .formats.export import check_weights_binding as check_weights_binding
from .formats.export import onnx_config as onnx_config
from .formats.export import read_export_manifest as read_export_manifest
from .formats.export import set_onnx_meta as set_onnx_meta
from .formats.sidecar import ENGINE_SUFFIXES as ENGINE_SUFFIXES
from .formats.sidecar import SIDECAR_FORMAT as SIDECAR_FORMAT
from .formats.sidecar import EngineMismatchError as EngineMismatchError
from .formats.sidecar import read_sidecar as read_sidecar
from .formats.sidecar import sidecar_path as sidecar_path
from .formats.sidecar import write_sidecar as write_sidecar

