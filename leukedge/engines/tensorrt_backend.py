"""TensorRT / TensorRT-RTX runtime backend (cuda-python for memory, streams and events).

Pinned host staging buffers (``cudaHostAlloc``) and device buffers are allocated once for the
engine's maximum batch; each call copies the batch into pinned memory, enqueues H2D →
``execute_async_v3`` → D2H on one non-blocking stream and times the three phases with CUDA events.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .base import Backend, BackendUnavailable, Timing

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


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailable("cuda-python is not installed (pip install cuda-python)") from exc
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (err, *values); raise on error, return the value(s)."""
    cudart = _cudart()
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        _, msg = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA {what} failed: {err.name if hasattr(err, 'name') else err}: {msg.decode(errors='replace')}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def gpu_info(device: int = 0) -> dict[str, Any] | None:
    """``{"name", "compute_capability", "driver"}`` of CUDA device ``device``, or None without a usable GPU."""
    try:
        cudart = _cudart()
    except BackendUnavailable:
        return None
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - no driver library at all
        return None
    if err != cudart.cudaError_t.cudaSuccess or count <= device:
        return None
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    err, drv = cudart.cudaDriverGetVersion()
    return {
        "name": name,
        "compute_capability": f"{prop.major}.{prop.minor}",
        "driver": f"{drv // 1000}.{(drv % 1000) // 10}" if err == cudart.cudaError_t.cudaSuccess else None,
        "memory_mib": int(prop.totalGlobalMem) // (1 << 20),
    }


def no_gpu_reason() -> str:
    try:
        cudart = _cudart()
    except BackendUnavailable as exc:
        return str(exc)
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # noqa: BLE001
        return f"CUDA runtime unusable ({exc})"
    if err != cudart.cudaError_t.cudaSuccess:
        _, msg = cudart.cudaGetErrorString(err)
        return f"no usable CUDA GPU ({msg.decode(errors='replace')})"
    if count == 0:
        return "no CUDA GPU found"
    return ""


def np_dtype(trt: ModuleType, dt: Any) -> np.dtype:
    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int8: np.int8}
    if hasattr(trt, "int64"):
        table[trt.int64] = np.int64
    if hasattr(trt, "bool"):
        table[trt.bool] = np.bool_
    if dt not in table:
        raise ValueError(f"unsupported TensorRT dtype {dt}")
    return np.dtype(table[dt])


class _Pinned:
    """Page-locked host buffer exposed as a NumPy array."""

    def __init__(self, nbytes: int) -> None:
        cudart = _cudart()
        self.nbytes = nbytes
        self.ptr = _check(cudart.cudaHostAlloc(nbytes, cudart.cudaHostAllocDefault), "cudaHostAlloc")
        buf = (ctypes.c_uint8 * nbytes).from_address(int(self.ptr))
        self.array = np.frombuffer(buf, dtype=np.uint8)

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.array[:n].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr is not None:
            _cudart().cudaFreeHost(self.ptr)
            self.ptr = None


