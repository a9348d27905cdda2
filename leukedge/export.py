"""Export a model bundle to ONNX (FP32 and a strongly typed FP16 graph) and check it against PyTorch.

``OUT/`` receives ``model_fp32.onnx``, ``model_fp16.onnx`` (unless ``--no-fp16``), ``preprocess.json``
(the bundle's preprocessing config; its pixel hash is also in each ONNX file's ``metadata_props``),
``export.json`` (what was exported, hashes, versions) and ``export_report.json`` (PyTorch vs ONNX
Runtime agreement on real sample cells and synthetic cells).

FP16: TensorRT 11 dropped ``BuilderFlag.FP16`` and TensorRT-RTX only builds strongly typed
networks, so FP16 engines come from an FP16 ONNX graph: every float tensor and weight is FP16
(``onnxconverter_common.float16``), optionally with FP32 I/O (``--io-dtype float32``: casts at the
boundary).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._util import CLASS_NAMES, atomic_write_bytes, atomic_write_text, load_native, softmax
from ._version import __version__
from .config import PreprocessConfig
from .data import file_sha256
from .formats.export import EXPORT_FP16, EXPORT_FP32, EXPORT_INT8, EXPORT_INT8_TRT, set_onnx_meta, write_export_manifest

# Agreement tolerances (PyTorch FP32 reference vs ONNX Runtime on CPU).
FP32_TOL = {"max_abs_logit": 1e-3, "min_top1": 1.0}
# FP16 weights/activations keep ~3 significant digits. A small CNN's P(all) moves by ~1e-4; an
# ImageNet-initialised EfficientNet-Lite0 (activations up to ~60 in its early blocks) moves by up to
# ~0.03 on a few cells while every predicted class agrees (measured on the shipped default model).
# FP16 is judged on a bound on that probability shift, which still catches a broken conversion
# (overflow, wrong casts: |dp| ~ 0.5). No top-1 floor: a class flips only where |dp| >= |p - 0.5|, so
# under the bound every flip is a borderline cell within 0.05 of the threshold (reported as
# "borderline_flips"), and a fixed floor would fail a correct graph whenever a sample holds a few such
# cells (seen: 2 of 68 sample cells at p ~ 0.5 on a 192 px model, max |dp| 0.03).
FP16_TOL = {"max_abs_prob": 0.05}



def default_sample_dir() -> Path | None:
    """The real cells of the agreement check: :func:`leukedge._util.sample_dir` (``$LEUKEDGE_SAMPLE_DIR``, or the
    checkout's ``../shared/data/cnmc_sample``; nothing outside an installed package)."""
    from ._util import sample_dir

    return sample_dir()


# --------------------------------------------------------------------------------------------
# check inputs
def check_inputs(
    config: PreprocessConfig, sample_dir: Path | None = None, n_synth: int = 16, seed: int = 0, max_real: int = 64
) -> list[tuple[str, np.ndarray]]:
    """Preprocessed float32 NCHW batches to compare runtimes on: ``[("real", x), ("synthetic", x)]``.

    Real cells come from ``sample_dir`` (skipped when absent); synthetic cells from
    :func:`leukedge.synth.make_cell`. Both go through the Rust preprocessing with ``config``; without
    the native module, standard-normal tensors are used and labelled ``random``.
    """
    cfg = config.replace(layout="nchw", dtype="float32")
    native = load_native(required=False)
    out: list[tuple[str, np.ndarray]] = []
    if native is None:
        rng = np.random.default_rng(seed)
        out.append(("random", rng.standard_normal((max(n_synth, 8), 3, cfg.size, cfg.size)).astype(np.float32)))
        return out
    if sample_dir is not None and Path(sample_dir).is_dir():
        from .data import discover

        recs = discover([sample_dir])[:max_real]
        if recs:
            x, st = native.preprocess_batch([str(r.path) for r in recs], cfg.to_native_json())
            ok = np.array([s["ok"] for s in st], bool)
            if ok.any():
                out.append(("real", np.ascontiguousarray(x[ok])))
    if n_synth > 0:
        from .synth import make_cell

        imgs = [make_cell(i % 2, seed=seed + i, size=300) for i in range(n_synth)]
        x, st = native.preprocess_batch(imgs, cfg.to_native_json())
        ok = np.array([s["ok"] for s in st], bool)
        if ok.any():
            out.append(("synthetic", np.ascontiguousarray(x[ok])))
    return out


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Polygraphy-style comparison of two logit arrays ``(N, C)``."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    d = np.abs(ref - got)
    rel = d / np.maximum(np.abs(ref), 1e-6)
    pr, pg = softmax(ref)[:, -1], softmax(got)[:, -1]
    flip = ref.argmax(1) != got.argmax(1)
    return {
        "n": int(len(ref)),
        "max_abs_logit": float(d.max()) if d.size else 0.0,
        "mean_abs_logit": float(d.mean()) if d.size else 0.0,
        "max_rel_logit": float(rel.max()) if rel.size else 0.0,
        "max_abs_prob": float(np.abs(pr - pg).max()) if len(pr) else 0.0,
        "top1_agreement": float((~flip).mean()) if len(ref) else 1.0,
        "flips": int(flip.sum()),
        # flips of cells whose reference P(all) lies within the probability tolerance of the threshold
        "borderline_flips": int((flip & (np.abs(pr - 0.5) <= FP16_TOL["max_abs_prob"])).sum()),
    }


def passes(m: dict[str, Any], tol: dict[str, float]) -> bool:
    ok = m["top1_agreement"] >= tol.get("min_top1", 0.0)
    if "max_abs_logit" in tol:
        ok = ok and m["max_abs_logit"] <= tol["max_abs_logit"]
    if "max_abs_prob" in tol:
        ok = ok and m["max_abs_prob"] <= tol["max_abs_prob"]
    return bool(ok)


# --------------------------------------------------------------------------------------------
# export
def _torch_export(model: Any, size: int, path: Path, opset: int) -> str:
    """Export with the TorchScript-based exporter (stable, dynamic_axes); dynamo as fallback."""
    import torch

    dummy = torch.zeros(2, 3, size, size, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, (dummy,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                do_constant_folding=True, export_params=True,
            )
            return "torchscript"
        except TypeError:
            pass  # torch without the dynamo= switch or without the legacy exporter
        batch = torch.export.Dim("batch", min=1, max=4096)
        prog = torch.onnx.export(
            model, (dummy,), None, dynamo=True, input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: batch},), opset_version=opset, external_data=False,
        )
        if prog is None:
            raise RuntimeError("torch.onnx.export (dynamo) returned no program")
        prog.save(str(path))
        return "dynamo"


