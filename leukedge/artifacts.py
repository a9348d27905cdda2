"""Typed readers and writers of everything leukedge leaves on disk (torch-free).

One place knows each file format, so no stage parses another stage's files by hand:

* the dataset cache of ``leukedge preprocess`` (``cache.json``, ``config.json``, ``manifest.csv``,
  ``images.npy``): :func:`load_cache`, :class:`Cache`, :func:`read_manifest`, :func:`write_manifest`;
* a model bundle's ``bundle.json``: :func:`read_bundle_meta` (validated, :class:`BundleError`),
  :func:`read_bundle_json` (for model resolution), :func:`write_bundle_meta`, :func:`load_config_source`;
* an ONNX export folder (``preprocess.json``, ``export.json``, ``model_fp32/fp16/int8.onnx``): :func:`onnx_config`,
  :func:`check_export_hashes`, :func:`read_export_manifest`;
* an engine's sidecar ``ENGINE.json``: :func:`sidecar_path`, :func:`read_sidecar`, :func:`write_sidecar`;
* the model shipped with the package: :func:`default_model_path`;
* a bundle's ``trained_on.txt`` (pixel digests of its training cells): :func:`write_trained_on`, :func:`read_trained_on`.

Nothing here imports torch, onnxruntime or TensorRT at module level (``onnx`` only inside
:func:`onnx_config`), so ONNX-only deployments and ``import leukedge`` stay light.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._util import atomic_write_text, file_sha256, path_text
from .bundle_meta import BundleMetaError, validate_bundle_meta
from .config import ConfigMismatchError, PreprocessConfig

# dataset cache
CACHE_VERSION = 1
MANIFEST_FIELDS = ("index", "path", "label", "class_name", "subject", "fold", "split", "status", "error", "sha256", "stain_fallback")
# model bundle
BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bundle.json"
# ONNX export folder
EXPORT_FP32 = "model_fp32.onnx"
EXPORT_FP16 = "model_fp16.onnx"
META_PREFIX = "leukedge."  # ONNX metadata_props written by the export: leukedge.preprocess, .precision, ...
EXPORT_INT8 = "model_int8.onnx"  # Q/DQ graph for ONNX Runtime; used only when export.json's "int8"."passed" is true
EXPORT_INT8_TRT = "model_int8_trt.onnx"  # symmetric Q/DQ graph for TensorRT; "int8"."tensorrt"."passed"
# engines
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
SIDECAR_FORMAT = 1


# --------------------------------------------------------------------------------------------
# dataset cache
def _opt_int(v: str) -> int | None:
    v = (v or "").strip()
    return int(v) if v not in ("", "None") else None


def _opt_str(v: str) -> str | None:
    v = v if v is not None else ""
    return v if v not in ("", "None") else None


def _typed_row(row: dict[str, str], where: str = "manifest") -> dict[str, Any]:
    label = int(row["label"])
    if label not in (-1, 0, 1):  # it used to be an IndexError deep in training
        raise ValueError(f"{where}: row {row.get('index')}: label {label} is not -1 (unknown), 0 (hem) or 1 (all)")
    return {
        "index": int(row["index"]),
        "path": row["path"],
        "label": label,
        "class_name": row["class_name"],
        "subject": _opt_str(row["subject"]),
        "fold": _opt_int(row["fold"]),
        "split": _opt_str(row["split"]),
        "status": row["status"],
        "error": _opt_str(row["error"]),
        "sha256": _opt_str(row["sha256"]),
        "stain_fallback": str(row["stain_fallback"]).strip().lower() in ("1", "true", "yes"),
    }


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``manifest.csv`` into typed dicts (label/index int, fold int|None, stain_fallback bool)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(MANIFEST_FIELDS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks column(s) {', '.join(sorted(missing))}")
        return [_typed_row(r, str(path)) for r in reader]


def write_manifest(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(MANIFEST_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            row = {k: ("" if r.get(k) is None else r.get(k)) for k in MANIFEST_FIELDS}
            row["path"] = path_text(str(row["path"]))  # a name that is not UTF-8 (or holds a CR): escaped, readable
            w.writerow(row)


@dataclass
class Cache:
    """A loaded dataset cache. ``images`` is a read-only memmap ``(N, S, S, 3)`` uint8."""

    path: Path
    images: np.ndarray
    manifest: list[dict[str, Any]]
    config: PreprocessConfig
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def labels(self) -> np.ndarray:
        """int64 labels per row (1 = all, 0 = hem, -1 unknown)."""
        return np.array([r["label"] for r in self.manifest], dtype=np.int64)

    @property
    def subjects(self) -> list[str | None]:
        return [r["subject"] for r in self.manifest]

    @property
    def splits(self) -> list[str | None]:
        return [r["split"] for r in self.manifest]

    @property
    def folds(self) -> list[int | None]:
        return [r["fold"] for r in self.manifest]

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self.manifest]

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic", False))

    @property
    def pixel_hash(self) -> str:
        return self.config.pixel_hash()

    def ok_indices(self) -> np.ndarray:
        """Indices of rows that were processed successfully."""
        return np.array([i for i, r in enumerate(self.manifest) if r["status"] == "ok"], dtype=np.int64)

    def indices(self, split: str | None = None, *, ok: bool = True, labelled: bool = False) -> np.ndarray:
        """Row indices filtered by split ("train"/"val"/"test"; None = any), status ok, label known."""
        out = []
        for i, r in enumerate(self.manifest):
            if split is not None and r["split"] != split:
                continue
            if ok and r["status"] != "ok":
                continue
            if labelled and r["label"] not in (0, 1):
                continue
            out.append(i)
        return np.array(out, dtype=np.int64)


def _holds_images(folder: Path, limit: int = 2000) -> bool:
    """Whether an image file is among the first ``limit`` entries found under ``folder`` (a bounded look)."""
    from ._util import IMAGE_EXTENSIONS

    for n, (_, _, files) in enumerate(os.walk(folder)):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files) or n >= limit:
            return n < limit
    return False


def _not_a_cache(p: Path) -> str:
    """Why ``p`` cannot be loaded as a cache, and the command that makes one (never one that writes into an
    image folder)."""
    if p.is_dir() and not any((p / f).exists() for f in ("metrics.json", "bundle.json", "images.npy")) and _holds_images(p):
        return (f"{p} holds images, not a complete dataset cache: preprocess them first, e.g. "
                f"`leukedge preprocess {p} -o {p.name or 'data'}_cache`, then train on {p.name or 'data'}_cache")
    if p.is_dir() and (p / "images.npy").exists():
        return f"{p}: not a complete dataset cache (no cache.json: the preprocessing run was interrupted); run it again"
    return f"{p}: not a complete dataset cache (no cache.json); make one with `leukedge preprocess IMAGES -o {p}`"


def load_cache(path: str | os.PathLike) -> Cache:
    """Load a dataset cache folder (or its ``cache.json``) written by ``leukedge preprocess``.

    Raises ``FileNotFoundError`` for a folder without ``cache.json`` (not a cache, or an interrupted
    run) and ``ValueError`` when the files disagree with each other.
    """
    p = Path(path)
    if p.is_file() and p.name == "cache.json":
        p = p.parent
    meta_file = p / "cache.json"
    if not meta_file.is_file():
        raise FileNotFoundError(_not_a_cache(p))
    meta = json.loads(meta_file.read_text())
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{p}: cache version {meta.get('version')!r} is not this leukedge's ({CACHE_VERSION}); "
                         f"run `leukedge preprocess` again to rebuild it")
    config = PreprocessConfig.load(p / "config.json")
    manifest = read_manifest(p / "manifest.csv")
    images = np.load(p / "images.npy", mmap_mode="r")
    if images.ndim != 4 or images.shape[0] != len(manifest) or images.shape[1:] != (config.size, config.size, 3) or images.dtype != np.uint8:
        raise ValueError(
            f"{p}: images.npy {images.shape} {images.dtype} does not match manifest ({len(manifest)} rows) "
            f"and config size {config.size}"
        )
    if meta.get("pixel_hash") != config.pixel_hash():
        raise ValueError(f"{p}: cache.json pixel_hash does not match config.json; the cache was modified by hand")
    return Cache(path=p, images=images, manifest=manifest, config=config, meta=meta)


def load_config_source(path: str | os.PathLike) -> PreprocessConfig:
    """Read a PreprocessConfig from a ``config.json``, a ``bundle.json`` (its ``"preprocess"`` key),
    a model bundle folder or a dataset cache folder."""
    p = Path(path)
    if p.is_dir():
        for name in ("bundle.json", "config.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise ValueError(f"{path}: folder holds neither bundle.json nor config.json")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: cannot read a preprocessing config: {exc}") from exc
    if isinstance(d, dict) and isinstance(d.get("preprocess"), dict):
        d = d["preprocess"]
    try:
        return PreprocessConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{p}: not a valid preprocessing config: {exc}") from exc



# --------------------------------------------------------------------------------------------
# model bundle
class BundleError(ValueError):
    """A model bundle directory is missing, incomplete or inconsistent."""


def read_bundle_meta(path: str | Path, archs: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The validated ``bundle.json`` of a model bundle folder (or of the file itself); :class:`BundleError`
    names the file and the field for anything missing or invalid (``archs``: the architectures allowed)."""
    p = Path(path)
    if p.is_file() and p.name == META_FILE:
        p = p.parent
    meta_path = p / META_FILE
    if not p.is_dir():
        raise BundleError(f"{p}: model bundle directory not found")
    if not meta_path.is_file():
        raise BundleError(f"{p}: not a model bundle (missing {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_path}: invalid JSON: {exc}") from exc
    try:
        validate_bundle_meta(meta, meta_path, archs)
    except BundleMetaError as exc:
        raise BundleError(str(exc)) from exc
    if meta["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: bundle format {meta['format']} is not supported (expected {BUNDLE_FORMAT})")
    return meta



