"""``get_backend``: pick and create the fastest usable backend for a model, and say why."""

from __future__ import annotations

import os
from pathlib import Path

from .._util import BACKEND_CHOICES
from ..config import ConfigMismatchError, PreprocessConfig
from ..model import ModelSpec, open_model
from .base import Backend, BackendUnavailable

BACKENDS = BACKEND_CHOICES

def get_backend(
    kind: str = "auto",
    model: str | os.PathLike | ModelSpec | None = None,
    *,
    device: str = "auto",
    expected_config: PreprocessConfig | None = None,
    threads: int = 0,
    precision: str = "auto",
    exclusive: bool = False,
    cuda_binding: str = "auto",
) -> Backend:
    """Create a backend for ``model``. ``backend.reason`` says why this one was picked.

    ``threads``: intra-op threads of a CPU backend (ONNX Runtime CPU EP, PyTorch on CPU; 0 = runtime default).
    ``exclusive``: those threads share the machine with concurrent preprocessing (no spin-waiting).

    ``expected_config``: if given, the model's preprocessing must match it (mismatch refused).
    ``precision`` (ONNX Runtime, PyTorch on CUDA): "fp32", "fp16", "int8" (the export's checked Q/DQ graph, ONNX
    Runtime only) or "auto" (fp16 on CUDA, fp32 on CPU).
    ``cuda_binding`` (TensorRT): "auto", "cuda-python" or "pycuda".

    auto: a usable TensorRT engine, else PyTorch on CUDA (model bundle), else ONNX Runtime, else PyTorch on
    the CPU. An engine that cannot run here (no GPU, another GPU or TensorRT version) is "not usable, because";
    only a preprocessing mismatch is fatal. ``device="cpu"`` never tries an engine.
    """
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    spec = model if isinstance(model, ModelSpec) else open_model(model)
    if expected_config is not None:
        expected_config.require_same_pixels(spec.config, what="station/bundle", against=f"model {spec.path}")

    reasons: list[str] = []
    b: Backend | None = None
    if kind == "auto" and device == "cpu":
        reasons.append("device cpu: TensorRT and CUDA skipped")
    elif kind in ("auto", "tensorrt", "tensorrt-rtx"):
        b = _tensorrt_or_reason(spec, kind, cuda_binding, reasons)
    if b is None and kind == "auto" and device != "cpu" and precision == "int8":
        reasons.append("precision int8: PyTorch on CUDA skipped (INT8 runs on ONNX Runtime or a TensorRT engine)")
    elif b is None and kind == "auto" and device != "cpu":
        b = _torch_cuda_or_reason(spec, precision, reasons)
    if b is None and kind in ("auto", "onnxruntime"):
        b = _onnxruntime_or_reason(spec, kind, device, precision, threads, exclusive, reasons)
    if b is None and kind in ("auto", "torch"):
        b = _torch_or_reason(spec, kind, device, precision, threads, reasons)
    if b is None:
        hint = " (ONNX Runtime runs every exported model: pip install \"leukedge[infer]\")" if kind == "auto" else ""
        raise BackendUnavailable(f"no usable backend for {spec.path}: " + "; ".join(reasons) + hint)
    b.spec = spec
    return b


def _tensorrt_or_reason(spec: ModelSpec, kind: str, cuda_binding: str, reasons: list[str]) -> Backend | None:
    """The model's TensorRT engine if it runs here; in auto mode None (with the reason appended) otherwise."""
    if spec.engine is None:
        if kind != "auto":
            raise BackendUnavailable(
                f"{spec.path} has no TensorRT engine; build one with `leukedge build-engine {spec.path} -o ENGINE`"
            )
        reasons.append("no TensorRT engine for this model")
        return None
    try:
        from .tensorrt_backend import TensorRTBackend

        flavour = None if kind == "auto" else kind
        b = TensorRTBackend(spec.engine, flavour=flavour, cuda_binding=cuda_binding, sidecar=spec.sidecar)
        b.reason = f"engine {spec.engine.name} usable on {b.gpu_name}"
        return b
    except Exception as exc:  # noqa: BLE001 - reported below
        better = _rebuild_from_requested(spec, exc)
        if kind != "auto" or _is_mismatch(exc):
            if better is not None:
                raise better from exc
            raise
        reasons.append(f"TensorRT engine {spec.engine.name} not usable: {better or exc}")
        return None


def _rebuild_from_requested(spec: ModelSpec, exc: BaseException) -> BaseException | None:
    """An engine mismatch's rebuild hint names the ONNX file the engine was once built from; the same error
    with the command that rebuilds it from the export of the model that was asked for (None: no change)."""
    from ..artifacts import EngineMismatchError

    export = next((p.parent for p in (spec.onnx_fp16, spec.onnx_fp32) if p is not None), None)
    if not isinstance(exc, EngineMismatchError) or export is None or spec.engine is None:
        return None
    import shlex

    cmd = f"leukedge build-engine {shlex.quote(str(export))} -o {shlex.quote(str(spec.engine))}"
    if cmd in str(exc):
        return None
    return EngineMismatchError(f"{exc} To rebuild it from the model you asked for ({spec.path}): {cmd}")


