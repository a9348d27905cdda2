"""What a MODEL argument is and holds, opened once: :func:`open_model` -> :class:`ModelSpec`.

A bundle folder (``bundle.json``, maybe with ``export/``), an export folder (``preprocess.json``), an ``.onnx``
file or an engine with its sidecar. Each of the model's files is read once, through :mod:`leukedge.formats`, and
cross-checked here (preprocessing hashes, ONNX hashes, the weights an export was made from, an engine's
preprocessing); a mismatch is refused with a ValueError / ConfigMismatchError / EngineMismatchError. Backends are
built from the :class:`ModelSpec` (:func:`leukedge.engines.get_backend`) and never read these files again.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._util import CLASS_NAMES
from .config import ConfigMismatchError, PreprocessConfig
from .formats.bundle import META_FILE, default_model_path, read_bundle
from .formats.export import (
    EXPORT_FP16,
    EXPORT_FP32,
    EXPORT_INT8,
    PREPROCESS_FILE,
    check_export_hashes,
    check_weights_binding,
    onnx_config,
    read_export_manifest,
)
from .formats.sidecar import ENGINE_SUFFIXES, check_preprocess, read_sidecar, sidecar_config, sidecar_path


@dataclass
class ModelSpec:
    """What a MODEL argument points at. ``sidecar``: the parsed sidecar of ``engine`` (read once, checked)."""

    kind: str  # "bundle" | "export" | "onnx" | "engine"
    path: Path
    config: PreprocessConfig
    meta: dict[str, Any] = field(default_factory=dict)
    bundle: Path | None = None
    onnx_fp32: Path | None = None
    onnx_fp16: Path | None = None
    onnx_int8: Path | None = None  # the Q/DQ graph, only when its export check passed (export.json)
    engine: Path | None = None
    sidecar: dict[str, Any] | None = None

    @property
    def preprocess_hash(self) -> str:
        return self.config.pixel_hash()

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or CLASS_NAMES)

    def use_engine(self, engine: str | os.PathLike) -> None:
        """Run ``engine`` (``--engine``) with this model's preprocessing: its sidecar is read once and an engine
        built from other preprocessing is refused (ConfigMismatchError)."""
        info = read_sidecar(engine)
        check_preprocess(info, engine, self.config, f"{self.kind} {self.path}")
        self.engine, self.sidecar = Path(engine), info


def find_engine(export_dir: Path) -> Path | None:
    """The first engine file in ``export_dir`` that has a sidecar."""
    for suf in ENGINE_SUFFIXES:
        for p in sorted(export_dir.glob(f"*{suf}")):
            if sidecar_path(p).is_file():
                return p
    return None


def open_model(model: str | os.PathLike | None = None, engine: str | os.PathLike | None = None) -> ModelSpec:
    """Open ``model`` (default: the shipped default model) and, when given, the ``engine`` to run with its
    preprocessing: every file parsed once and cross-checked (see the module docstring)."""
    p = Path(model) if model is not None else default_model_path()
    if not p.exists():
        raise FileNotFoundError(f"model {p} does not exist (expected a bundle dir, export dir, .onnx or engine file; "
                                "pass --model BUNDLE|EXPORT_DIR|ENGINE)")
    spec = _open(p)
    if engine is not None:
        spec.use_engine(engine)
    return spec


def resolve_model(model: str | os.PathLike) -> ModelSpec:
    """:func:`open_model` of ``model`` without an extra engine (the name the engines package has exported)."""
    return open_model(model)


def _open(p: Path) -> ModelSpec:
    if p.is_dir() and (p / META_FILE).is_file():
        return _bundle_spec(p)
    if p.is_dir() and (p / PREPROCESS_FILE).is_file():
        return _export_spec(p)
    if p.is_dir():
        raise ValueError(f"{p}: not a model bundle ({META_FILE}) or an export directory ({PREPROCESS_FILE})")
    if not p.is_file():  # a FIFO would block the ONNX reader forever, /dev/zero never ends
        kind = "a FIFO / named pipe" if stat.S_ISFIFO(p.stat().st_mode) else "a device or special file"
        raise ValueError(f"{p}: is {kind}, not a model file (expected a bundle dir, export dir, .onnx or engine file)")
    if p.suffix == ".onnx":
        return _onnx_spec(p)
    if p.suffix in ENGINE_SUFFIXES or sidecar_path(p).is_file():
        return _engine_spec(p)
    raise ValueError(f"{p}: unrecognised model file (expected .onnx or an engine {'/'.join(ENGINE_SUFFIXES)} with sidecar)")


def _onnx_spec(p: Path) -> ModelSpec:
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


def _bundle_spec(p: Path) -> ModelSpec:
    b = read_bundle(p)
    spec = ModelSpec("bundle", p, b.config, b.meta, bundle=p)
    exp = p / "export"
    if (exp / PREPROCESS_FILE).is_file():
        _fill_export(spec, exp, PreprocessConfig.load(exp / PREPROCESS_FILE), read_export_manifest(exp))
    return spec


def _export_spec(p: Path) -> ModelSpec:
    cfg = PreprocessConfig.load(p / PREPROCESS_FILE)
    manifest = read_export_manifest(p)
    if manifest.get("preprocess_hash") and manifest["preprocess_hash"] != cfg.pixel_hash():
        raise ValueError(f"{p}/export.json: preprocess_hash does not match preprocess.json")
    spec = ModelSpec("export", p, cfg, manifest)
    if manifest.get("bundle") and (p / manifest["bundle"]).is_dir():  # absolute, or ".." for a bundle's export/
        spec.bundle = (p / manifest["bundle"]).resolve()
    _fill_export(spec, p, cfg, manifest)
    if spec.onnx_fp32 is None and spec.onnx_fp16 is None:
        raise ValueError(f"{p}: export directory has no {EXPORT_FP32} / {EXPORT_FP16}")
    return spec


def _engine_spec(p: Path) -> ModelSpec:
    info = read_sidecar(p)
    cfg = sidecar_config(info, p)
    spec = ModelSpec("engine", p, cfg, {"sidecar": info, "class_names": info.get("class_names")}, engine=p, sidecar=info)
    # fall-back ONNX files of the export the engine was built from, if still there
    src = (info.get("onnx") or {}).get("path")
    if src and Path(src).is_file():
        exp = Path(src).parent
        if (exp / PREPROCESS_FILE).is_file():
            check_preprocess(info, p, PreprocessConfig.load(exp / PREPROCESS_FILE), f"export {exp}")
            for name, attr in ((EXPORT_FP32, "onnx_fp32"), (EXPORT_FP16, "onnx_fp16")):
                if (exp / name).is_file():
                    setattr(spec, attr, exp / name)
    return spec


def _fill_export(spec: ModelSpec, exp: Path, exp_cfg: PreprocessConfig, manifest: dict[str, Any]) -> None:
    """The ONNX files, INT8 graph and engine of the export folder ``exp`` (its preprocessing ``exp_cfg`` and
    ``export.json`` ``manifest`` already read), each checked against ``spec``."""
    if exp_cfg.pixel_hash() != spec.config.pixel_hash():
        raise ConfigMismatchError(f"{exp}/{PREPROCESS_FILE} does not match the preprocessing of {spec.path}")
    if (exp / EXPORT_FP32).is_file():
        spec.onnx_fp32 = exp / EXPORT_FP32
    if (exp / EXPORT_FP16).is_file():
        spec.onnx_fp16 = exp / EXPORT_FP16
    int8 = manifest.get("int8")
    if (exp / EXPORT_INT8).is_file() and isinstance(int8, dict) and int8.get("passed") is True:
        spec.onnx_int8 = exp / EXPORT_INT8
    check_export_hashes(exp, manifest)
    if spec.bundle is not None:
        check_weights_binding(exp, Path(spec.bundle), manifest)
    eng = find_engine(exp)
    if eng is not None:
        info = read_sidecar(eng)
        check_preprocess(info, eng, spec.config, f"{spec.kind} {spec.path}")
        spec.engine, spec.sidecar = eng, info
        spec.meta.setdefault("sidecar", info)