def write_bundle_meta(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``bundle.json`` into a bundle folder (atomically); returns its path."""
    path = Path(folder) / META_FILE
    atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return path


def read_bundle_json(folder: Path) -> tuple[dict[str, Any], PreprocessConfig]:
    """``bundle.json`` of ``folder`` and its preprocessing, for model resolution (no torch needed).

    Raises :class:`BundleMetaError` for an invalid description and ``ValueError`` for invalid JSON,
    bad preprocessing settings or a ``preprocess_hash`` that does not match them.
    """
    p = folder
    try:
        meta = validate_bundle_meta(json.loads((p / META_FILE).read_text()), p / META_FILE)
        cfg = PreprocessConfig.from_dict(meta["preprocess"])
    except BundleMetaError:
        raise
    except (ValueError, TypeError) as exc:  # invalid JSON, bad preprocess settings
        raise ValueError(f"{p}/bundle.json: not a valid model bundle: {exc}") from exc
    if meta.get("preprocess_hash") and meta["preprocess_hash"] != cfg.pixel_hash():
        raise ValueError(f"{p}/bundle.json: preprocess_hash does not match its preprocessing config")
    return meta, cfg


def default_model_path() -> Path:
    """The model shipped with the package (``leukedge/default_model``): a bundle with its ONNX export."""
    return Path(__file__).resolve().parent / "default_model"


#: a bundle's list of the cells it was trained on, as pixel digests (:func:`leukedge.data.pixel_digest`)
TRAINED_ON_FILE = "trained_on.txt"


def write_trained_on(bundle: str | Path, digests: Sequence[str], *, note: str = "") -> Path:
    """Write ``BUNDLE/trained_on.txt``: one pixel digest per line (sorted, unique) of every cell the model was
    trained on, after a comment header saying what the digests are; ``note`` (e.g. the data set) goes into
    the header. Scoring code uses it to keep a model's own training cells out of its scores."""
    lines = [f"# {TRAINED_ON_FILE}: sha256 of the decoded RGB pixels (H x W x 3 uint8, leukedge._native.decode) of",
             "# every image this model was trained on; leukedge.data.pixel_digest(path) computes one.",
             *(f"# {line}" for line in note.splitlines() if line.strip()),
             *sorted(set(digests))]
    path = Path(bundle) / TRAINED_ON_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def read_trained_on(bundle: str | Path) -> frozenset[str] | None:
    """The pixel digests of ``BUNDLE/trained_on.txt``, or None when the bundle has no such file (then which
    cells it saw is unknown). A line that is not a 64-digit hex digest is refused (ValueError)."""
    path = Path(bundle) / TRAINED_ON_FILE
    if not path.is_file():
        return None
    out = set()
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) != 64 or any(c not in "0123456789abcdef" for c in line):
            raise ValueError(f"{path}:{n}: not a sha256 hex digest: {line[:80]!r}")
        out.add(line)
    return frozenset(out)


