"""A model bundle folder: ``bundle.json`` (the model's description), ``model.safetensors``, ``trained_on.txt``.

``bundle.json`` is edited by hand and copied between machines, so it is untrusted input: :func:`read_bundle` is its
one reader. It parses the file once and checks every field that drives code, with one error class
(:class:`BundleError`) that names the file and the field: the schema (:func:`validate_bundle_meta`), the
preprocessing section and its ``preprocess_hash``, the ``test_time`` section. ``arch_kwargs`` is allow-listed
per architecture (:data:`ARCH_KWARGS`): it is passed to the model constructor (``timm.create_model`` for the timm
architectures), and keys such as ``checkpoint_path`` or ``pretrained_cfg_overlay`` would let a bundle make it
open arbitrary files. Torch-free: ONNX-only code paths read bundles too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .._util import CLASS_NAMES, atomic_write_text
from ..config import SIZE_RANGE, PreprocessConfig

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bundle.json"
#: most members of a test-time ensemble (``test_time.members``)
MAX_TEST_TIME_MEMBERS = 64

# arch -> {allowed arch_kwargs key: (type, min, max)}
ARCH_KWARGS: dict[str, dict[str, tuple[type, float, float]]] = {
    "tiny": {"width": (int, 1, 1024), "dropout": (float, 0.0, 1.0)},
    "efficientnet_lite0": {"dropout_rate": (float, 0.0, 1.0), "drop_connect_rate": (float, 0.0, 1.0)},
    "resnet18": {"drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0)},
    "mobilenetv3_small_100": {"drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0)},
    "efficientnet_b0": {"drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0)},
}



class BundleError(ValueError):
    """A model bundle folder is missing, incomplete or inconsistent, or its ``bundle.json`` is not a valid model
    description (the message names the file and the field)."""


#: the former name of :class:`BundleError` (``bundle.json`` schema errors had their own class)
BundleMetaError = BundleError


def check_arch_kwargs(arch: str, kwargs: Any, where: str = "arch_kwargs") -> dict[str, Any]:
    """``kwargs`` if every key is allowed for ``arch`` and every value has the right type and range."""
    if not isinstance(kwargs, dict):
        raise BundleError(f"{where}: must be a JSON object, not {type(kwargs).__name__}")
    allowed = ARCH_KWARGS.get(arch, {})
    for key, value in kwargs.items():
        if key not in allowed:
            raise BundleError(
                f"{where}: {key!r} is not an allowed setting of arch {arch!r} "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
            )
        typ, lo, hi = allowed[key]
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if typ is int:
            ok_type = ok_type and float(value).is_integer()
        if not ok_type or not math.isfinite(value) or not lo <= value <= hi:
            raise BundleError(f"{where}: {key}={value!r} must be a{'n integer' if typ is int else ' number'} "
                                  f"in [{lo:g}, {hi:g}]")
    return {k: (int(v) if allowed[k][0] is int else float(v)) for k, v in kwargs.items()}


def validate_bundle_meta(meta: Any, path: str | Path, archs: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check a parsed ``bundle.json`` (``path`` is only used in messages); returns ``meta``.

    Raises :class:`BundleError` for anything that would otherwise fail later with a traceback:
    not an object, missing keys, an unknown architecture, a non-integer ``input_size``, class names
    that are not two distinct strings, disallowed ``arch_kwargs``.
    """
    where = str(path)
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: must hold a JSON object, not a JSON {type(meta).__name__}")
    for key in ("format", "arch", "input_size", "preprocess", "preprocess_hash"):
        if key not in meta:
            raise BundleError(f"{where}: missing key {key!r}")
    arch = meta["arch"]
    known = archs or tuple(ARCH_KWARGS)
    if not isinstance(arch, str) or arch not in known:
        raise BundleError(f"{where}: arch={arch!r} is not one of {', '.join(known)}")
    size = meta["input_size"]
    lo, hi = SIZE_RANGE
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        raise BundleError(f"{where}: input_size={size!r} must be an integer between {lo} and {hi}")
    if not isinstance(meta["preprocess"], dict):
        raise BundleError(f"{where}: preprocess must be a JSON object, not {type(meta['preprocess']).__name__}")
    if meta.get("num_classes", 2) != 2 or isinstance(meta.get("num_classes", 2), bool):
        raise BundleError(f"{where}: num_classes={meta.get('num_classes')!r}; leukedge models have 2 classes")
    names = meta.get("class_names", list(CLASS_NAMES))
    if (not isinstance(names, list) or len(names) != 2 or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != 2):
        raise BundleError(f"{where}: class_names={names!r} must be two different names, e.g. [\"hem\", \"all\"]")
    check_arch_kwargs(arch, meta.get("arch_kwargs", {}), f"{where}: arch_kwargs")
    return meta


