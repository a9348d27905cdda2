"""Inference backends: TensorRT / TensorRT-RTX engines, ONNX Runtime and the PyTorch reference.

* ``engines.base``: the :class:`Backend` interface (public ``infer``/``infer_timed``, each backend
  implements ``infer_impl``), :class:`Timing`, :class:`BackendUnavailable`;
* ``engines.resolve``: :func:`resolve_model`, what a MODEL path holds (:class:`ModelSpec`);
* ``engines.factory``: :func:`get_backend`, which backend runs a model here and why;
* ``engines.threads``: :func:`plan_threads`, the split of the cores between preprocessing and backend;
* one module per runtime (``onnxrt``, ``torch_backend``, ``torch_cuda``, ``tensorrt_backend``), plus
  ``build`` (``leukedge build-engine``), ``sidecar`` (engine compatibility checks), ``gpu`` and ``cuda_binding``.
"""

from ..artifacts import EngineMismatchError, read_sidecar, sidecar_path
from .base import Backend, BackendUnavailable, Timing
from .factory import BACKENDS, get_backend
from .resolve import ModelSpec, resolve_model
from .threads import THREAD_RULE, ThreadPlan, plan_threads

__all__ = [
    "BACKENDS",
    "THREAD_RULE",
    "Backend",
    "BackendUnavailable",
    "EngineMismatchError",
    "ModelSpec",
    "ThreadPlan",
    "Timing",
    "get_backend",
    "plan_threads",
    "read_sidecar",
    "resolve_model",
    "sidecar_path",
]
