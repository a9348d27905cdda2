"""ONNX Runtime backend (CPU, or the CUDA execution provider when onnxruntime-gpu is installed)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .base import Backend, Timing

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


class OnnxRuntimeBackend(Backend):
    def __init__(self, onnx_path: str | os.PathLike, *, device: str = "auto", threads: int = 0) -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        avail = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in avail:
            raise RuntimeError("device=cuda requested but onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in avail:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        if inp.type not in _ORT_TYPES:
            raise ValueError(f"{self.path}: unsupported input type {inp.type}")
        self.input_dtype = _ORT_TYPES[inp.type]
        self.output_dtype = _ORT_TYPES.get(out.type, "float32")
        shape = inp.shape
        self.max_batch = shape[0] if isinstance(shape[0], int) else None
        if isinstance(shape[2], int):
            self.input_size = shape[2]
        prec = "fp16" if self.input_dtype == "float16" or "fp16" in self.path.name else "fp32"
        self.name = f"onnxruntime-{'cuda' if self.provider.startswith('CUDA') else 'cpu'}-{prec}"
        self.description = f"ONNX Runtime {ort.__version__} {self.provider} ({self.path.name})"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return np.asarray(out, dtype=np.float32)

    def infer_timed(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        t0 = time.perf_counter()
        out = self.infer(batch)
        dt = (time.perf_counter() - t0) * 1e3
        return out, Timing(total_ms=dt, compute_ms=dt)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
