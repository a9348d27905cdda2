"""``leukedge build-engine``: compile an ONNX export into a TensorRT or TensorRT-RTX engine + sidecar.

Standard TensorRT (``import tensorrt``, 8.6 / 10.x / 11.x) needs a GPU to build. FP16 comes from
the FP16 ONNX graph in a strongly typed network where that flag exists (TensorRT >= 10, required
by 11, which removed ``BuilderFlag.FP16``); with an FP32 graph on a TensorRT that still has
``BuilderFlag.FP16`` the builder is allowed to pick FP16 kernels instead.

TensorRT-RTX (``import tensorrt_rtx``) is always strongly typed and builds ahead of time without a
GPU, for a set of compute capabilities (default: portable Ampere+; ``--target-cc`` to pick); the
engine is JIT-specialised on the target GPU at load time.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._util import (
    CLASS_NAMES,
    NULL_REPORTER,
    Reporter,
    atomic_write_bytes,
    bytes_sha256,
    file_sha256,
)
from .._version import __version__
from ..formats.export import EXPORT_FP16, EXPORT_FP32, EXPORT_INT8_TRT, onnx_config, read_export_manifest
from ..formats.sidecar import EngineMismatchError, write_sidecar
from .base import BackendUnavailable
from .sidecar import RTX_SUPPORTED_CC
from .tensorrt_backend import FLAVOURS, gpu_info, import_trt, no_gpu_reason, trt_major

RTX_CC_NAMES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}


class BuildError(RuntimeError):
    pass


def resolve_onnx(src: str | os.PathLike, prefer_fp16: bool = True, int8: bool = False) -> Path:
    """An ONNX file, or the FP16 (else FP32) graph of an export directory; ``int8``: its INT8 Q/DQ graph, only if
    that passed its export check (``export.json``)."""
    p = Path(src)
    if p.is_dir() and int8:
        info = (read_export_manifest(p).get("int8") or {}).get("tensorrt")
        if not (p / EXPORT_INT8_TRT).is_file() or not isinstance(info, dict):
            raise BuildError(f"{p}: no {EXPORT_INT8_TRT}; run `leukedge export BUNDLE -o {p} --int8 --calibrate CACHE`")
        if info.get("passed") is not True:
            raise BuildError(f"{p}/{EXPORT_INT8_TRT} did not pass its export check against FP32 (see "
                             f"{p / 'export_report.json'}); no engine is built from it")
        return p / EXPORT_INT8_TRT
    if p.is_dir():
        order = (EXPORT_FP16, EXPORT_FP32) if prefer_fp16 else (EXPORT_FP32, EXPORT_FP16)
        for name in order:
            if (p / name).is_file():
                return p / name
        raise BuildError(f"{p}: no {EXPORT_FP16} or {EXPORT_FP32}; run `leukedge export BUNDLE -o {p}` first")
    if not p.is_file():
        raise BuildError(f"{p}: ONNX file or export directory not found")
    return p


def graph_precision(onnx_path: Path) -> str:
    """"int8" for a Q/DQ graph, "float16" if the graph's weights are FP16 (an FP16 export), else "float32"."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    if any(n.op_type == "QuantizeLinear" for n in m.graph.node):  # Q/DQ: explicit INT8, whatever the metadata says
        return "int8"
    if props.get("leukedge.precision") in ("float16", "float32"):
        return props["leukedge.precision"]
    n16 = sum(1 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    n32 = sum(1 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return "float16" if n16 > n32 else "float32"


def pick_flavour(backend: str) -> tuple[str, str]:
    """(flavour, reason) for --backend auto|tensorrt|tensorrt-rtx."""
    if backend in FLAVOURS:
        import_trt(backend)
        if backend == "tensorrt" and gpu_info() is None:
            raise BuildError(f"standard TensorRT needs a GPU to build engines ({no_gpu_reason()}); "
                             f"use --backend tensorrt-rtx to build ahead of time without a GPU")
        gpu = gpu_info()
        if backend == "tensorrt-rtx" and gpu is not None and gpu["compute_capability"] not in RTX_SUPPORTED_CC:
            return backend, (f"requested; built ahead of time for other GPUs: this one ({gpu['name']}, CC "
                             f"{gpu['compute_capability']}) cannot run TensorRT-RTX engines")
        return backend, "requested"
    gpu = gpu_info()
    reasons = []
    if gpu is not None:
        try:
            import_trt("tensorrt")
            return "tensorrt", f"GPU {gpu['name']} present and tensorrt installed"
        except BackendUnavailable as exc:
            reasons.append(str(exc))
        if gpu["compute_capability"] not in RTX_SUPPORTED_CC:
            # TensorRT-RTX would build an engine this GPU then refuses: say so instead
            raise BuildError(rtx_cannot_target(gpu, reasons[-1]))
    else:
        reasons.append(f"no GPU ({no_gpu_reason()}), so standard TensorRT cannot build")
    try:
        import_trt("tensorrt-rtx")
        return "tensorrt-rtx", "; ".join(reasons + ["TensorRT-RTX builds ahead of time"])
    except BackendUnavailable as exc:
        reasons.append(str(exc))
    raise BuildError("no TensorRT flavour can build here: " + "; ".join(reasons))


def rtx_cannot_target(gpu: Any, why_not_tensorrt: str) -> str:
    """The refusal when the only flavour at hand, TensorRT-RTX, cannot target this GPU."""
    return (f"no TensorRT flavour can build an engine for this GPU, {gpu['name']} (compute capability "
            f"{gpu['compute_capability']}): TensorRT-RTX targets only {', '.join(RTX_SUPPORTED_CC)} (RTX / desktop GPUs), "
            f"and standard TensorRT is not usable here ({why_not_tensorrt}). Install standard TensorRT on this machine "
            f"(JetPack on a Jetson) and build with --backend tensorrt, or run without an engine: "
            f"`leukedge infer --backend torch` (PyTorch on CUDA) or `--backend onnxruntime`")


def apply_timing_cache(config_b: Any, path: Path, notes: list[str]) -> dict[str, Any]:
    """Load the timing cache at ``path`` (if any) into the builder config; a cache TensorRT rejects
    (another GPU or TensorRT version) is replaced by an empty one and reported, never claimed as loaded."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = config_b.create_timing_cache(blob)
    if config_b.set_timing_cache(cache, ignore_mismatch=False):
        return {"path": str(path), "loaded_bytes": len(blob), "rejected": False}
    notes.append(f"timing cache {path} rejected by TensorRT (built on another GPU or TensorRT version); "
                 f"timing from scratch, and the file will be replaced")
    cache = config_b.create_timing_cache(b"")
    if not config_b.set_timing_cache(cache, ignore_mismatch=False):
        raise BuildError(f"TensorRT refused even an empty timing cache for {path}")
    return {"path": str(path), "loaded_bytes": 0, "rejected": True, "rejected_bytes": len(blob)}


def _dtype_name(trt: Any, dt: Any) -> str:
    names = {trt.float32: "float32", trt.float16: "float16", trt.int32: "int32", trt.int8: "int8"}
    return names.get(dt, str(dt).split(".")[-1].lower())


def build_engine(
    onnx_src: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    backend: str = "auto",
    min_batch: int = 1,
    opt_batch: int = 32,
    max_batch: int = 64,
    timing_cache: str | os.PathLike | None = None,
    workspace_mib: int | None = 1024,
    hardware_compat: bool = False,
    target_cc: tuple[str, ...] = (),
    verbose: bool = False,
    notes: list[str] | None = None,
    reporter: Reporter | None = None,
    int8: bool = False,
) -> dict[str, Any]:
    """Build and write ``engine_path`` and its sidecar; returns the sidecar dict.

    Phases: parse the ONNX graph into a network (:func:`_parse_network`), choose the precision
    (:func:`_set_precision`), set workspace, batch profile, timing cache and target GPUs
    (:func:`_configure`), build and write the engine, then the sidecar (:func:`_sidecar_info`).
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise BuildError(f"need 1 <= min-batch ({min_batch}) <= opt-batch ({opt_batch}) <= max-batch ({max_batch})")
    notes = notes if notes is not None else []
    onnx_path = resolve_onnx(onnx_src, int8=int8).resolve()
    config, meta = onnx_config(onnx_path)
    graph_prec = graph_precision(onnx_path)
    flavour, why = pick_flavour(backend)
    notes.append(f"flavour {flavour}: {why}")
    trt = import_trt(flavour)
    gpu = gpu_info()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)

    t0 = time.perf_counter()
    b = _parse_network(trt, flavour, graph_prec, onnx_path, logger)
    config_b = b.builder.create_builder_config()
    precision, how = _set_precision(trt, config_b, flavour, graph_prec, b.strongly, notes)
    opts = _configure(trt, b, config_b, flavour, config, notes, workspace_mib=workspace_mib,
                      batches=(min_batch, opt_batch, max_batch), timing_cache=timing_cache,
                      hardware_compat=hardware_compat, target_cc=target_cc)

    rep = reporter or NULL_REPORTER
    with rep.progress(f"building {flavour} engine from {onnx_path.name} …", total=None, transient=True):
        t_build = time.perf_counter()
        serialized = b.builder.build_serialized_network(b.network, config_b)
        build_s = time.perf_counter() - t_build
    if serialized is None:
        raise BuildError(f"{flavour} failed to build an engine from {onnx_path} (see the TensorRT log above)")
    data = bytes(memoryview(serialized))
    engine_path = Path(engine_path)
    atomic_write_bytes(engine_path, data)
    if opts["timing_cache"] is not None and timing_cache is not None:
        blob = bytes(memoryview(config_b.get_timing_cache().serialize()))
        atomic_write_bytes(Path(timing_cache), blob)
        opts["timing_cache"]["saved_bytes"] = len(blob)

    info = _sidecar_info(trt, b, flavour, gpu, opts, onnx_src=onnx_src, onnx_path=onnx_path, graph_prec=graph_prec,
                         config=config, meta=meta, precision=precision, how=how, data=data,
                         workspace_mib=workspace_mib, batches=(min_batch, opt_batch, max_batch))
    info.update(build_seconds=round(build_s, 3), total_seconds=round(time.perf_counter() - t0, 3),
                leukedge_version=__version__, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                build_command=(" ".join(shlex.quote(a) for a in ["leukedge", *sys.argv[1:]])
                               if Path(sys.argv[0]).name == "leukedge" else None), notes=notes)
    write_sidecar(engine_path, info)
    return info


@dataclass
class _Network:
    builder: Any
    network: Any
    strongly: bool


def _parse_network(trt: Any, flavour: str, graph_prec: str, onnx_path: Path, logger: Any) -> _Network:
    """A TensorRT network parsed from the ONNX file (strongly typed where the flavour or graph needs it)."""
    builder = trt.Builder(logger)
    if builder is None:
        raise BuildError(f"{flavour}: could not create a builder ({no_gpu_reason()})")
    NDCF = trt.NetworkDefinitionCreationFlag
    flags = 0
    if flavour == "tensorrt" and trt_major(trt) < 10 and hasattr(NDCF, "EXPLICIT_BATCH"):
        flags |= 1 << int(NDCF.EXPLICIT_BATCH)  # required before TensorRT 10 for ONNX
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    strongly = hasattr(NDCF, "STRONGLY_TYPED") and (flavour == "tensorrt-rtx" or graph_prec in ("float16", "int8")
                                                     or not has_fp16_flag)
    if strongly:
        flags |= 1 << int(NDCF.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{flavour} could not parse {onnx_path}: {errs}")
    return _Network(builder, network, bool(strongly))


def _set_precision(trt: Any, config_b: Any, flavour: str, graph_prec: str, strongly: bool,
                   notes: list[str]) -> tuple[str, str]:
    """(precision, how it was obtained): FP16 from an FP16 graph or BuilderFlag.FP16, else FP32."""
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    if graph_prec == "int8":
        # Explicit quantization: the Q/DQ nodes say which tensors are INT8. TensorRT >= 10 and TensorRT-RTX take it in
        # a strongly typed network without precision flags; TensorRT 8.x (JetPack 5) needs BuilderFlag.INT8 (+FP16
        # so the float parts may run in FP16).
        if strongly:
            return "int8", "int8 Q/DQ graph, strongly typed (explicit quantization)"
        config_b.set_flag(trt.BuilderFlag.INT8)
        if has_fp16_flag:
            config_b.set_flag(trt.BuilderFlag.FP16)
        return "int8", "int8 Q/DQ graph + BuilderFlag.INT8 (explicit quantization)"
    if graph_prec == "float16":
        precision, how = "fp16", ("fp16 ONNX graph, strongly typed" if strongly else "fp16 ONNX graph")
        if not strongly and has_fp16_flag:
            config_b.set_flag(trt.BuilderFlag.FP16)  # TensorRT 8.x: allow FP16 kernels for the FP16 layers
            how = "fp16 ONNX graph + BuilderFlag.FP16"
    elif not strongly and has_fp16_flag:
        config_b.set_flag(trt.BuilderFlag.FP16)
        precision, how = "fp16", "BuilderFlag.FP16 (fp32 ONNX graph)"
    else:
        precision, how = "fp32", "fp32 ONNX graph, strongly typed"
        notes.append(f"{flavour} {trt.__version__} has no BuilderFlag.FP16: export with --fp16 and build from "
                     f"{EXPORT_FP16} to get an FP16 engine")
    return precision, how


def _configure(trt: Any, b: _Network, config_b: Any, flavour: str, config: Any, notes: list[str], *,
               workspace_mib: int | None, batches: tuple[int, int, int], timing_cache: str | os.PathLike | None,
               hardware_compat: bool, target_cc: tuple[str, ...]) -> dict[str, Any]:
    """Workspace, the optimisation profile over the batch axis, timing cache, hardware compatibility and
    TensorRT-RTX target GPUs; returns what was set (``input``, ``chw``, ``timing_cache``, ``hw_level``, ``targets``)."""
    if workspace_mib:
        if hasattr(config_b, "set_memory_pool_limit"):
            config_b.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
        else:  # TensorRT < 8.4
            config_b.max_workspace_size = int(workspace_mib) << 20
    inp = b.network.get_input(0)
    chw = tuple(inp.shape)[1:]
    if any(d < 0 for d in chw):
        chw = (3, config.size, config.size)
    profile = b.builder.create_optimization_profile()
    profile.set_shape(inp.name, *((n, *chw) for n in batches))
    config_b.add_optimization_profile(profile)

    tc_used = None
    if timing_cache:
        if flavour == "tensorrt-rtx":
            notes.append("timing cache ignored: TensorRT-RTX does no build-time kernel timing (kernels are JIT-compiled "
                         "on the target GPU)")
        else:
            tc_used = apply_timing_cache(config_b, Path(timing_cache), notes)
    hw_level = None
    if hardware_compat:
        if flavour == "tensorrt" and hasattr(trt, "HardwareCompatibilityLevel") and hasattr(config_b, "hardware_compatibility_level"):
            config_b.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
            hw_level = "ampere_plus"
        elif flavour == "tensorrt-rtx":
            notes.append("--hardware-compat: TensorRT-RTX engines are portable across their target compute capabilities "
                         "by design (use --target-cc); no hardware-compatibility level set")
        else:
            notes.append(f"--hardware-compat ignored: tensorrt {trt.__version__} has no hardware compatibility levels")
    targets: list[str] = []
    if flavour == "tensorrt-rtx":
        if target_cc:
            config_b.num_compute_capabilities = len(target_cc)
            for i, cc in enumerate(target_cc):
                if cc not in RTX_CC_NAMES:
                    raise BuildError(f"--target-cc {cc}: TensorRT-RTX supports {', '.join(RTX_CC_NAMES)}")
                config_b.set_compute_capability(getattr(trt.ComputeCapability, RTX_CC_NAMES[cc]), i)
            targets = list(target_cc)
    elif target_cc:
        notes.append("--target-cc only applies to TensorRT-RTX; standard TensorRT builds for the GPU it runs on")
    return {"input": inp.name, "chw": chw, "timing_cache": tc_used, "hw_level": hw_level, "targets": targets}


def _sidecar_info(trt: Any, b: _Network, flavour: str, gpu: Any, opts: dict[str, Any], *, onnx_src: str | os.PathLike,
                  onnx_path: Path, graph_prec: str, config: Any, meta: dict[str, Any], precision: str, how: str,
                  data: bytes, workspace_mib: int | None, batches: tuple[int, int, int]) -> dict[str, Any]:
    """What the sidecar records about the build (the caller adds times, version and command)."""
    def io(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)}

    hw_level, net = opts["hw_level"], b.network
    return {
        "flavour": flavour,
        "trt_version": str(trt.__version__),
        "built_on": {
            "gpu": gpu["name"] if gpu else None,
            "compute_capability": gpu["compute_capability"] if gpu and flavour == "tensorrt" else None,
            "driver": gpu["driver"] if gpu else None,
            "mode": "AOT, no GPU" if (flavour == "tensorrt-rtx" and gpu is None) else
                    ("AOT (TensorRT-RTX), JIT on target" if flavour == "tensorrt-rtx" else "built on GPU"),
        },
        "target_compute_capabilities": opts["targets"] if flavour == "tensorrt-rtx" else
            ([gpu["compute_capability"]] if gpu and not hw_level else (["8.0+"] if hw_level else [])),
        "hardware_compat": hw_level,
        "precision": precision,
        "precision_source": how,
        "strongly_typed": bool(b.strongly),
        "inputs": [io(net.get_input(i)) for i in range(net.num_inputs)],
        "outputs": [io(net.get_output(i)) for i in range(net.num_outputs)],
        "profile": {"input": opts["input"], "min": batches[0], "opt": batches[1], "max": batches[2],
                    "chw": list(opts["chw"])},
        "workspace_mib": workspace_mib,
        "timing_cache": opts["timing_cache"],
        "onnx": {"path": str(onnx_path), "source": str(Path(onnx_src).resolve()), "sha256": file_sha256(onnx_path),
                 "graph_precision": graph_prec},
        "preprocess": config.to_dict(),
        "preprocess_hash": config.pixel_hash(),
        "class_names": meta.get("class_names", list(CLASS_NAMES)),
        "engine_size": len(data),
        "engine_sha256": bytes_sha256(data),
    }


def validate_engine(engine_path: Path, onnx_src: Path, n_synth: int = 16, sample_dir: Path | None = None,
                    cuda_binding: str = "auto") -> dict[str, Any]:
    """Engine vs ONNX Runtime (FP32 graph) on sample cells; {"skipped": reason} without a GPU, or when the
    engine cannot run on this one (another compute capability, TensorRT version, driver)."""
    from ..export import (
        FP16_TOL,
        check_inputs,
        compare_logits,
        default_sample_dir,
        passes,
    )
    from .onnxrt import OnnxRuntimeBackend
    from .tensorrt_backend import TensorRTBackend

    if gpu_info() is None:
        return {"skipped": f"no GPU here ({no_gpu_reason()}); the engine cannot be executed. "
                           f"Run `leukedge build-engine ... --validate` or `leukedge infer --model {engine_path}` on the target GPU"}
    onnx32 = resolve_onnx(onnx_src, prefer_fp16=False)
    cfg, _ = onnx_config(onnx32)
    inputs = check_inputs(cfg, sample_dir or default_sample_dir(), n_synth=n_synth)
    ref = OnnxRuntimeBackend(onnx32, device="cpu")
    try:
        eng = TensorRTBackend(engine_path, cuda_binding=cuda_binding)
    except (EngineMismatchError, BackendUnavailable) as exc:  # built fine, but it cannot run on this GPU
        return {"skipped": f"the engine cannot run here: {exc}"}
    try:
        per, refs, gots = {}, [], []
        for name, x in inputs:
            r_out = ref.infer(x.astype(ref.input_dtype))
            mb = eng.max_batch or len(x)
            g_out = np.concatenate([eng.infer(x[i:i + mb]) for i in range(0, len(x), mb)])
            per[name] = compare_logits(r_out, g_out)
            refs.append(r_out)
            gots.append(g_out)
        allm = compare_logits(np.concatenate(refs), np.concatenate(gots))
        allm["pass"] = passes(allm, FP16_TOL)
        return {"reference": f"onnxruntime CPU {onnx32.name}", "by_source": per, "all": allm, "tolerance": FP16_TOL}
    finally:
        eng.close()


