"""One small interface over the inference runtimes (TensorRT / TensorRT-RTX, ONNX Runtime, PyTorch).

``get_backend("auto", model)`` resolves ``model`` (a model bundle directory, an export directory,
an ONNX file or an engine file), picks the fastest usable runtime and says which and why.
"""

from __future__ import annotations

import abc
import math
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PreprocessConfig

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx", "onnxruntime", "torch")
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
EXPORT_FP32 = "model_fp32.onnx"
EXPORT_FP16 = "model_fp16.onnx"


# Expected share of the per-image CPU cost taken by the Rust preprocessing when the network also runs on the
# CPU (benchmarks/results/infer.json: decode + stain + resize of a 450x450 cell is ~3-5x cheaper than even the
# "tiny" CNN on ONNX Runtime; real models are heavier still). Used only to split cores automatically.
EXPECTED_PREPROCESS_SHARE = 0.25


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    """How the cores are shared between Rust preprocessing (rayon pool) and the backend (intra-op threads).

    ``backend`` = 0 means "the runtime's own default" (GPU backends, where the CPU side is negligible).
    ``partitioned``: the two stages run at the same time on disjoint core counts (pipelined CPU backend).
    """

    preprocess: int
    backend: int
    cores: int
    backend_on_cpu: bool
    pipeline: bool
    partitioned: bool
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return {"preprocess": self.preprocess, "backend": self.backend, "cores": self.cores,
                "backend_on_cpu": self.backend_on_cpu, "pipeline": self.pipeline, "partitioned": self.partitioned,
                "rule": self.rule}

    def __str__(self) -> str:
        be = "runtime default" if self.backend == 0 else str(self.backend)
        return (f"{self.cores} cores: preprocess {self.preprocess}, backend {be}"
                f" ({'partitioned' if self.partitioned else 'not partitioned'})")


THREAD_RULE = (
    "GPU backend: preprocessing gets every core. CPU backend, pipelined: the cores are split so the two "
    "stages never compete - preprocessing gets round(cores x {share}) clamped to [1, cores-1] (its expected "
    "share of the per-image cost), the backend the rest; a stage given explicitly keeps its count and the other "
    "gets the remaining cores (at least 1). When that share is under one core (fewer than {few} cores), reserving a "
    "core for preprocessing would idle it most of the time, so both stages use every core, still pipelined. "
    "CPU backend, sequential (--no-pipeline): the stages take turns, so each gets every core. One core: both stages "
    "get 1 thread."
).format(share=EXPECTED_PREPROCESS_SHARE, few=math.ceil(1 / EXPECTED_PREPROCESS_SHARE))


