"""What a MODEL argument points at: a bundle folder, an ONNX export folder, an ``.onnx`` file or an engine.

:func:`resolve_model` reads the files (through :mod:`leukedge.artifacts`) and returns a :class:`ModelSpec`
naming every runnable file of the model and its preprocessing; mismatched files are refused here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import (
    ENGINE_SUFFIXES,
    EXPORT_FP16,
    EXPORT_FP32,
    EXPORT_INT8,
    check_export_hashes,
    check_weights_binding,
    onnx_config,
    read_bundle_json,
    read_export_manifest,
    read_sidecar,
)
from ..config import ConfigMismatchError, PreprocessConfig
from .sidecar import check_preprocess, sidecar_config


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
    onnx_int8: Path | None = None  # the Q/DQ graph, only when its export check passed (export.json)
    engine: Path | None = None

    @property
    def preprocess_hash(self) -> str:
        return self.config.pixel_hash()

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or ["hem", "all"])


def find_engine(export_dir: Path) -> Path | None:
    for suf in ENGINE_SUFFIXES:
        for p in sorted(export_dir.glob(f"*{suf}")):
            if (p.parent / (p.name + ".json")).is_file():
                return p
    return None


def resolve_model(model: str | os.PathLike) -> ModelSpec:
    """What ``model`` is and holds: a bundle folder (``bundle.json``, maybe with ``export/``), an export
    folder (``preprocess.json``), an ``.onnx`` file or an engine with its sidecar. Files of one model that
    disagree (preprocessing, hashes) are refused with a ValueError / ConfigMismatchError."""
    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"model {p} does not exist (expected a bundle dir, export dir, .onnx or engine file)")
    if p.is_dir() and (p / "bundle.json").is_file():
        return _bundle_spec(p)
    if p.is_dir() and (p / "preprocess.json").is_file():
        return _export_spec(p)
    if p.is_dir():
        raise ValueError(f"{p}: not a model bundle (bundle.json) or an export directory (preprocess.json)")
    if not p.is_file():  # a FIFO would block the ONNX reader forever, /dev/zero never ends
        import stat

        kind = "a FIFO / named pipe" if stat.S_ISFIFO(p.stat().st_mode) else "a device or special file"
        raise ValueError(f"{p}: is {kind}, not a model file (expected a bundle dir, export dir, .onnx or engine file)")
    if p.suffix == ".onnx":
        cfg, meta = onnx_config(p)
        spec = ModelSpec("onnx", p, cfg, meta)
        precision = str(meta.get("precision", ""))
        if precision == "float16" or p.name == EXPORT_FP16:
            spec.onnx_fp16 = p
        elif precision == "int8" or p.name == EXPORT_INT8:  # named explicitly: the caller chose it
            spec.onnx_int8 = p
        else:
            spec.onnx_fp32 = p
        return spec
    if p.suffix in ENGINE_SUFFIXES or (p.parent / (p.name + ".json")).is_file():
        return _engine_spec(p)
    raise ValueError(f"{p}: unrecognised model file (expected .onnx or an engine {'/'.join(ENGINE_SUFFIXES)} with sidecar)")


def _bundle_spec(p: Path) -> ModelSpec:
    meta, cfg = read_bundle_json(p)
    spec = ModelSpec("bundle", p, cfg, meta, bundle=p)
    exp = p / "export"
    if (exp / "preprocess.json").is_file():
        _fill_export(spec, exp)
    return spec


def _export_spec(p: Path) -> ModelSpec:
    cfg = PreprocessConfig.load(p / "preprocess.json")
    meta: dict[str, Any] = {}
    if (p / "export.json").is_file():
        meta = read_export_manifest(p)
        if meta.get("preprocess_hash") and meta["preprocess_hash"] != cfg.pixel_hash():
            raise ValueError(f"{p}/export.json: preprocess_hash does not match preprocess.json")
    spec = ModelSpec("export", p, cfg, meta)
    _fill_export(spec, p)
    if spec.onnx_fp32 is None and spec.onnx_fp16 is None:
        raise ValueError(f"{p}: export directory has no {EXPORT_FP32} / {EXPORT_FP16}")
    if meta.get("bundle") and (p / meta["bundle"]).is_dir():  # absolute, or ".." for a bundle's export/
        spec.bundle = (p / meta["bundle"]).resolve()
        check_weights_binding(p, spec.bundle)
    return spec


def _engine_spec(p: Path) -> ModelSpec:
    info = read_sidecar(p)
    cfg = sidecar_config(info, p)
    spec = ModelSpec("engine", p, cfg, {"sidecar": info, "class_names": info.get("class_names")}, engine=p)
    # fall-back ONNX files of the export the engine was built from, if still there
    src = (info.get("onnx") or {}).get("path")
    if src and Path(src).is_file():
        exp = Path(src).parent
        if (exp / "preprocess.json").is_file():
            check_preprocess(info, p, PreprocessConfig.load(exp / "preprocess.json"), f"export {exp}")
            for name, attr in ((EXPORT_FP32, "onnx_fp32"), (EXPORT_FP16, "onnx_fp16")):
                if (exp / name).is_file():
                    setattr(spec, attr, exp / name)
    return spec


def _fill_export(spec: ModelSpec, exp: Path) -> None:
    exp_cfg = PreprocessConfig.load(exp / "preprocess.json")
    if exp_cfg.pixel_hash() != spec.config.pixel_hash():
        raise ConfigMismatchError(f"{exp}/preprocess.json does not match the preprocessing of {spec.path}")
    if (exp / EXPORT_FP32).is_file():
        spec.onnx_fp32 = exp / EXPORT_FP32
    if (exp / EXPORT_FP16).is_file():
        spec.onnx_fp16 = exp / EXPORT_FP16
    int8 = read_export_manifest(exp).get("int8")
    if (exp / EXPORT_INT8).is_file() and isinstance(int8, dict) and int8.get("passed") is True:
        spec.onnx_int8 = exp / EXPORT_INT8
    check_export_hashes(exp)
    if spec.bundle is not None:
        check_weights_binding(exp, Path(spec.bundle))
    eng = find_engine(exp)
    if eng is not None:
        info = read_sidecar(eng)
        check_preprocess(info, eng, spec.config, f"{spec.kind} {spec.path}")
        spec.engine = eng
        spec.meta.setdefault("sidecar", info)
