"""TensorRT / TensorRT-RTX runtime backend (cuda-python or pycuda for memory, streams and events).

Pinned host staging buffers and device buffers are allocated once for the engine's maximum batch
(through :mod:`leukedge.engines.cuda_binding`); each call copies the batch into pinned memory, enqueues
H2D → ``execute_async_v3`` → D2H on one non-blocking stream and times the three phases with CUDA events.
A TensorRT-RTX engine keeps its JIT-compiled kernels in a runtime cache beside the engine
(``ENGINE.rtcache``) and runs batches padded to a few fixed sizes, so a restart compiles nothing again
and a short last batch meets no new shape.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .base import Backend, BackendUnavailable, Timing
from .gpu import GpuInfo, detect_gpu

FLAVOURS = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def import_trt(flavour: str) -> ModuleType:
    """Import ``tensorrt`` or ``tensorrt_rtx``; BackendUnavailable with an install hint if missing."""
    import importlib

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown TensorRT flavour {flavour!r} (tensorrt or tensorrt-rtx)")
    try:
        return importlib.import_module(_MODULES[flavour])
    except Exception as exc:  # ImportError, or OSError for a missing libnvinfer
        pkg = "tensorrt" if flavour == "tensorrt" else "tensorrt-rtx-cu12"
        raise BackendUnavailable(f"{flavour} is not usable ({exc}); pip install {pkg}") from exc


def available_flavours() -> list[str]:
    out = []
    for f in FLAVOURS:
        try:
            import_trt(f)
            out.append(f)
        except BackendUnavailable:
            pass
    return out


def trt_major(trt: ModuleType) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


def gpu_info(device: int = 0) -> GpuInfo | None:
    """The usable CUDA GPU ``device`` (name, compute capability, driver, runtime), or None (see :func:`no_gpu_reason`).
    Faked in tests through :data:`leukedge.engines.gpu.OVERRIDES` (``LEUKEDGE_FAKE_GPU`` from outside)."""
    return detect_gpu(device).gpu


def no_gpu_reason(device: int = 0) -> str:
    """Why there is no usable GPU ("" when there is one): no binding, no driver, driver too old, no device."""
    return detect_gpu(device).reason


# Plain-language meaning of TensorRT-RTX's EngineInvalidityDiagnostics bits.
VALIDITY_TEXT = {
    "VERSION_MISMATCH": "built by another TensorRT-RTX version",
    "UNSUPPORTED_CC": "not built for this GPU's compute capability",
    "OLD_CUDA_DRIVER": "the NVIDIA driver is too old for this engine",
    "OLD_CUDA_RUNTIME": "the CUDA runtime is too old for this engine",
    "INSUFFICIENT_GPU_MEMORY": "not enough free GPU memory",
    "MALFORMED_ENGINE": "the engine file is damaged or not an engine",
    "CUDA_ERROR": "a CUDA error occurred while checking",
}


def describe_validity(trt: ModuleType, diagnostics: Any) -> str:
    """``get_engine_validity``'s diagnostics bit mask in words ("UNSUPPORTED_CC (not built for ...)")."""
    bits = int(diagnostics)
    enum = getattr(trt, "EngineInvalidityDiagnostics", None)
    parts, known = [], 0
    for name, member in (enum.__members__.items() if enum is not None else ()):
        v = int(member)
        if v and bits & v:
            known |= v
            parts.append(f"{name} ({VALIDITY_TEXT.get(name, name.lower().replace('_', ' '))})")
    if bits & ~known:
        parts.append(f"unknown diagnostic bits 0x{bits & ~known:x}")
    if not parts:
        return "no diagnostic bit set (TensorRT could not inspect this GPU; see its log above)"
    return ", ".join(parts)