def _test_time(meta: dict[str, Any], where: Path) -> dict[str, Any]:
    test_time = meta.get("test_time") or {}
    if not isinstance(test_time, dict):
        raise BundleError(f"{where}: test_time must be an object, got {type(test_time).__name__}")
    try:
        n_members = int(test_time.get("members", 1))
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: test_time.members must be an integer") from exc
    if not 1 <= n_members <= MAX_TEST_TIME_MEMBERS:
        raise BundleError(f"{where}: test_time.members must be 1-{MAX_TEST_TIME_MEMBERS}, got {n_members}")
    return test_time


@dataclass(frozen=True)
class BundleFile:
    """A parsed, checked ``bundle.json``: ``path`` is the bundle folder, ``meta`` the JSON object as written,
    ``config`` its preprocessing (hash checked)."""

    path: Path
    meta: dict[str, Any]
    config: PreprocessConfig

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or CLASS_NAMES)

    @property
    def test_time(self) -> dict[str, Any]:
        """The ``test_time`` section (``{}`` for a single model without TTA); ``members`` checked to be 1-64."""
        return dict(self.meta.get("test_time") or {})

    @property
    def members(self) -> int:
        return int(self.test_time.get("members", 1))


def bundle_folder(path: str | Path) -> Path:
    """The bundle folder of ``path`` (the folder itself, or its ``bundle.json`` / ``model.safetensors``)."""
    p = Path(path)
    return p.parent if p.is_file() and p.name in (META_FILE, WEIGHTS_FILE) else p


def read_bundle(path: str | Path, archs: Sequence[str] | None = None) -> BundleFile:
    """The one reader of ``bundle.json``: the bundle folder ``path`` (or its ``bundle.json``), parsed once and
    checked (schema, ``archs``: the architectures allowed; preprocessing and its hash; ``test_time``).
    Raises :class:`BundleError` (a ValueError) naming the file and field for anything missing or invalid."""
    p = bundle_folder(path)
    meta_path = p / META_FILE
    if not p.is_dir():
        raise BundleError(f"{p}: model bundle directory not found")
    if not meta_path.is_file():
        raise BundleError(f"{p}: not a model bundle (missing {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:  # unreadable, invalid JSON or UTF-8
        raise BundleError(f"{meta_path}: invalid JSON: {exc}") from exc
    validate_bundle_meta(meta, meta_path, tuple(archs) if archs else None)
    if meta["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: bundle format {meta['format']} is not supported (expected {BUNDLE_FORMAT})")
    try:
        config = PreprocessConfig.from_dict(meta["preprocess"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: invalid preprocess section: {exc}") from exc
    if config.pixel_hash() != meta["preprocess_hash"]:
        raise BundleError(
            f"{meta_path}: preprocess_hash {str(meta['preprocess_hash'])[:12]} does not match its own preprocess "
            f"settings ({config.pixel_hash()[:12]}); the file was edited or is corrupt"
        )
    _test_time(meta, meta_path)
    return BundleFile(p, meta, config)


def read_bundle_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object of ``bundle.json`` as it is, unchecked (None when it is missing, unreadable or not an
    object): for callers that want one section of a bundle that may be partial (``preprocess --config``) or that
    need not be loadable (the OOD threshold of an export's bundle). Models are opened with :func:`read_bundle`."""
    p = bundle_folder(path) / META_FILE
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def read_bundle_meta(path: str | Path, archs: Sequence[str] | None = None) -> dict[str, Any]:
    """The checked ``bundle.json`` object of a bundle folder (:func:`read_bundle`'s ``meta``)."""
    return read_bundle(path, archs).meta


def write_bundle_meta(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``bundle.json`` into a bundle folder (atomically); returns its path."""
    path = Path(folder) / META_FILE
    atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return path


def default_model_path() -> Path:
    """The model shipped with the package (``leukedge/default_model``): a bundle with its ONNX export."""
    return Path(__file__).resolve().parents[1] / "default_model"


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
