"""Which CUDA GPU is here, as the CUDA binding sees it, and the one seam tests use to fake one.

:func:`detect_gpu` returns a :class:`GpuProbe`: the usable :class:`GpuInfo` (name, compute capability,
driver and runtime CUDA versions) or ``None`` with the reason (no binding, no driver, driver too old
for the binding's CUDA runtime, no device). Everything that decides on a GPU (engine flavour, engine
compatibility, ``--backend auto``) goes through it.

Faking a GPU (tests, dry runs): the environment variable ``LEUKEDGE_FAKE_GPU`` holding
JSON (``{"name": "NVIDIA H200", "compute_capability": "9.0", "driver": "13.0", "runtime": "12.9"}``) or
``none``; in-process, a :class:`GpuProbe` pushed onto :data:`OVERRIDES` (the tests' ``fake_gpu``). A fake
whose driver major version is below its runtime's reads as "driver too old", exactly like the real
detection. Only detection is faked: CUDA calls made later (memory, streams) still go to the real binding.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

FAKE_GPU_ENV = "LEUKEDGE_FAKE_GPU"
CUDA12_PIN = "cuda-python>=12,<13"


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except (TypeError, ValueError):
        return None


def cuda_version_str(v: int) -> str:
    """CUDA's integer version (12020) as "12.2"."""
    return f"{v // 1000}.{(v % 1000) // 10}"


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device. ``driver``: the CUDA version the driver supports (``cudaDriverGetVersion``);
    ``runtime``: the CUDA runtime version the binding uses (``cudaRuntimeGetVersion``)."""

    name: str
    compute_capability: str
    driver: str | None = None
    runtime: str | None = None
    memory_mib: int | None = None
    fake: bool = False

    def __getitem__(self, key: str) -> Any:  # dict-style access (``gpu["name"]``) used by sidecars and messages
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def driver_too_old(self) -> bool:
        d, r = _major(self.driver), _major(self.runtime)
        return d is not None and r is not None and d < r


@dataclass(frozen=True)
class GpuProbe:
    """Result of :func:`detect_gpu`. ``status``: "ok", "no-binding", "no-driver", "driver-too-old",
    "no-gpu" or "error"; ``reason`` says why there is no usable GPU ("" when there is)."""

    gpu: GpuInfo | None
    status: str
    reason: str = ""
    seen: GpuInfo | None = None  # what was seen even when unusable (e.g. the versions of a too-old driver)


def driver_too_old_reason(driver: str | None, runtime: str | None, binding: str = "cuda-python") -> str:
    return (f"the NVIDIA driver is too old: it supports CUDA {driver}, but {binding} uses the CUDA {runtime} runtime. "
            f"Install the binding for this driver (pip install '{CUDA12_PIN}' for a CUDA 12 driver, "
            f"as leukedge[trt-rtx] pins it) or update the driver (CUDA 13 needs R580 or newer)")


def classify(info: GpuInfo) -> GpuProbe:
    """A probe for a device as seen (real or fake): usable unless its driver is too old for the runtime."""
    if info.driver_too_old:
        return GpuProbe(None, "driver-too-old", driver_too_old_reason(info.driver, info.runtime), seen=info)
    return GpuProbe(info, "ok", "", seen=info)


#: probes pushed here win over the real detection (the in-process seam of the tests' ``fake_gpu``)
OVERRIDES: list[GpuProbe] = []


def _env_override() -> GpuProbe | None:
    raw = os.environ.get(FAKE_GPU_ENV, "").strip()
    if not raw:
        return None
    if raw.lower() in ("none", "0", "no"):
        return GpuProbe(None, "no-gpu", f"no CUDA GPU ({FAKE_GPU_ENV}=none)")
    try:
        fields = json.loads(raw)
        info = GpuInfo(**{**fields, "fake": True})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{FAKE_GPU_ENV} must be 'none' or JSON with name, compute_capability, driver, runtime: {exc}") \
            from exc
    return classify(info)


def detect_gpu(device: int = 0) -> GpuProbe:
    """The GPU ``device`` as the CUDA binding (cuda-python, else pycuda) sees it, unless faked."""
    if OVERRIDES:
        return OVERRIDES[-1]
    env = _env_override()
    if env is not None:
        return env
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef,unused-ignore]  # cuda-python < 12.6
        except ImportError:
            return _detect_pycuda(device)
    return _detect_cudart(cudart, device)


def _detect_cudart(cudart: Any, device: int) -> GpuProbe:
    ok = cudart.cudaError_t.cudaSuccess
    try:
        err_d, drv = cudart.cudaDriverGetVersion()
        err_r, rtv = cudart.cudaRuntimeGetVersion()
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # noqa: BLE001 - a binding that cannot load its libraries at all
        return GpuProbe(None, "error", f"CUDA runtime unusable ({exc})")
    driver = cuda_version_str(drv) if err_d == ok and drv else None
    runtime = cuda_version_str(rtv) if err_r == ok and rtv else None
    if err != ok:
        name = getattr(err, "name", str(err))
        if name == "cudaErrorInsufficientDriver":
            if driver is None:
                return GpuProbe(None, "no-driver", "no NVIDIA driver found (libcuda is not loadable), so no CUDA GPU")
            return GpuProbe(None, "driver-too-old", driver_too_old_reason(driver, runtime),
                            seen=GpuInfo("unknown", "?", driver, runtime))
        if name == "cudaErrorNoDevice":
            return GpuProbe(None, "no-gpu", f"no CUDA GPU found (driver supports CUDA {driver})")
        _, msg = cudart.cudaGetErrorString(err)
        text = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
        return GpuProbe(None, "error", f"no usable CUDA GPU ({name}: {text})")
    if count <= device:
        return GpuProbe(None, "no-gpu", "no CUDA GPU found" if count == 0 else f"no CUDA device {device} ({count} found)")
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err != ok:
        return GpuProbe(None, "error", f"cudaGetDeviceProperties({device}) failed: {getattr(err, 'name', err)}")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return classify(GpuInfo(name, f"{prop.major}.{prop.minor}", driver, runtime, int(prop.totalGlobalMem) >> 20))


def _detect_pycuda(device: int) -> GpuProbe:
    try:
        import pycuda.driver as cuda
    except ImportError:
        return GpuProbe(None, "no-binding", f"no CUDA binding is installed (pip install '{CUDA12_PIN}', or pycuda)")
    try:
        cuda.init()
        driver = cuda_version_str(cuda.get_driver_version())
        runtime = ".".join(str(v) for v in cuda.get_version()[:2])  # the CUDA toolkit pycuda was built with
        if cuda.Device.count() <= device:
            return GpuProbe(None, "no-gpu", "no CUDA GPU found")
        dev = cuda.Device(device)
        cc = ".".join(str(v) for v in dev.compute_capability())
        # pycuda uses only the driver API, so its build toolkit is informative, not a driver requirement
        info = GpuInfo(dev.name(), cc, driver, runtime, dev.total_memory() >> 20)
        return GpuProbe(info, "ok", "", seen=info)
    except Exception as exc:  # noqa: BLE001 - pycuda raises its own LogicError / RuntimeError
        return GpuProbe(None, "error", f"no usable CUDA GPU (pycuda: {exc})")