def _io_desc(m: Any) -> dict[str, Any]:
    import onnx

    def one(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        return {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim],
        }

    return {"inputs": [one(v) for v in m.graph.input], "outputs": [one(v) for v in m.graph.output]}


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    report: dict[str, Any]
    passed: bool


def _base_meta(config: PreprocessConfig, meta: dict[str, Any]) -> dict[str, str]:
    """The ``leukedge.*`` metadata_props every exported graph carries (its preprocessing and model facts)."""
    return {
        "preprocess": config.to_json(indent=None),
        "preprocess_hash": config.pixel_hash(),
        "version": __version__,
        "meta": json.dumps({k: meta[k] for k in ("arch", "class_names", "positive_class", "input_size", "synthetic", "test_time")
                            if k in meta}),
    }


def _write_graphs(model: Any, config: PreprocessConfig, out: Path, meta: dict[str, Any], *, fp16: bool, io_dtype: str,
                  opset: int) -> tuple[dict[str, Path], str]:
    """Write ``model_fp32.onnx`` (and ``model_fp16.onnx``) with the preprocessing in their metadata;
    returns the files and which exporter produced the graph."""
    import onnx

    size = int(config.size)
    files: dict[str, Path] = {}
    fp32_path = out / EXPORT_FP32
    tmp32 = out / (".tmp-" + EXPORT_FP32)
    exporter = _torch_export(model, size, tmp32, opset)
    m32 = onnx.load(str(tmp32))
    tmp32.unlink()
    base_meta = _base_meta(config, meta)
    set_onnx_meta(m32, {**base_meta, "precision": "float32"})
    m32.producer_name = "leukedge"
    onnx.checker.check_model(m32)
    _atomic_onnx(m32, fp32_path)
    files["fp32"] = fp32_path

    if fp16:
        from onnxconverter_common import float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m16 = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=(io_dtype == "float32"))
        set_onnx_meta(m16, {**base_meta, "precision": "float16", "io_dtype": io_dtype})
        onnx.checker.check_model(m16)
        _atomic_onnx(m16, out / EXPORT_FP16)
        files["fp16"] = out / EXPORT_FP16

    return files, exporter


