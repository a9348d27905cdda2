"""The one small interface every inference runtime implements (TensorRT / TensorRT-RTX, ONNX Runtime, PyTorch).

A backend subclasses :class:`Backend`, declares what it is (``name``, ``device_kind``, ``input_dtype``, ...)
and implements :meth:`Backend.infer_impl`; the public :meth:`Backend.infer` / :meth:`Backend.infer_timed`
check the batch and time the call (the layout of Polygraphy's runners). Picking a backend is
:func:`leukedge.engines.get_backend` (``engines.factory``), what a model path holds is
:func:`leukedge.model.open_model`, and the core split between preprocessing and backend threads is ``engines.threads``.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..model import ModelSpec


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (missing package, no GPU, no suitable model file)."""


@dataclass
class Timing:
    """Times of one ``infer_timed`` call, in milliseconds (``None`` where not measured)."""

    total_ms: float
    compute_ms: float | None = None
    h2d_ms: float | None = None
    d2h_ms: float | None = None


class Backend(abc.ABC):
    """Runs a classifier on preprocessed NCHW batches and returns logits ``(N, 2)`` as float32.

    Subclasses declare the attributes below (class defaults, set in ``__init__``) and implement
    :meth:`infer_impl`; callers use :meth:`infer` or :meth:`infer_timed`, which check the batch
    (:meth:`check_batch`) and time the call, so every backend reports the same :class:`Timing`.
    """

    name: str = "backend"
    description: str = ""
    input_dtype: str = "float32"
    max_batch: int | None = None  # None: unbounded
    input_size: int | None = None
    device_kind: str | None = None  # "cpu" | "gpu"; None: inferred from ``name``
    reason: str = ""  # why get_backend picked this backend (set by the factory)
    spec: ModelSpec | None = None  # the model it runs (set by the factory)
    last_timing: Timing | None = None  # times of the latest infer() call

    @abc.abstractmethod
    def infer_impl(self, batch: np.ndarray) -> tuple[np.ndarray, Timing | None]:
        """Run one checked batch (right shape, dtype and contiguity); return float32 logits and, if the
        backend measures them itself, its stage times (``total_ms`` is overwritten by :meth:`infer_timed`)."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``(N, 2)`` float32 of a preprocessed NCHW batch; the times of the call are left in
        :attr:`last_timing` (``total_ms`` covers the check and copy too)."""
        t0 = time.perf_counter()
        checked = self.check_batch(batch)
        out, timing = self.infer_impl(checked)
        total = (time.perf_counter() - t0) * 1e3
        if timing is None:
            timing = Timing(total_ms=total, compute_ms=total)
        else:
            timing.total_ms = total
        self.last_timing = timing
        return out

    def infer_timed(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        """:meth:`infer` and the times of that call."""
        out = self.infer(batch)
        return out, self.last_timing or Timing(total_ms=0.0)

    @property
    def on_cpu(self) -> bool:
        """True when the network runs on the host CPU (so it competes with preprocessing for cores)."""
        if self.device_kind is not None:
            return self.device_kind == "cpu"
        return not (self.name.startswith("tensorrt") or "cuda" in self.name)

    @property
    def threads(self) -> int:
        """Intra-op threads the backend uses (0: the runtime's default)."""
        return 0

    def set_threads(self, threads: int, *, exclusive: bool = False) -> None:  # noqa: B027 - optional hook
        """Use ``threads`` intra-op threads (0: the runtime default). ``exclusive``: the other cores are busy
        with preprocessing, so the backend must not spin-wait on them. No-op for GPU backends."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"{self.name}: expected an NCHW batch (N,3,S,S), got shape {batch.shape}")
        if self.input_size is not None and batch.shape[2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name}: model input is {self.input_size}x{self.input_size}, batch is {batch.shape[2]}x{batch.shape[3]}"
            )
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            raise ValueError(f"{self.name}: batch of {batch.shape[0]} exceeds the maximum batch {self.max_batch}")
        if batch.dtype != np.dtype(self.input_dtype):
            batch = batch.astype(self.input_dtype)
        return np.ascontiguousarray(batch)

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
