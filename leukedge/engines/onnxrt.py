"""ONNX Runtime backend (CPU, or the CUDA execution provider when onnxruntime-gpu is installed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import Backend, Timing

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


class OnnxRuntimeBackend(Backend):
    """``threads``: intra-op threads on the CPU EP (0: ONNX Runtime's default, one per core).
    ``exclusive``: other cores are busy (pipelined preprocessing), so intra-/inter-op worker threads
    must block instead of spin-waiting between ops (``session.intra_op.allow_spinning = 0``)."""

    provider: str = ""

    def __init__(self, onnx_path: str | os.PathLike, *, device: str = "auto", threads: int = 0,
                 exclusive: bool = False) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.path = Path(onnx_path)
        avail = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in avail:
            raise RuntimeError("device=cuda requested but onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        self.providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in avail:
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        # thread settings only matter on the CPU EP; with CUDA the CPU side just feeds the GPU
        on_gpu = self.providers[0].startswith("CUDA")
        self._threads, self._exclusive = (0, False) if on_gpu else (int(threads), bool(exclusive))
        try:
            self.session = self._make_session()
        except Exception as exc:  # noqa: BLE001 - InvalidProtobuf, Fail, ...: a broken file, not a crash
            raise ValueError(f"{self.path}: ONNX Runtime cannot load this model (truncated, or not an ONNX "
                             f"file): {exc}") from exc
        self.provider = self.session.get_providers()[0]
        self.device_kind = "gpu" if self.provider.startswith("CUDA") else "cpu"
        if on_gpu and self.device_kind == "cpu":  # the CUDA EP failed to load: ONNX Runtime fell back to the CPU
            self.set_threads(threads, exclusive=exclusive)
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
        prec = ("fp16" if self.input_dtype == "float16" or "fp16" in self.path.name
                else "int8" if "int8" in self.path.name else "fp32")
        self.name = f"onnxruntime-{'cuda' if self.provider.startswith('CUDA') else 'cpu'}-{prec}"
        self.description = f"ONNX Runtime {ort.__version__} {self.provider} ({self.path.name})"

    def _make_session(self) -> Any:
        ort = self._ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self._threads:
            opts.intra_op_num_threads = self._threads  # includes the calling thread
            opts.inter_op_num_threads = 1
        if self._exclusive:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        return ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers)

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def exclusive(self) -> bool:
        return self._exclusive

    def session_config(self) -> dict[str, str]:
        """The session config entries actually in force (read back from the live session)."""
        opts = self.session.get_session_options()
        out = {"intra_op_num_threads": str(opts.intra_op_num_threads)}
        for k in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
            try:
                out[k] = opts.get_session_config_entry(k)
            except RuntimeError:  # not set: ONNX Runtime's default (spinning allowed)
                pass
        return out

    def set_threads(self, threads: int, *, exclusive: bool = False) -> None:
        """Re-create the session with ``threads`` intra-op threads (thread counts are fixed per session)."""
        threads, exclusive = int(threads), bool(exclusive)
        if (threads, exclusive) == (self._threads, self._exclusive):
            return
        if not self.on_cpu:  # CUDA EP: the CPU side only feeds the GPU
            return
        self._threads, self._exclusive = threads, exclusive
        self.session = self._make_session()

    def infer_impl(self, batch: np.ndarray) -> tuple[np.ndarray, Timing | None]:
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return np.asarray(out, dtype=np.float32), None

    def close(self) -> None:
        self.session = None