def export_model(
    model: Any,
    config: PreprocessConfig,
    out_dir: str | os.PathLike,
    *,
    meta: dict[str, Any] | None = None,
    fp16: bool = True,
    io_dtype: str = "float16",
    opset: int = 17,
    check: bool = True,
    sample_dir: str | os.PathLike | None = None,
    n_synth: int = 16,
    bundle_path: str | os.PathLike | None = None,
    calibrate: str | os.PathLike | None = None,
    calibration_method: str = "minmax",
    calibration_cells: int = 256,
    int8_fp32_convs: int | str = "auto",
    progress: Any = None,
) -> ExportResult:
    """Export ``model`` (an ``nn.Module`` producing logits ``(N, 2)``) with its preprocessing ``config``.

    ``calibrate``: a dataset cache with the model's pixel hash; also writes the INT8 Q/DQ graph
    (:mod:`leukedge.quantize`), checked against FP32 (``check``) and marked failed past ``INT8_TOL``;
    ``int8_fp32_convs``: how many leading convolutions stay FP32 (``"auto"``: the fewest that pass, searched; without
    ``check``, none). ``progress(str)`` hears the INT8 search.
    Long on purpose: one linear sequence of export steps, each a few lines, sharing the manifest."""
    import onnx
    import torch

    if io_dtype not in ("float32", "float16"):
        raise ValueError(f"io_dtype={io_dtype!r} must be float32 or float16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    model = model.float().eval().cpu()
    size = int(config.size)
    t0 = time.perf_counter()

    files, exporter = _write_graphs(model, config, out, meta, fp16=fp16, io_dtype=io_dtype, opset=opset)
    int8_info: dict[str, Any] | None = None
    int8_reports: dict[str, dict[str, Any]] = {}
    if calibrate is not None:
        int8_info, int8_reports = _int8_graphs(files, out, config, meta, calibrate, check=check, sample_dir=sample_dir,
                                               n_synth=n_synth, method=calibration_method, cells=calibration_cells,
                                               fp32_convs=int8_fp32_convs, progress=progress)
    else:
        for stale in (EXPORT_INT8, EXPORT_INT8_TRT):  # INT8 graphs of an earlier export would not match
            (out / stale).unlink(missing_ok=True)
    export_s = time.perf_counter() - t0

    config.save(out / "preprocess.json")
    files["preprocess"] = out / "preprocess.json"
    manifest = {
        "format": 1,
        "leukedge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": _bundle_ref(bundle_path, out),
        # binds the export to the weights it was made from (checked when the bundle is loaded with it)
        "weights_sha256": (file_sha256(Path(bundle_path) / "model.safetensors")
                           if bundle_path is not None and (Path(bundle_path) / "model.safetensors").is_file() else None),
        "arch": meta.get("arch"),
        "class_names": meta.get("class_names", list(CLASS_NAMES)),
        "positive_class": meta.get("positive_class", "all"),
        "input_size": size,
        "preprocess_hash": config.pixel_hash(),
        "opset": opset,
        "exporter": f"torch.onnx ({exporter}), torch {torch.__version__}, onnx {onnx.__version__}",
        "files": {k: {"path": p.name, "sha256": file_sha256(p), **(_io_desc(onnx.load(str(p))) if p.suffix == ".onnx" else {})}
                  for k, p in files.items()},
        "fp16": {"method": "onnxconverter_common.float16.convert_float_to_float16", "io_dtype": io_dtype} if fp16 else None,
        "int8": int8_info,
        "export_seconds": round(export_s, 3),
    }

    report: dict[str, Any] = {"created": manifest["created"], "tolerances": {"fp32": FP32_TOL, "fp16": FP16_TOL}, "results": {}}
    passed = True
    if check:
        report, passed = check_export(model, config, files, sample_dir=sample_dir, n_synth=n_synth)
        for key, rep in int8_reports.items():
            report[key] = rep
            passed = passed and rep["all"]["pass"]
        atomic_write_text(out / "export_report.json", json.dumps(report, indent=2) + "\n")
        files["report"] = out / "export_report.json"
    if int8_info is not None:
        # an unchecked INT8 graph is not marked good: inference picks it only when "passed" is true
        int8_info["passed"] = bool(check and report.get("int8", {}).get("all", {}).get("pass"))
        int8_info["tensorrt"]["passed"] = bool(check and report.get("int8_trt", {}).get("all", {}).get("pass"))
    files["manifest"] = write_export_manifest(out, manifest)
    return ExportResult(out, files, report, passed)


def _int8_graphs(files: dict[str, Path], out: Path, config: PreprocessConfig, meta: dict[str, Any],
                 calibrate: str | os.PathLike, *, check: bool, sample_dir: str | os.PathLike | None, n_synth: int,
                 method: str, cells: int, fp32_convs: int | str,
                 progress: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The two Q/DQ graphs (ONNX Runtime U8S8, TensorRT S8S8) and, with ``check``, their reports against FP32. Each
    graph's FP32 prefix is searched on its own; the TensorRT graph's search starts at the ONNX Runtime graph's prefix
    (its symmetric activations are never closer to FP32)."""
    from .quantize import calibration_data, quantize_checked, quantize_int8

    xc, heldout, calib_desc = calibration_data(calibrate, config, max_calibrate=cells)
    props = {**_base_meta(config, meta), "precision": "int8"}
    files["int8"], files["int8_trt"] = out / EXPORT_INT8, out / EXPORT_INT8_TRT
    reports: dict[str, dict[str, Any]] = {}
    if check:
        inputs = check_inputs(config, _sample_dir(sample_dir), n_synth=n_synth)
        info, reports["int8"], _ = quantize_checked(files["fp32"], files["int8"], xc, inputs, heldout, method=method,
                                                    props=props, symmetric=False, fp32_convs=fp32_convs, progress=progress)
        info["tensorrt"], reports["int8_trt"], _ = quantize_checked(
            files["fp32"], files["int8_trt"], xc, inputs, heldout, method=method, props=props, symmetric=True,
            fp32_convs=fp32_convs, start=info["fp32_convs"], progress=progress)
    else:  # unchecked (never marked good): the whole graph quantised unless a prefix was given
        k = 0 if fp32_convs == "auto" else int(fp32_convs)
        info = quantize_int8(files["fp32"], files["int8"], xc, method=method, props=props, symmetric=False, fp32_convs=k)
        info["tensorrt"] = quantize_int8(files["fp32"], files["int8_trt"], xc, method=method, props=props,
                                         symmetric=True, fp32_convs=k)
    info["calibration"] = calib_desc
    return info, reports


def _sample_dir(sample_dir: str | os.PathLike | None) -> Path | None:
    return Path(sample_dir) if sample_dir else default_sample_dir()


def _bundle_ref(bundle_path: str | os.PathLike | None, out: Path) -> str | None:
    """Where the export's bundle is: ".." when the export sits inside it (a bundle's ``export/``, as
    shipped, so the folder can move), else its absolute path."""
    if not bundle_path:
        return None
    b = Path(bundle_path).resolve()
    return ".." if out.resolve().parent == b else str(b)


def _atomic_onnx(m: Any, path: Path) -> None:
    atomic_write_bytes(path, m.SerializeToString())


def check_export(model: Any, config: PreprocessConfig, files: dict[str, Path], *, sample_dir: str | os.PathLike | None = None, n_synth: int = 16
                 ) -> tuple[dict[str, Any], bool]:
    """Compare PyTorch (FP32 reference) with ONNX Runtime FP32 and FP16 on real + synthetic cells."""
    import torch

    from .engines.onnxrt import OnnxRuntimeBackend

    sample_dir = _sample_dir(sample_dir)
    inputs = check_inputs(config, sample_dir, n_synth=n_synth)
    sessions = {k: OnnxRuntimeBackend(files[k], device="cpu") for k in ("fp32", "fp16") if k in files}
    report: dict[str, Any] = {
        "tolerances": {"fp32": FP32_TOL, "fp16": FP16_TOL},
        "sample_dir": str(sample_dir) if sample_dir is not None and sample_dir.is_dir() else None,
        "inputs": {name: int(len(x)) for name, x in inputs},
        "results": {},
    }
    passed = True
    for prec, sess in sessions.items():
        per: dict[str, Any] = {}
        refs, gots = [], []
        for name, x in inputs:
            with torch.inference_mode():
                ref = model(torch.from_numpy(x)).float().numpy()
            got = sess.infer(x.astype(sess.input_dtype))
            per[name] = compare_logits(ref, got)
            refs.append(ref)
            gots.append(got)
        allm = compare_logits(np.concatenate(refs), np.concatenate(gots)) if refs else compare_logits(np.zeros((0, 2)), np.zeros((0, 2)))
        tol = FP32_TOL if prec == "fp32" else FP16_TOL
        allm["pass"] = passes(allm, tol)
        passed = passed and allm["pass"]
        report["results"][prec] = {"all": allm, "by_source": per, "onnx": files[prec].name, "input_dtype": sess.input_dtype}
    return report, passed


def export_bundle(bundle: str | os.PathLike, out_dir: str | os.PathLike, **kw: Any) -> ExportResult:
    from .models import load_bundle

    b = load_bundle(Path(bundle))
    return export_model(b.model, b.config, out_dir, meta=b.meta, bundle_path=bundle, **kw)