# --------------------------------------------------------------------------------------------
# ONNX export
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
    side = path.parent / "preprocess.json"
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


def read_export_manifest(exp: Path) -> dict[str, Any]:
    """``export.json`` of an export folder (``{}`` when there is none); ValueError if it is unreadable."""
    manifest = exp / "export.json"
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
    want = PreprocessConfig.load(exp / "preprocess.json").pixel_hash()
    for f in sorted(exp.glob("*.onnx")):
        cfg, _ = onnx_config(f)
        if cfg.pixel_hash() != want:
            raise ConfigMismatchError(
                f"{f} was exported with other preprocessing ({cfg.pixel_hash()[:12]}) than {exp}/preprocess.json "
                f"({want[:12]}): it is another model's file; export the model again (leukedge export BUNDLE)")


def check_weights_binding(exp: Path, bundle: Path) -> None:
    """Refuse an export whose ``export.json`` names other weights than ``bundle/model.safetensors`` (swapped
    weights made ``auto`` and ``torch`` give opposite answers without a word)."""
    want = read_export_manifest(exp).get("weights_sha256")
    weights = bundle / "model.safetensors"
    if want and weights.is_file():
        got = file_sha256(weights)
        if got != want:
            raise ValueError(
                f"{exp} was exported from other weights than {weights} (sha256 {want[:12]} != {got[:12]}); "
                f"export the bundle again: leukedge export {bundle}")


def check_export_hashes(exp: Path) -> None:
    """Refuse an export folder whose ONNX files are not the ones its ``export.json`` lists (e.g. another
    model's file copied in): the model is identified by what runs, not by what the folder names."""
    manifest = exp / "export.json"
    if not manifest.is_file():
        _check_onnx_metadata(exp)
        return
    files = read_export_manifest(exp).get("files") or {}
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
# engine sidecar
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
    missing = [k for k in ("flavour", "trt_version", "preprocess", "preprocess_hash", "inputs", "outputs") if k not in info]
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
