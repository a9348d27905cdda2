"""Inference backends: TensorRT / TensorRT-RTX engines, ONNX Runtime and the PyTorch reference.

* ``engines.base``: the :class:`Backend` interface (public ``infer``/``infer_timed``, each backend
  implements ``infer_impl``), :class:`Timing`, :class:`BackendUnavailable`;
* what a MODEL path holds (:class:`ModelSpec`) is :func:`leukedge.model.open_model` (re-exported here, also as
  ``resolve_model``);
* ``engines.factory``: :func:`get_backend`, which backend runs a model here and why;
* ``engines.threads``: :func:`plan_threads`, the split of the cores between preprocessing and backend;
* one module per runtime (``onnxrt``, ``torch_backend``, ``torch_cuda``, ``tensorrt_backend``), plus
  ``build`` (``leukedge build-engine``), ``sidecar`` (engine compatibility checks), ``gpu`` and ``cuda_binding``.
"""

from ..formats.sidecar import EngineMismatchError, read_sidecar, sidecar_path
from ..model import ModelSpec, open_model, resolve_model
from .base import Backend, BackendUnavailable, Timing
from .factory import BACKENDS, get_backend
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
    "open_model",
    "plan_threads",
    "read_sidecar",
    "resolve_model",
    "sidecar_path",
]
