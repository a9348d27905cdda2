"""The CUDA calls the TensorRT backend needs, over two Python bindings: cuda-python and pycuda.

Both give the same small interface (:class:`CudaBinding`): pinned host buffers, device buffers,
a non-blocking stream, async copies, events and ``cudaMemGetInfo``. Both work in the device's
*primary* context, which is the one TensorRT and the CUDA runtime use: cuda-python's runtime API does
so by itself; for pycuda the adapter retains the primary context (``Device.retain_primary_context``)
and pushes it around every call, instead of ``pycuda.autoinit``'s private context, which TensorRT
does not see from other threads.

``get_binding("auto")`` takes cuda-python if importable, else pycuda.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .base import BackendUnavailable
from .gpu import CUDA12_PIN

BINDINGS = ("auto", "cuda-python", "pycuda")
PYCUDA_HINT = ("pycuda ships only as a source distribution and builds against the CUDA toolkit: on the GPU machine, "
               "with nvcc on PATH, `pip install pycuda` (see the README, 'Taking it to a GPU machine'); "
               "or use --cuda-binding cuda-python")


@dataclass
class PinnedBuffer:
    """Page-locked host memory: its address and a uint8 NumPy view of it (``array`` is None once freed)."""

    ptr: int
    nbytes: int
    array: np.ndarray | None
    token: Any = field(default=None, repr=False)

    def view(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        if self.array is None:
            raise RuntimeError("pinned buffer used after it was freed")
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.array[:n].view(dtype).reshape(shape)


class CudaBinding(abc.ABC):
    name = "cuda"

    def __init__(self, device: int = 0) -> None:
        self.device = device

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Make this binding's context current on the calling thread for the duration."""
        yield

    @abc.abstractmethod
    def version(self) -> str: ...
    @abc.abstractmethod
    def host_alloc(self, nbytes: int) -> PinnedBuffer: ...
    @abc.abstractmethod
    def free_host(self, buf: PinnedBuffer) -> None: ...
    @abc.abstractmethod
    def malloc(self, nbytes: int) -> int: ...
    @abc.abstractmethod
    def free(self, ptr: int) -> None: ...
    @abc.abstractmethod
    def stream_create(self) -> Any: ...
    @abc.abstractmethod
    def stream_handle(self, stream: Any) -> int: ...
    @abc.abstractmethod
    def stream_sync(self, stream: Any) -> None: ...
    @abc.abstractmethod
    def stream_destroy(self, stream: Any) -> None: ...
    @abc.abstractmethod
    def event_create(self) -> Any: ...
    @abc.abstractmethod
    def event_record(self, event: Any, stream: Any) -> None: ...
    @abc.abstractmethod
    def elapsed_ms(self, start: Any, end: Any) -> float: ...
    @abc.abstractmethod
    def event_destroy(self, event: Any) -> None: ...
    @abc.abstractmethod
    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        """Copy the pinned host view ``src`` (contiguous) to device address ``dst``."""
    @abc.abstractmethod
    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        """Copy ``dst.nbytes`` from device address ``src`` into the pinned host view ``dst``."""
    @abc.abstractmethod
    def dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None: ...
    @abc.abstractmethod
    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


class CudaPythonBinding(CudaBinding):
    """NVIDIA's cuda-python (``cuda.bindings.runtime``): every call returns ``(err, *values)``."""

    name = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        super().__init__(device)
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart  # type: ignore[no-redef,unused-ignore]  # cuda-python < 12.6
            except ImportError as exc:
                raise BackendUnavailable(f"cuda-python is not installed (pip install '{CUDA12_PIN}')") from exc
        self.rt = cudart
        self.check(cudart.cudaSetDevice(device), "cudaSetDevice")

    def check(self, result: Any, what: str) -> Any:
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            _, msg = self.rt.cudaGetErrorString(err)
            text = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
            raise RuntimeError(f"CUDA {what} failed: {getattr(err, 'name', err)}: {text}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        self.check(self.rt.cudaSetDevice(self.device), "cudaSetDevice")  # per host thread
        yield

    def version(self) -> str:
        try:
            from cuda import bindings

            return str(bindings.__version__)
        except (ImportError, AttributeError):
            import cuda

            return str(getattr(cuda, "__version__", "?"))

    def host_alloc(self, nbytes: int) -> PinnedBuffer:
        ptr = int(self.check(self.rt.cudaHostAlloc(nbytes, self.rt.cudaHostAllocDefault), "cudaHostAlloc"))
        arr = np.frombuffer(memoryview((ctypes.c_uint8 * nbytes).from_address(ptr)), dtype=np.uint8)
        return PinnedBuffer(ptr, nbytes, arr)

    def free_host(self, buf: PinnedBuffer) -> None:
        buf.array = None
        self.check(self.rt.cudaFreeHost(buf.ptr), "cudaFreeHost")

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def stream_create(self) -> Any:
        return self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_sync(self, stream: Any) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream: Any) -> None:
        self.check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def event_create(self) -> Any:
        return self.check(self.rt.cudaEventCreate(), "cudaEventCreate")

    def event_record(self, event: Any, stream: Any) -> None:
        self.check(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self.check(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def event_destroy(self, event: Any) -> None:
        self.check(self.rt.cudaEventDestroy(event), "cudaEventDestroy")

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream), "H2D copy")

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream), "D2H copy")

    def dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "D2D copy")

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self.check(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)