class TensorRTBackend(Backend):
    def __init__(self, engine_path: str | os.PathLike, *, flavour: str | None = None, device: int = 0) -> None:
        from .sidecar import check_compatible, read_sidecar, sidecar_config

        self.path = Path(engine_path)
        info = read_sidecar(self.path)
        flavour = flavour or info["flavour"]
        if flavour != info["flavour"]:
            from .sidecar import EngineMismatchError, rebuild_command

            raise EngineMismatchError(
                f"{self.path} is a {info['flavour']} engine, --backend {flavour} was asked for. "
                f"Use --backend {info['flavour']} or rebuild: {rebuild_command(info, self.path, flavour)}"
            )
        trt = import_trt(flavour)
        gpu = gpu_info(device)
        if gpu is None:
            raise BackendUnavailable(f"cannot run {self.path.name}: {no_gpu_reason() or 'no CUDA GPU'}")
        check_compatible(info, self.path, flavour=flavour, trt_version=trt.__version__,
                         compute_capability=gpu["compute_capability"])
        self.sidecar, self.flavour, self.trt, self.gpu = info, flavour, trt, gpu
        self.gpu_name = gpu["name"]
        self.config = sidecar_config(info, self.path)
        cudart = _cudart()
        _check(cudart.cudaSetDevice(device), "cudaSetDevice")

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        blob = self.path.read_bytes()
        if hasattr(self.runtime, "get_engine_validity"):
            validity, diag = self.runtime.get_engine_validity(blob)
            if getattr(validity, "name", str(validity)).endswith("INVALID"):
                from .sidecar import EngineMismatchError, rebuild_command

                reasons = [n for n, v in getattr(trt, "EngineInvalidityDiagnostics").__members__.items() if int(diag) & int(v)] \
                    if hasattr(trt, "EngineInvalidityDiagnostics") else [str(diag)]
                raise EngineMismatchError(
                    f"{flavour} reports {self.path} as invalid on {gpu['name']} (CC {gpu['compute_capability']}): "
                    f"{', '.join(reasons) or diag}. Rebuild it: {rebuild_command(info, self.path, flavour)}"
                )
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise RuntimeError(f"{flavour} failed to deserialize {self.path} (see the TensorRT log above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{flavour} could not create an execution context for {self.path}")

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

        self._host_in = _Pinned(in_bytes)
        self._host_out = _Pinned(out_bytes)
        self._dev_in = _check(cudart.cudaMalloc(in_bytes), "cudaMalloc")
        self._dev_out = _check(cudart.cudaMalloc(out_bytes), "cudaMalloc")
        self.stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        self._events = [_check(cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(4)]
        self.context.set_tensor_address(self.input_name, int(self._dev_in))
        self.context.set_tensor_address(self.output_name, int(self._dev_out))
        prec = info.get("precision", "?")
        self.name = f"{flavour}-{prec}"
        self.description = f"{flavour} {trt.__version__} on {gpu['name']} (CC {gpu['compute_capability']}), {self.path.name}"
        self._closed = False

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_timed(batch)[0]

    def infer_timed(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        cudart = _cudart()
        t0 = time.perf_counter()
        batch = self.check_batch(batch)
        n_real = batch.shape[0]
        n = max(n_real, self.min_batch)  # pad a short last batch up to the profile minimum
        shape = (n, *self._in_shape_max[1:])
        host_in = self._host_in.view(self._in_dt, shape)
        np.copyto(host_in[:n_real], batch)
        if n > n_real:
            host_in[n_real:] = 0
        if not self.context.set_input_shape(self.input_name, shape):
            raise RuntimeError(f"{self.name}: set_input_shape{shape} rejected (profile {self.min_batch}..{self.max_batch})")
        e0, e1, e2, e3 = self._events
        H2D, D2H = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        out_bytes = n * self.num_classes * self._out_dt.itemsize
        _check(cudart.cudaEventRecord(e0, self.stream), "cudaEventRecord")
        _check(cudart.cudaMemcpyAsync(self._dev_in, self._host_in.ptr, host_in.nbytes, H2D, self.stream), "H2D copy")
        _check(cudart.cudaEventRecord(e1, self.stream), "cudaEventRecord")
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log above)")
        _check(cudart.cudaEventRecord(e2, self.stream), "cudaEventRecord")
        _check(cudart.cudaMemcpyAsync(self._host_out.ptr, self._dev_out, out_bytes, D2H, self.stream), "D2H copy")
        _check(cudart.cudaEventRecord(e3, self.stream), "cudaEventRecord")
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        out = self._host_out.view(self._out_dt, (n, self.num_classes))[:n_real].astype(np.float32)
        h2d = _check(cudart.cudaEventElapsedTime(e0, e1), "cudaEventElapsedTime")
        comp = _check(cudart.cudaEventElapsedTime(e1, e2), "cudaEventElapsedTime")
        d2h = _check(cudart.cudaEventElapsedTime(e2, e3), "cudaEventElapsedTime")
        total = (time.perf_counter() - t0) * 1e3
        return out, Timing(total_ms=total, compute_ms=float(comp), h2d_ms=float(h2d), d2h_ms=float(d2h))

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        cudart = _cudart()
        cudart.cudaStreamSynchronize(self.stream)
        for e in self._events:
            cudart.cudaEventDestroy(e)
        cudart.cudaStreamDestroy(self.stream)
        cudart.cudaFree(self._dev_in)
        cudart.cudaFree(self._dev_out)
        self._host_in.free()
        self._host_out.free()
        del self.context
        del self.engine

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