def _onnxruntime_or_reason(spec: ModelSpec, kind: str, device: str, precision: str, threads: int, exclusive: bool,
                           reasons: list[str]) -> Backend | None:
    onnx_path = _pick_onnx(spec, device, precision)
    if onnx_path is None:
        if kind != "auto":
            raise BackendUnavailable(f"{spec.path} has no ONNX export; run `leukedge export {spec.path} -o OUT`")
        reasons.append("no ONNX export")
        return None
    try:
        from .onnxrt import OnnxRuntimeBackend

        b = OnnxRuntimeBackend(onnx_path, device=device, threads=threads, exclusive=exclusive)
    except ImportError as exc:
        if kind != "auto":
            raise BackendUnavailable(f"onnxruntime is not installed: {exc}") from exc
        reasons.append(f"onnxruntime unavailable ({exc})")
        return None
    b.reason = "; ".join(reasons + [f"ONNX Runtime ({b.provider}) on {onnx_path.name}"])
    b.input_size = spec.config.size
    return b


def _torch_or_reason(spec: ModelSpec, kind: str, device: str, precision: str, threads: int,
                     reasons: list[str]) -> Backend | None:
    if spec.bundle is None:
        if kind != "auto":
            raise BackendUnavailable(f"{spec.path} is not a model bundle; the PyTorch backend needs one")
        reasons.append("no model bundle for PyTorch")
        return None
    b: Backend
    if kind == "torch" and device != "cpu" and _torch_cuda_available():
        from .torch_cuda import TorchCudaBackend

        b = TorchCudaBackend.from_bundle(spec.bundle, precision=precision)
        b.reason = f"PyTorch on CUDA ({b.description})"
        return b
    try:
        from .torch_backend import TorchBackend
    except ImportError as exc:  # a lean install (leukedge[infer] without torch), or neither runtime at all
        if kind != "auto":
            raise BackendUnavailable(f"PyTorch is not installed ({exc}): pip install \"leukedge[train]\"") from exc
        reasons.append(f"PyTorch not installed ({exc})")
        return None
    tb = TorchBackend.from_bundle(spec.bundle, device="cpu" if kind == "auto" else device, threads=threads)
    tb.reason = "; ".join(reasons + [f"PyTorch reference on {tb.device}"])
    return tb


def _is_mismatch(exc: BaseException) -> bool:
    """Fatal even in auto mode: the engine's preprocessing differs from the model's. An engine built for
    another GPU or TensorRT version is merely not usable here."""
    return isinstance(exc, ConfigMismatchError)


def _torch_cuda_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _torch_cuda_or_reason(spec: ModelSpec, precision: str, reasons: list[str]) -> Backend | None:
    """auto's second choice: PyTorch on CUDA for a model bundle; None (with the reason appended) otherwise."""
    if spec.bundle is None:
        reasons.append("no model bundle for PyTorch on CUDA")
        return None
    from .gpu import detect_gpu

    probe = detect_gpu()
    if probe.status in ("driver-too-old", "no-gpu"):  # the binding looked and found nothing usable
        reasons.append(f"PyTorch on CUDA skipped: {probe.reason}")
        return None
    if not _torch_cuda_available():
        reasons.append("PyTorch sees no CUDA device")
        return None
    from .torch_cuda import TorchCudaBackend

    try:
        b = TorchCudaBackend.from_bundle(spec.bundle, precision=precision)
    except RuntimeError as exc:  # CUDA out of memory, capture failure, ...
        reasons.append(f"PyTorch on CUDA failed to start ({exc})")
        return None
    b.reason = "; ".join(reasons + [f"PyTorch on CUDA ({b.description})"])
    return b


def _pick_onnx(spec: ModelSpec, device: str, precision: str) -> Path | None:
    """The ONNX graph for ``precision``: "int8" only the Q/DQ graph that passed its export check (refused
    otherwise); "auto" never picks INT8 (FP16 on CUDA, else FP32)."""
    if precision == "int8":
        if spec.onnx_int8 is None:
            raise BackendUnavailable(
                f"{spec.path} has no INT8 graph that passed its export check; run `leukedge export BUNDLE -o OUT "
                f"--int8 --calibrate CACHE` (see export_report.json for why an INT8 graph failed)")
        return spec.onnx_int8
    cuda = False
    if device in ("auto", "cuda"):
        try:
            import onnxruntime as ort

            cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        except ImportError:
            cuda = False
    if precision == "fp16" or (precision == "auto" and cuda):
        return spec.onnx_fp16 or spec.onnx_fp32 or spec.onnx_int8
    return spec.onnx_fp32 or spec.onnx_fp16 or spec.onnx_int8
