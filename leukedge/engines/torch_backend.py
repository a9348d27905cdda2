"""PyTorch reference backend (from a model bundle, or any ``nn.Module``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import Backend, Timing


class TorchBackend(Backend):
    """A PyTorch ``nn.Module`` in eval mode (``device``: "cpu", "cuda" or "auto"); the reference runtime."""

    bundle: Any = None  # the loaded model bundle, when created with from_bundle

    def __init__(self, module: Any, *, device: str = "auto", input_size: int | None = None, half: bool = False,
                 threads: int = 0) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device=cuda requested but torch sees no CUDA GPU")
        self.torch = torch
        self.device = device
        self.half = bool(half and device == "cuda")
        self.module = module.eval().to(device)
        if self.half:
            self.module = self.module.half()
        self.input_dtype = "float16" if self.half else "float32"
        self.input_size = input_size
        self.name = f"torch-{device}" + ("-fp16" if self.half else "")
        self.description = f"PyTorch {torch.__version__} on {device}"
        self.device_kind = "cpu" if device == "cpu" else "gpu"
        self._threads = 0
        self._saved_threads: int | None = None
        if threads:
            self.set_threads(threads)

    @property
    def threads(self) -> int:
        return self._threads

    def set_threads(self, threads: int, *, exclusive: bool = False) -> None:
        """``torch.set_num_threads`` for CPU inference (process-wide in PyTorch; restored by :meth:`close`).
        0 restores the count in force before the first call. No-op on CUDA."""
        if not self.on_cpu:
            return
        torch = self.torch
        threads = int(threads)
        if threads == self._threads:
            return
        if self._saved_threads is None:
            self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads or self._saved_threads)
        self._threads = threads

    def close(self) -> None:
        if self._saved_threads is not None:
            self.torch.set_num_threads(self._saved_threads)
            self._saved_threads, self._threads = None, 0

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, device: str = "auto", threads: int = 0) -> "TorchBackend":
        from ..models import load_bundle

        bundle = load_bundle(Path(path))
        size = getattr(bundle.config, "size", None)
        b = cls(bundle.model, device=device, input_size=size, threads=threads)
        b.bundle = bundle
        return b

    def infer_impl(self, batch: np.ndarray) -> tuple[np.ndarray, Timing | None]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            y = self.module(x)
            return y.float().cpu().numpy(), None