def plan_threads(*, backend_on_cpu: bool, pipeline: bool = True, preprocess: int = 0, backend: int = 0,
                 cores: int | None = None, preprocess_share: float = EXPECTED_PREPROCESS_SHARE) -> ThreadPlan:
    """Thread counts for both stages (0 = automatic); the rule is :data:`THREAD_RULE`."""
    n = int(cores or usable_cores())
    if preprocess < 0 or backend < 0:
        raise ValueError("thread counts must be >= 0 (0 = automatic)")
    if not backend_on_cpu:
        return ThreadPlan(preprocess or n, backend, n, False, pipeline, False,
                          "GPU backend: preprocessing uses every core" if not preprocess else "given")
    if not pipeline:
        return ThreadPlan(preprocess or n, backend or n, n, True, False, False,
                          "sequential: each stage uses every core in turn")
    if n == 1:
        return ThreadPlan(preprocess or 1, backend or 1, n, True, True, False, "one core: nothing to partition")
    if preprocess and backend:
        rule = "given"
    elif preprocess:
        backend, rule = max(1, n - preprocess), "backend gets the cores preprocessing leaves"
    elif backend:
        preprocess, rule = max(1, n - backend), "preprocessing gets the cores the backend leaves"
    elif n * preprocess_share < 1:
        # Measured on 2 cores (benchmarks/results/infer.json): ONNX Runtime FP32 on 1 core + preprocessing on
        # the other gave ~270 img/s; both on both cores, pipelined, ~450-500 img/s.
        return ThreadPlan(n, n, n, True, True, False,
                          f"few cores: preprocessing's share ({n} x {preprocess_share:g}) is under one core, "
                          "so both stages use every core, pipelined")
    else:
        preprocess = min(n - 1, max(1, round(n * preprocess_share)))
        backend = n - preprocess
        rule = f"auto split: preprocessing round({n} x {preprocess_share:g}) in [1, {n - 1}], backend the rest"
    return ThreadPlan(preprocess, backend, n, True, True, preprocess + backend <= n, rule)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (missing package, no GPU, no suitable model file)."""


@dataclass
class Timing:
    """Times of one ``infer_timed`` call, in milliseconds (``None`` where not measured)."""

    total_ms: float
    compute_ms: float | None = None
    h2d_ms: float | None = None
    d2h_ms: float | None = None


class Backend(abc.ABC):
    """Runs a classifier on preprocessed NCHW batches and returns logits ``(N, 2)`` as float32."""

    name: str = "backend"
    input_dtype: str = "float32"
    max_batch: int | None = None  # None: unbounded
    input_size: int | None = None
    description: str = ""

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def infer_timed(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        import time

        t0 = time.perf_counter()
        out = self.infer(batch)
        dt = (time.perf_counter() - t0) * 1e3
        return out, Timing(total_ms=dt, compute_ms=dt)

    device_kind: str | None = None  # "cpu" | "gpu"; None: inferred from ``name``

    @property
    def on_cpu(self) -> bool:
        """True when the network runs on the host CPU (so it competes with preprocessing for cores)."""
        if self.device_kind is not None:
            return self.device_kind == "cpu"
        return not (self.name.startswith("tensorrt") or "cuda" in self.name)

    @property
    def threads(self) -> int:
        """Intra-op threads the backend uses (0: the runtime's default)."""
        return 0

    def set_threads(self, threads: int, *, exclusive: bool = False) -> None:  # noqa: B027 - optional hook
        """Use ``threads`` intra-op threads (0: the runtime default). ``exclusive``: the other cores are busy
        with preprocessing, so the backend must not spin-wait on them. No-op for GPU backends."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"{self.name}: expected an NCHW batch (N,3,S,S), got shape {batch.shape}")
        if self.input_size is not None and batch.shape[2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name}: model input is {self.input_size}x{self.input_size}, batch is {batch.shape[2]}x{batch.shape[3]}"
            )
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            raise ValueError(f"{self.name}: batch of {batch.shape[0]} exceeds the maximum batch {self.max_batch}")
        if batch.dtype != np.dtype(self.input_dtype):
            batch = batch.astype(self.input_dtype)
        return np.ascontiguousarray(batch)

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# model resolution
@dataclass
class ModelSpec:
    """What a MODEL argument points at."""

    kind: str  # "bundle" | "export" | "onnx" | "engine"
    path: Path
    config: PreprocessConfig
    meta: dict[str, Any] = field(default_factory=dict)
    bundle: Path | None = None
    onnx_fp32: Path | None = None
    onnx_fp16: Path | None = None
    engine: Path | None = None

    @property
    def preprocess_hash(self) -> str:
        return self.config.pixel_hash()

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or ["hem", "all"])


def onnx_config(path: Path) -> tuple[PreprocessConfig, dict[str, Any]]:
    """Preprocessing config and metadata of an ONNX file (metadata_props, else a sibling preprocess.json)."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and friends: not an ONNX file
        raise ValueError(f"{path}: not a valid ONNX model (truncated or another kind of file): {exc}") from exc
    props = {p.key: p.value for p in m.metadata_props}
    if "leukedge.preprocess" in props:
        cfg = PreprocessConfig.from_json(props["leukedge.preprocess"])
        stored = props.get("leukedge.preprocess_hash")
        if stored and stored != cfg.pixel_hash():
            raise ValueError(f"{path}: metadata preprocess hash does not match its preprocessing config")
        meta = json.loads(props.get("leukedge.meta", "{}"))
        return cfg, meta
    side = path.parent / "preprocess.json"
    if side.is_file():
        return PreprocessConfig.load(side), {}
    raise ValueError(f"{path}: ONNX file carries no leukedge preprocessing config (metadata or preprocess.json)")


def find_engine(export_dir: Path) -> Path | None:
    for suf in ENGINE_SUFFIXES:
        for p in sorted(export_dir.glob(f"*{suf}")):
            if (p.parent / (p.name + ".json")).is_file():
                return p
    return None


def resolve_model(model: str | os.PathLike) -> ModelSpec:
    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"model {p} does not exist (expected a bundle dir, export dir, .onnx or engine file)")
    if p.is_dir() and (p / "bundle.json").is_file():
        from ..bundle_meta import BundleMetaError, validate_bundle_meta

        try:
            meta = validate_bundle_meta(json.loads((p / "bundle.json").read_text()), p / "bundle.json")
            cfg = PreprocessConfig.from_dict(meta["preprocess"])
        except BundleMetaError:
            raise
        except (ValueError, TypeError) as exc:  # invalid JSON, bad preprocess settings
            raise ValueError(f"{p}/bundle.json: not a valid model bundle: {exc}") from exc
        if meta.get("preprocess_hash") and meta["preprocess_hash"] != cfg.pixel_hash():
            raise ValueError(f"{p}/bundle.json: preprocess_hash does not match its preprocessing config")
        spec = ModelSpec("bundle", p, cfg, meta, bundle=p)
        exp = p / "export"
        if (exp / "preprocess.json").is_file():
            _fill_export(spec, exp)
        return spec
    if p.is_dir() and (p / "preprocess.json").is_file():
        cfg = PreprocessConfig.load(p / "preprocess.json")
        meta: dict[str, Any] = {}
        if (p / "export.json").is_file():
            meta = json.loads((p / "export.json").read_text())
            if meta.get("preprocess_hash") and meta["preprocess_hash"] != cfg.pixel_hash():
                raise ValueError(f"{p}/export.json: preprocess_hash does not match preprocess.json")
        spec = ModelSpec("export", p, cfg, meta)
        _fill_export(spec, p)
        if spec.onnx_fp32 is None and spec.onnx_fp16 is None:
            raise ValueError(f"{p}: export directory has no {EXPORT_FP32} / {EXPORT_FP16}")
        if meta.get("bundle") and (p / meta["bundle"]).is_dir():  # absolute, or ".." for a bundle's export/
            spec.bundle = (p / meta["bundle"]).resolve()
        return spec
    if p.is_dir():
        raise ValueError(f"{p}: not a model bundle (bundle.json) or an export directory (preprocess.json)")
    if p.suffix == ".onnx":
        cfg, meta = onnx_config(p)
        spec = ModelSpec("onnx", p, cfg, meta)
        if "float16" in str(meta.get("precision", "")) or p.name == EXPORT_FP16:
            spec.onnx_fp16 = p
        else:
            spec.onnx_fp32 = p
        return spec
    if p.suffix in ENGINE_SUFFIXES or (p.parent / (p.name + ".json")).is_file():
        from .sidecar import read_sidecar, sidecar_config

        info = read_sidecar(p)
        cfg = sidecar_config(info, p)
        spec = ModelSpec("engine", p, cfg, {"sidecar": info, "class_names": info.get("class_names")}, engine=p)
        # fall-back ONNX files of the export the engine was built from, if still there
        src = (info.get("onnx") or {}).get("path")
        if src and Path(src).is_file():
            exp = Path(src).parent
            if (exp / "preprocess.json").is_file():
                from .sidecar import check_preprocess

                check_preprocess(info, p, PreprocessConfig.load(exp / "preprocess.json"), f"export {exp}")
                for name, attr in ((EXPORT_FP32, "onnx_fp32"), (EXPORT_FP16, "onnx_fp16")):
                    if (exp / name).is_file():
                        setattr(spec, attr, exp / name)
        return spec
    raise ValueError(f"{p}: unrecognised model file (expected .onnx or an engine {'/'.join(ENGINE_SUFFIXES)} with sidecar)")


