"""PyTorch reference backend (from a model bundle, or any ``nn.Module``)."""

from __future__ import annotations

import os
import time

import numpy as np

from .base import Backend, Timing


class TorchBackend(Backend):
    def __init__(self, module, *, device: str = "auto", input_size: int | None = None, half: bool = False) -> None:
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

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, device: str = "auto") -> "TorchBackend":
        from ..models import load_bundle

        bundle = load_bundle(path)
        size = getattr(bundle.config, "size", None)
        b = cls(bundle.model, device=device, input_size=size)
        b.bundle = bundle
        return b

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        batch = self.check_batch(batch)
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            y = self.module(x)
            return y.float().cpu().numpy()

    def infer_timed(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        t0 = time.perf_counter()
        out = self.infer(batch)
        dt = (time.perf_counter() - t0) * 1e3
        return out, Timing(total_ms=dt, compute_ms=dt)
