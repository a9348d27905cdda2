"""PyTorch on CUDA, made fast: the GPU path where no TensorRT exists.

* weights in FP16 (``precision="fp16"``, the default on CUDA) or FP32, memory format ``channels_last``;
* the batch is copied into a pinned host buffer, then to the GPU with a non-blocking copy on the
  backend's own stream, and the logits come back the same way into pinned memory;
* with ``graphs=True`` one CUDA graph is captured per (padded) batch size and replayed
  (:class:`GraphCache`; batches are padded to a few fixed sizes, see ``padded_batch``), so a batch costs one
  graph launch instead of one launch per layer.

On the CPU (``device="cpu"``, FP32, no graphs) the same code runs without pinning or streams; tests use that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .base import Backend, Timing
from .tensorrt_backend import padded_batch


class GraphCache:
    """Captured graphs keyed by batch size: ``get(n)`` captures once per size with ``capture(n)``."""

    def __init__(self, capture: Callable[[int], Any]) -> None:
        self._capture = capture
        self.graphs: dict[int, Any] = {}
        self.captures = 0

    def get(self, n: int) -> Any:
        g = self.graphs.get(n)
        if g is None:
            g = self.graphs[n] = self._capture(n)
            self.captures += 1
        return g

    def clear(self) -> None:
        self.graphs.clear()


class _Captured:
    """One CUDA graph with its static input and output tensors."""

    def __init__(self, graph: Any, static_in: Any, static_out: Any) -> None:
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class TorchCudaBackend(Backend):
    """A PyTorch module on CUDA (FP16 or FP32, channels_last, pinned copies, optional CUDA graphs)."""

    bundle: Any = None  # the loaded model bundle, when created with from_bundle

    def __init__(self, module: Any, *, input_size: int, device: str = "cuda", precision: str = "auto",
                 channels_last: bool = True, graphs: bool | None = None, max_batch: int = 256,
                 fixed_batches: bool = True) -> None:
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("PyTorch sees no CUDA device")
        cuda = device.startswith("cuda")
        if precision == "auto":
            precision = "fp16" if cuda else "fp32"
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16, fp32 or auto, not {precision!r}")
        graphs = cuda if graphs is None else bool(graphs)
        if graphs and not cuda:
            raise ValueError("CUDA graphs need device='cuda'")
        self.torch, self.device, self.cuda = torch, torch.device(device), cuda
        self.precision, self.graphs_enabled = precision, graphs
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = module.eval().to(self.device, dtype=self.dtype, memory_format=self.memory_format)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.input_size = int(input_size)
        self.max_batch = int(max_batch)
        self.min_batch = 1
        self.fixed_batches = bool(fixed_batches)
        self.input_dtype = "float16" if precision == "fp16" else "float32"
        self.device_kind = "gpu" if cuda else "cpu"
        s = self.input_size
        shape_in, shape_out = (self.max_batch, 3, s, s), (self.max_batch, self._num_classes())
        self._host_in: Any = torch.empty(shape_in, dtype=self.dtype, pin_memory=cuda)
        self._host_out: Any = torch.empty(shape_out, dtype=torch.float32, pin_memory=cuda)
        self.stream: Any = torch.cuda.Stream(device=self.device) if cuda else None
        self.graph_cache = GraphCache(self._capture)
        self._closed = False
        gname = "+graphs" if graphs else ""
        self.name = f"torch-{'cuda' if cuda else 'cpu'}-{precision}{gname}"
        where = torch.cuda.get_device_name(self.device) if cuda else "cpu"
        self.description = (f"PyTorch {torch.__version__} on {where}, {precision}"
                            f"{', channels_last' if channels_last else ''}{', CUDA graphs' if graphs else ''}")

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, **kw: Any) -> "TorchCudaBackend":
        from ..models import load_bundle

        bundle = load_bundle(Path(path))
        b = cls(bundle.model, input_size=bundle.config.size, **kw)
        b.bundle = bundle
        return b

    def _num_classes(self) -> int:
        torch = self.torch
        with torch.inference_mode():
            x = torch.zeros((1, 3, self.input_size, self.input_size), dtype=self.dtype, device=self.device)
            return int(self.module(x.contiguous(memory_format=self.memory_format)).shape[-1])

    def _forward(self, x: Any) -> Any:
        return self.module(x.contiguous(memory_format=self.memory_format)).float()

    def _capture(self, n: int) -> _Captured:
        """Warm up on the side stream (as CUDA graph capture requires), then capture one forward pass."""
        torch = self.torch
        static_in = torch.zeros((n, 3, self.input_size, self.input_size), dtype=self.dtype,
                                device=self.device).contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for _ in range(3):
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                static_out = self._forward(static_in)
        return _Captured(graph, static_in, static_out)

    def infer_impl(self, batch: np.ndarray) -> tuple[np.ndarray, Timing | None]:
        if self._closed:
            raise RuntimeError(f"{self.name}: backend is closed")
        torch = self.torch
        n_real = batch.shape[0]
        n = padded_batch(n_real, 1, int(self.max_batch or n_real), self.fixed_batches and self.graphs_enabled)
        host_in = self._host_in[:n]
        host_in[:n_real].copy_(torch.from_numpy(batch))
        if n > n_real:
            host_in[n_real:].zero_()
        host_out = self._host_out[:n]
        if not self.cuda:
            with torch.inference_mode():
                host_out.copy_(self._forward(host_in))
            return host_out[:n_real].numpy().copy(), None
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            ev[0].record(self.stream)
            if self.graphs_enabled:
                g = self.graph_cache.get(n)
                g.static_in.copy_(host_in, non_blocking=True)
                ev[1].record(self.stream)
                g.graph.replay()
                out = g.static_out
            else:
                x = host_in.to(self.device, non_blocking=True)
                ev[1].record(self.stream)
                out = self._forward(x)
            ev[2].record(self.stream)
            host_out.copy_(out, non_blocking=True)
            ev[3].record(self.stream)
        self.stream.synchronize()
        timing = Timing(total_ms=0.0, h2d_ms=ev[0].elapsed_time(ev[1]), compute_ms=ev[1].elapsed_time(ev[2]),
                        d2h_ms=ev[2].elapsed_time(ev[3]))
        return host_out[:n_real].numpy().copy(), timing

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.stream is not None:
            self.stream.synchronize()
        self.graph_cache.clear()
        self._host_in = self._host_out = None