def padded_batch(n: int, min_batch: int, max_batch: int, fixed: bool) -> int:
    """Batch size to run ``n`` images at: at least the profile minimum; with ``fixed``, the next of a few
    sizes (powers of two, and the maximum) so a JIT-compiling runtime meets only a handful of shapes."""
    n = max(n, min_batch)
    if not fixed:
        return n
    b = 1
    while b < n:
        b *= 2
    return min(max(b, min_batch), max_batch)


def runtime_cache_path(engine_path: str | os.PathLike) -> Path:
    """``model.plan`` -> ``model.plan.rtcache`` (TensorRT-RTX JIT kernels, kept beside the engine)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".rtcache")


class RuntimeCacheFile:
    """A TensorRT-RTX runtime cache loaded from, and saved back to, a file beside the engine."""

    def __init__(self, runtime_config: Any, path: Path) -> None:
        self.path = path
        self.cache = runtime_config.create_runtime_cache()
        self.loaded_bytes = 0
        self.note = ""
        if path.is_file():
            blob = path.read_bytes()
            if blob and self.cache.deserialize(blob):
                self.loaded_bytes = len(blob)
            else:
                self.cache.reset()
                self.note = f"runtime cache {path.name} not usable here (other GPU or version); starting empty"
        if not runtime_config.set_runtime_cache(self.cache):
            raise RuntimeError(f"TensorRT-RTX refused the runtime cache for {path}")

    def save(self) -> int:
        """Write the cache (atomically); returns the bytes written."""
        from .._util import atomic_write_bytes

        blob = bytes(memoryview(self.cache.serialize()))
        if blob:
            atomic_write_bytes(self.path, blob)
        return len(blob)


def np_dtype(trt: ModuleType, dt: Any) -> np.dtype:
    table: dict[Any, Any] = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int8: np.int8}
    if hasattr(trt, "int64"):
        table[trt.int64] = np.int64
    if hasattr(trt, "bool"):
        table[trt.bool] = np.bool_
    if dt not in table:
        raise ValueError(f"unsupported TensorRT dtype {dt}")
    return np.dtype(table[dt])




class TensorRTBackend(Backend):
    """``cuda_binding``: "auto" | "cuda-python" | "pycuda"; ``runtime_cache``: keep TensorRT-RTX's
    JIT kernels in ``ENGINE.rtcache``; ``fixed_batches``: pad batches to a few sizes (default: on for
    TensorRT-RTX, whose kernels are specialised per shape); ``sidecar``: the engine's sidecar as
    :func:`leukedge.model.open_model` read it (read here only when not given)."""

    device_kind = "gpu"
    gpu_name: str = ""

    def __init__(self, engine_path: str | os.PathLike, *, flavour: str | None = None, device: int = 0,
                 cuda_binding: str = "auto", runtime_cache: bool = True, fixed_batches: bool | None = None,
                 sidecar: dict[str, Any] | None = None) -> None:
        from .sidecar import (
            EngineMismatchError,
            check_compatible,
            read_sidecar,
            rebuild_command,
            sidecar_config,
        )

        self._closed = True  # until every resource exists
        self._cleanup: list[Any] = []
        self._rt_cache: RuntimeCacheFile | None = None
        self.path = Path(engine_path)
        info = sidecar if sidecar is not None else read_sidecar(self.path)  # already read by open_model: not again
        flavour = flavour or info["flavour"]
        if flavour != info["flavour"]:
            raise EngineMismatchError(
                f"{self.path} is a {info['flavour']} engine, --backend {flavour} was asked for. "
                f"Use --backend {info['flavour']} or rebuild: {rebuild_command(info, self.path, flavour)}"
            )
        trt = import_trt(flavour)
        probe = detect_gpu(device)
        gpu = probe.gpu
        if gpu is None:
            raise BackendUnavailable(f"cannot run {self.path.name}: {probe.reason or 'no CUDA GPU'}")
        check_compatible(info, self.path, flavour=flavour, trt_version=trt.__version__,
                         compute_capability=gpu["compute_capability"])
        self.sidecar, self.flavour, self.trt, self.gpu = info, flavour, trt, gpu
        self.gpu_name = gpu["name"]
        self.config = sidecar_config(info, self.path)
        self.fixed_batches = (flavour == "tensorrt-rtx") if fixed_batches is None else bool(fixed_batches)

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        blob = self.path.read_bytes()
        if hasattr(self.runtime, "get_engine_validity"):
            validity, diag = self.runtime.get_engine_validity(blob)
            if getattr(validity, "name", str(validity)).endswith("INVALID"):
                raise EngineMismatchError(
                    f"{flavour} reports {self.path} as invalid on {gpu['name']} (CC {gpu['compute_capability']}): "
                    f"{describe_validity(trt, diag)}. Rebuild it: {rebuild_command(info, self.path, flavour)}"
                )
        from .cuda_binding import get_binding

        self.cuda = get_binding(cuda_binding, device)
        try:
            with self.cuda.activate():
                self._setup(trt, blob, info, gpu, runtime_cache)
        except BaseException:
            self._release()
            raise
        self._closed = False

    def _setup(self, trt: ModuleType, blob: bytes, info: dict[str, Any], gpu: Any, runtime_cache: bool) -> None:
        """Deserialize the engine and create its context (:meth:`_create_context`), then find the I/O
        tensors and allocate pinned host and device buffers for the largest batch (:meth:`_allocate`)."""
        self._create_context(trt, blob, runtime_cache)
        self._allocate(trt, info, gpu)

    def _create_context(self, trt: ModuleType, blob: bytes, runtime_cache: bool) -> None:
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise RuntimeError(f"{self.flavour} failed to deserialize {self.path} (see the TensorRT log above)")
        self.runtime_cache_note = ""
        if self.flavour == "tensorrt-rtx" and hasattr(self.engine, "create_runtime_config"):
            rconf = self.engine.create_runtime_config()
            strat = getattr(trt, "DynamicShapesKernelSpecializationStrategy", None)
            if strat is not None and hasattr(rconf, "dynamic_shapes_kernel_specialization_strategy"):
                # compile the kernels for each (padded) batch size at once, then reuse them from the cache
                rconf.dynamic_shapes_kernel_specialization_strategy = strat.EAGER
            if runtime_cache:
                self._rt_cache = RuntimeCacheFile(rconf, runtime_cache_path(self.path))
                self.runtime_cache_note = self._rt_cache.note
            self.context = self.engine.create_execution_context(rconf)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{self.flavour} could not create an execution context for {self.path}")

    def _allocate(self, trt: ModuleType, info: dict[str, Any], gpu: Any) -> None:
        cuda = self.cuda
        # I/O tensors
        self.input_name = self.output_name = None
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_name = name
            else:
                self.output_name = name
        if self.input_name is None or self.output_name is None:
            raise RuntimeError(f"{self.path}: expected one input and one output tensor")
        self._in_dt = np_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self._out_dt = np_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        self.input_dtype = str(self._in_dt)
        mn, opt, mx = (tuple(d) for d in self.engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.opt_batch, self.max_batch = mn[0], opt[0], mx[0]
        self.input_size = mx[2]
        self._in_shape_max = mx
        self.num_classes = int(self.engine.get_tensor_shape(self.output_name)[-1])
        in_bytes = int(np.prod(mx)) * self._in_dt.itemsize
        out_bytes = self.max_batch * self.num_classes * self._out_dt.itemsize

        # every resource is registered for release as soon as it exists (a failure half-way frees the rest)
        self._host_in = cuda.host_alloc(in_bytes)
        self._cleanup.append(lambda b=self._host_in: cuda.free_host(b))
        self._host_out = cuda.host_alloc(out_bytes)
        self._cleanup.append(lambda b=self._host_out: cuda.free_host(b))
        self._dev_in = cuda.malloc(in_bytes)
        self._cleanup.append(lambda p=self._dev_in: cuda.free(p))
        self._dev_out = cuda.malloc(out_bytes)
        self._cleanup.append(lambda p=self._dev_out: cuda.free(p))
        self.stream = cuda.stream_create()
        self._cleanup.append(lambda s=self.stream: cuda.stream_destroy(s))
        self._events = []
        for _ in range(4):
            ev = cuda.event_create()
            self._events.append(ev)
            self._cleanup.append(lambda e=ev: cuda.event_destroy(e))
        self.context.set_tensor_address(self.input_name, int(self._dev_in))
        self.context.set_tensor_address(self.output_name, int(self._dev_out))
        prec = info.get("precision", "?")
        self.name = f"{self.flavour}-{prec}"
        self.description = (f"{self.flavour} {trt.__version__} on {gpu['name']} (CC {gpu['compute_capability']}), "
                            f"{self.path.name}, {cuda.name}")

    def infer_impl(self, batch: np.ndarray) -> tuple[np.ndarray, Timing | None]:
        if self._closed:
            raise RuntimeError(f"{getattr(self, 'name', 'tensorrt')}: backend is closed")
        cuda = self.cuda
        n_real = batch.shape[0]
        assert self.max_batch is not None  # set from the engine's profile in _setup
        n = padded_batch(n_real, self.min_batch, self.max_batch, self.fixed_batches)
        shape = (n, *self._in_shape_max[1:])
        host_in = self._host_in.view(self._in_dt, shape)
        np.copyto(host_in[:n_real], batch)
        if n > n_real:
            host_in[n_real:] = 0
        host_out = self._host_out.view(self._out_dt, (n, self.num_classes))
        with cuda.activate():
            if not self.context.set_input_shape(self.input_name, shape):
                raise RuntimeError(f"{self.name}: set_input_shape{shape} rejected (profile {self.min_batch}..{self.max_batch})")
            e0, e1, e2, e3 = self._events
            cuda.event_record(e0, self.stream)
            cuda.htod_async(self._dev_in, host_in, self.stream)
            cuda.event_record(e1, self.stream)
            if not self.context.execute_async_v3(cuda.stream_handle(self.stream)):
                raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log above)")
            cuda.event_record(e2, self.stream)
            cuda.dtoh_async(host_out, self._dev_out, self.stream)
            cuda.event_record(e3, self.stream)
            cuda.stream_sync(self.stream)
            h2d, comp, d2h = cuda.elapsed_ms(e0, e1), cuda.elapsed_ms(e1, e2), cuda.elapsed_ms(e2, e3)
        out = host_out[:n_real].astype(np.float32)
        return out, Timing(total_ms=0.0, compute_ms=comp, h2d_ms=h2d, d2h_ms=d2h)

    def _release(self) -> None:
        """Free what exists, newest first; the TensorRT objects go before the memory they point to."""
        cuda = getattr(self, "cuda", None)
        if cuda is None:
            return
        errors = []
        with cuda.activate():
            if self._cleanup and getattr(self, "stream", None) is not None:
                try:
                    cuda.stream_sync(self.stream)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
            if self._rt_cache is not None:
                try:
                    self._rt_cache.save()
                except Exception as exc:  # noqa: BLE001 - a read-only folder must not stop shutdown
                    errors.append(exc)
            for attr in ("context", "engine"):
                if hasattr(self, attr):
                    delattr(self, attr)
            while self._cleanup:
                try:
                    self._cleanup.pop()()
                except Exception as exc:  # noqa: BLE001 - free the rest regardless
                    errors.append(exc)
        cuda.close()
        if errors:  # never silent: a failed free or cache save is worth a line, but must not stop shutdown
            warnings.warn(f"{self.path.name}: {len(errors)} error(s) while releasing the TensorRT backend: "
                          + "; ".join(f"{type(e).__name__}: {e}" for e in errors), RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._release()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
