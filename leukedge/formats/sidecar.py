"""An engine's sidecar ``ENGINE.json``: what a TensorRT engine was built from, with what, and for which GPU.

:func:`read_sidecar` is its one reader (required keys, the engine's sha256), :func:`write_sidecar` its writer;
:class:`EngineMismatchError` is the error of an engine that cannot be used here. The checks of a sidecar against
this machine (TensorRT version, GPU) live in :mod:`leukedge.engines.sidecar`.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from .._util import atomic_write_text, file_sha256
from ..config import PreprocessConfig

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
SIDECAR_FORMAT = 1
SIDECAR_KEYS = ("flavour", "trt_version", "preprocess", "preprocess_hash", "inputs", "outputs")


class EngineMismatchError(RuntimeError):
    """The engine cannot be used here (TensorRT flavour/version, GPU, or preprocessing)."""


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def write_sidecar(engine_path: str | os.PathLike, info: dict[str, Any]) -> Path:
    info = {"format": SIDECAR_FORMAT, **info}
    path = sidecar_path(engine_path)
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=False) + "\n")
    return path


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise EngineMismatchError(
            f"{engine_path}: no sidecar {path.name} next to the engine, so its TensorRT version, target GPU and "
            f"preprocessing are unknown. Rebuild it with `leukedge build-engine EXPORT_DIR -o {engine_path}`."
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineMismatchError(f"{path}: unreadable engine sidecar ({exc})") from exc
    missing = [k for k in SIDECAR_KEYS if k not in info]
    if missing:
        raise EngineMismatchError(f"{path}: engine sidecar lacks {', '.join(missing)}; rebuild the engine")
    want = info.get("engine_sha256")
    if want and Path(engine_path).is_file():  # another engine under this name must not run with these settings
        got = file_sha256(engine_path)
        if got != want:
            raise EngineMismatchError(
                f"{engine_path} is not the engine its sidecar {path.name} describes (sha256 {got[:12]} != {want[:12]}); "
                f"rebuild it with `leukedge build-engine EXPORT_DIR -o {engine_path}` or put the right file back.")
    return info


def rebuild_command(info: dict[str, Any], engine_path: str | os.PathLike, backend: str | None = None) -> str:
    """The exact ``leukedge build-engine`` command that rebuilds this engine here."""
    onnx_src = (info.get("onnx") or {}).get("source") or (info.get("onnx") or {}).get("path") or "EXPORT_DIR"
    prof = info.get("profile") or {}
    args = ["leukedge", "build-engine", str(onnx_src), "-o", str(engine_path), "--backend", backend or info.get("flavour", "auto")]
    for k in ("min", "opt", "max"):
        if k in prof:
            args += [f"--{k}-batch", str(prof[k])]
    if info.get("hardware_compat"):
        args.append("--hardware-compat")
    return " ".join(shlex.quote(a) for a in args)


def sidecar_config(info: dict[str, Any], engine_path: str | os.PathLike) -> PreprocessConfig:
    """The preprocessing config stored in the sidecar, after checking its hash."""
    cfg = PreprocessConfig.from_dict(info["preprocess"])
    if cfg.pixel_hash() != info["preprocess_hash"]:
        raise EngineMismatchError(
            f"{sidecar_path(engine_path)}: stored preprocess_hash {info['preprocess_hash'][:12]} does not match its "
            f"preprocessing config ({cfg.pixel_hash()[:12]}); the sidecar was edited. Rebuild the engine: "
            f"{rebuild_command(info, engine_path)}"
        )
    return cfg


def check_preprocess(info: dict[str, Any], engine_path: str | os.PathLike, expected: PreprocessConfig, what: str) -> None:
    """Refuse an engine whose preprocessing differs from ``expected`` (the bundle's or export's)."""
    expected.require_same_pixels(sidecar_config(info, engine_path), what=what, against=f"engine {engine_path}",
                                 fix="The engine was built from a different export; rebuild it: "
                                     f"{rebuild_command(info, engine_path)}")