class PycudaBinding(CudaBinding):
    """pycuda (driver API) in the device's retained primary context, pushed around every use."""

    name = "pycuda"

    def __init__(self, device: int = 0) -> None:
        super().__init__(device)
        try:
            import pycuda.driver as cuda
        except ImportError as exc:
            raise BackendUnavailable(f"pycuda is not installed ({exc}). {PYCUDA_HINT}") from exc
        self.cuda = cuda
        cuda.init()
        self.ctx = cuda.Device(device).retain_primary_context()
        self._allocs: dict[int, Any] = {}

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        self.ctx.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def version(self) -> str:
        import pycuda

        return str(getattr(pycuda, "VERSION_TEXT", "?"))

    def host_alloc(self, nbytes: int) -> PinnedBuffer:
        with self.activate():
            arr = self.cuda.pagelocked_empty(nbytes, np.uint8)
        return PinnedBuffer(int(arr.ctypes.data), nbytes, arr, token=arr.base)

    def free_host(self, buf: PinnedBuffer) -> None:
        buf.array = None
        with self.activate():
            buf.token.free()

    def malloc(self, nbytes: int) -> int:
        with self.activate():
            a = self.cuda.mem_alloc(nbytes)
        self._allocs[int(a)] = a
        return int(a)

    def free(self, ptr: int) -> None:
        with self.activate():
            self._allocs.pop(ptr).free()

    def stream_create(self) -> Any:
        with self.activate():
            return self.cuda.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_sync(self, stream: Any) -> None:
        with self.activate():
            stream.synchronize()

    def stream_destroy(self, stream: Any) -> None:
        self.stream_sync(stream)  # pycuda destroys the stream when the object goes

    def event_create(self) -> Any:
        with self.activate():
            return self.cuda.Event()

    def event_record(self, event: Any, stream: Any) -> None:
        with self.activate():
            event.record(stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        with self.activate():
            return float(end.time_since(start))

    def event_destroy(self, event: Any) -> None:
        pass  # freed with the object

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        with self.activate():
            self.cuda.memcpy_htod_async(dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        with self.activate():
            self.cuda.memcpy_dtoh_async(dst, src, stream)

    def dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        with self.activate():
            self.cuda.memcpy_dtod_async(dst, src, nbytes, stream)

    def mem_get_info(self) -> tuple[int, int]:
        with self.activate():
            free, total = self.cuda.mem_get_info()
        return int(free), int(total)

    def close(self) -> None:
        for a in self._allocs.values():
            with contextlib.suppress(Exception):
                a.free()
        self._allocs.clear()


_CLASSES: dict[str, type[CudaBinding]] = {"cuda-python": CudaPythonBinding, "pycuda": PycudaBinding}


def get_binding(name: str = "auto", device: int = 0) -> CudaBinding:
    """The CUDA binding ``name`` (auto: cuda-python, else pycuda); BackendUnavailable says how to get one."""
    if name not in BINDINGS:
        raise ValueError(f"unknown CUDA binding {name!r}; choose one of {', '.join(BINDINGS)}")
    if name != "auto":
        return _CLASSES[name](device)
    errors = []
    for cls in (CudaPythonBinding, PycudaBinding):
        try:
            return cls(device)
        except BackendUnavailable as exc:
            errors.append(str(exc))
    raise BackendUnavailable("no CUDA binding usable: " + "; ".join(errors))