def _fill_export(spec: ModelSpec, exp: Path) -> None:
    from .sidecar import check_preprocess, read_sidecar

    exp_cfg = PreprocessConfig.load(exp / "preprocess.json")
    if exp_cfg.pixel_hash() != spec.config.pixel_hash():
        from ..config import ConfigMismatchError

        raise ConfigMismatchError(f"{exp}/preprocess.json does not match the preprocessing of {spec.path}")
    if (exp / EXPORT_FP32).is_file():
        spec.onnx_fp32 = exp / EXPORT_FP32
    if (exp / EXPORT_FP16).is_file():
        spec.onnx_fp16 = exp / EXPORT_FP16
    _check_export_hashes(exp)
    eng = find_engine(exp)
    if eng is not None:
        info = read_sidecar(eng)
        check_preprocess(info, eng, spec.config, f"{spec.kind} {spec.path}")
        spec.engine = eng
        spec.meta.setdefault("sidecar", info)


def _check_export_hashes(exp: Path) -> None:
    """Refuse an export folder whose ONNX files are not the ones its ``export.json`` lists (e.g. another
    model's file copied in): the model is identified by what runs, not by what the folder names."""
    manifest = exp / "export.json"
    if not manifest.is_file():
        return
    from ..data import file_sha256

    try:
        files = json.loads(manifest.read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{manifest}: unreadable export manifest: {exc}") from exc
    for entry in files.values() if isinstance(files, dict) else []:
        if not isinstance(entry, dict) or not str(entry.get("path", "")).endswith(".onnx") or not entry.get("sha256"):
            continue
        f = exp / Path(str(entry["path"])).name
        if f.is_file() and file_sha256(f) != entry["sha256"]:
            raise ValueError(
                f"{f} does not match {manifest.name} (sha256 {file_sha256(f)[:12]} != {str(entry['sha256'])[:12]}): "
                "the folder holds another model's ONNX file; export the model again"
            )


# --------------------------------------------------------------------------------------------
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
    ``precision`` (ONNX Runtime, PyTorch on CUDA): "fp32", "fp16" or "auto" (fp16 on CUDA, fp32 on CPU).
    ``cuda_binding`` (TensorRT): "auto", "cuda-python" or "pycuda".

    auto: a usable TensorRT engine, else PyTorch on CUDA (model bundle), else ONNX Runtime, else PyTorch on
    the CPU. An engine that cannot run here (no GPU, another GPU or TensorRT version) is "not usable, because";
    only a preprocessing mismatch is fatal. ``device="cpu"`` never tries an engine.
    """
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if model is None:
        from ..infer import default_model_path

        model = default_model_path()
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    if expected_config is not None:
        expected_config.require_same_pixels(spec.config, what="station/bundle", against=f"model {spec.path}")

    reasons: list[str] = []
    if kind == "auto" and device == "cpu":
        reasons.append("device cpu: TensorRT and CUDA skipped")
    elif kind in ("auto", "tensorrt", "tensorrt-rtx"):
        if spec.engine is not None:
            try:
                from .tensorrt_backend import TensorRTBackend

                flavour = None if kind == "auto" else kind
                b = TensorRTBackend(spec.engine, flavour=flavour, cuda_binding=cuda_binding)
                b.device_kind = "gpu"
                b.reason = f"engine {spec.engine.name} usable on {b.gpu_name}"
                b.spec = spec
                return b
            except Exception as exc:  # noqa: BLE001 - reported below
                if kind != "auto" or _is_mismatch(exc):
                    raise
                reasons.append(f"TensorRT engine {spec.engine.name} not usable: {exc}")
        elif kind != "auto":
            raise BackendUnavailable(
                f"{spec.path} has no TensorRT engine; build one with `leukedge build-engine {spec.path} -o ENGINE`"
            )
        else:
            reasons.append("no TensorRT engine for this model")
    if kind == "auto" and device != "cpu":
        b = _torch_cuda_or_reason(spec, precision, reasons)
        if b is not None:
            return b
    if kind in ("auto", "onnxruntime"):
        onnx_path = _pick_onnx(spec, device, precision)
        if onnx_path is not None:
            try:
                from .onnxrt import OnnxRuntimeBackend

                b = OnnxRuntimeBackend(onnx_path, device=device, threads=threads, exclusive=exclusive)
                b.reason = "; ".join(reasons + [f"ONNX Runtime ({b.provider}) on {onnx_path.name}"])
                b.spec = spec
                b.input_size = spec.config.size
                return b
            except ImportError as exc:
                if kind != "auto":
                    raise BackendUnavailable(f"onnxruntime is not installed: {exc}") from exc
                reasons.append(f"onnxruntime unavailable ({exc})")
        elif kind != "auto":
            raise BackendUnavailable(f"{spec.path} has no ONNX export; run `leukedge export {spec.path} -o OUT`")
        else:
            reasons.append("no ONNX export")
    if kind in ("auto", "torch"):
        if spec.bundle is not None and kind == "torch" and device != "cpu" and _torch_cuda_available():
            from .torch_cuda import TorchCudaBackend

            b = TorchCudaBackend.from_bundle(spec.bundle, precision=precision)
            b.reason = f"PyTorch on CUDA ({b.description})"
            b.spec = spec
            return b
        if spec.bundle is not None:
            from .torch_backend import TorchBackend

            b = TorchBackend.from_bundle(spec.bundle, device="cpu" if kind == "auto" else device, threads=threads)
            b.reason = "; ".join(reasons + [f"PyTorch reference on {b.device}"])
            b.spec = spec
            return b
        if kind != "auto":
            raise BackendUnavailable(f"{spec.path} is not a model bundle; the PyTorch backend needs one")
        reasons.append("no model bundle for PyTorch")
    raise BackendUnavailable(f"no usable backend for {spec.path}: " + "; ".join(reasons))


def _is_mismatch(exc: BaseException) -> bool:
    """Fatal even in auto mode: the engine's preprocessing differs from the model's. An engine built for
    another GPU or TensorRT version is merely not usable here."""
    from ..config import ConfigMismatchError

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
    b.spec = spec
    return b


def _pick_onnx(spec: ModelSpec, device: str, precision: str) -> Path | None:
    cuda = False
    if device in ("auto", "cuda"):
        try:
            import onnxruntime as ort

            cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        except ImportError:
            cuda = False
    if precision == "fp16" or (precision == "auto" and cuda):
        return spec.onnx_fp16 or spec.onnx_fp32
    return spec.onnx_fp32 or spec.onnx_fp16
