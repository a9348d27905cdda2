"""An ONNX export folder: ``preprocess.json``, ``export.json`` (the manifest), ``model_fp32/fp16/int8.onnx``.

The file names, the ``leukedge.*`` ONNX metadata keys, the manifest reader and the checks that bind the files of
one export together (hashes, weights) are defined here only. ``onnx`` is imported inside :func:`onnx_config` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._util import atomic_write_text, file_sha256
from ..config import ConfigMismatchError, PreprocessConfig
from .bundle import WEIGHTS_FILE

EXPORT_FP32 = "model_fp32.onnx"
EXPORT_FP16 = "model_fp16.onnx"
EXPORT_INT8 = "model_int8.onnx"  # Q/DQ graph for ONNX Runtime; used only when export.json's "int8"."passed" is true
EXPORT_INT8_TRT = "model_int8_trt.onnx"  # symmetric Q/DQ graph for TensorRT; "int8"."tensorrt"."passed"
PREPROCESS_FILE = "preprocess.json"
MANIFEST_FILE = "export.json"
META_PREFIX = "leukedge."  # ONNX metadata_props written by the export: leukedge.preprocess, .precision, ...


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
        if "leukedge.precision" in props:  # "float32" | "float16" | "int8"
            meta["precision"] = props["leukedge.precision"]
        return cfg, meta
    side = path.parent / PREPROCESS_FILE
    if side.is_file():
        return PreprocessConfig.load(side), {}
    raise ValueError(f"{path}: ONNX file carries no leukedge preprocessing config (metadata or preprocess.json)")


def set_onnx_meta(m: Any, props: dict[str, str]) -> None:
    """Replace the ``leukedge.*`` metadata_props of the ONNX model ``m`` with ``props`` (keys without the prefix)."""
    keep = [p for p in m.metadata_props if not p.key.startswith(META_PREFIX)]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    for k, v in props.items():
        p = m.metadata_props.add()
        p.key, p.value = META_PREFIX + k, v


def write_export_manifest(exp: Path, manifest: dict[str, Any]) -> Path:
    """Write ``export.json`` into the export folder ``exp`` (atomically); returns its path."""
    path = exp / MANIFEST_FILE
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def read_export_manifest(exp: Path) -> dict[str, Any]:
    """``export.json`` of an export folder (``{}`` when there is none); ValueError if it is unreadable."""
    manifest = exp / MANIFEST_FILE
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
        if not isinstance(data, dict):
            raise AttributeError(f"a JSON {type(data).__name__}, not an object")
        return data
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{manifest}: unreadable export manifest: {exc}") from exc


def _check_onnx_metadata(exp: Path) -> None:
    """Without ``export.json`` an export folder is only bound by the pixel hash each ONNX file carries in its
    metadata: refuse a foreign ONNX that would otherwise run under this folder's preprocessing."""
    want = PreprocessConfig.load(exp / PREPROCESS_FILE).pixel_hash()
    for f in sorted(exp.glob("*.onnx")):
        cfg, _ = onnx_config(f)
        if cfg.pixel_hash() != want:
            raise ConfigMismatchError(
                f"{f} was exported with other preprocessing ({cfg.pixel_hash()[:12]}) than {exp}/preprocess.json "
                f"({want[:12]}): it is another model's file; export the model again (leukedge export BUNDLE)")


def check_weights_binding(exp: Path, bundle: Path, manifest: dict[str, Any] | None = None) -> None:
    """Refuse an export whose ``export.json`` (``manifest``, read here when not given) names other weights than
    ``bundle/model.safetensors`` (swapped weights made ``auto`` and ``torch`` give opposite answers without a word)."""
    want = (read_export_manifest(exp) if manifest is None else manifest).get("weights_sha256")
    weights = bundle / WEIGHTS_FILE
    if want and weights.is_file():
        got = file_sha256(weights)
        if got != want:
            raise ValueError(
                f"{exp} was exported from other weights than {weights} (sha256 {want[:12]} != {got[:12]}); "
                f"export the bundle again: leukedge export {bundle}")


def check_export_hashes(exp: Path, manifest: dict[str, Any] | None = None) -> None:
    """Refuse an export folder whose ONNX files are not the ones its ``export.json`` (``manifest``, read here when
    not given) lists (e.g. another model's file copied in): the model is identified by what runs, not by what the
    folder names. Without ``export.json`` the files' metadata hashes are compared instead."""
    if manifest is None:
        manifest = read_export_manifest(exp)
    if not (exp / MANIFEST_FILE).is_file():
        _check_onnx_metadata(exp)
        return
    files = manifest.get("files") or {}
    for entry in files.values() if isinstance(files, dict) else []:
        if not isinstance(entry, dict) or not str(entry.get("path", "")).endswith(".onnx") or not entry.get("sha256"):
            continue
        f = exp / Path(str(entry["path"])).name
        if f.is_file() and (got := file_sha256(f)) != entry["sha256"]:
            raise ValueError(
                f"{f} does not match {MANIFEST_FILE} (sha256 {got[:12]} != {str(entry['sha256'])[:12]}): "
                "the folder holds another model's ONNX file; export the model again"
            )
