"""Inference backends: TensorRT / TensorRT-RTX engines, ONNX Runtime and the PyTorch reference.

``get_backend(kind, model)`` returns a :class:`Backend`; ``leukedge build-engine`` (``engines.build``)
compiles ONNX exports into engines with a sidecar (``engines.sidecar``).
"""

from .base import BACKENDS, Backend, BackendUnavailable, ModelSpec, Timing, get_backend, resolve_model
from .sidecar import EngineMismatchError, read_sidecar, sidecar_path

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailable",
    "EngineMismatchError",
    "ModelSpec",
    "Timing",
    "get_backend",
    "read_sidecar",
    "resolve_model",
    "sidecar_path",
]
