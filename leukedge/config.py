"""Preprocessing configuration shared by the Rust core, training, export and inference.

The same :class:`PreprocessConfig` travels with the dataset cache, the model bundle and every
engine sidecar.  :meth:`PreprocessConfig.pixel_hash` covers every field that changes pixel
values, so a model can refuse data or an engine that was prepared differently.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STAIN_METHODS = ("macenko", "reinhard", "none")
CROP_MODES = ("bbox", "window", "none")
SQUARE_MODES = ("pad", "crop")
FILTERS = ("bilinear", "lanczos3", "box", "nearest", "catmullrom")

#: ``size`` and ``crop_window`` bounds, in pixels (the Rust core's, rust_ext/src/config.rs, which validates them;
#: Python uses them for option ranges and for ``bundle.json``'s ``input_size``)
SIZE_RANGE = (8, 4096)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Fields that do not change pixel values and so are left out of the pixel hash.
_NON_PIXEL_FIELDS = ("max_pixels", "layout", "dtype", "gate")


class ConfigMismatchError(ValueError):
    """Raised when two preprocessing configurations that must agree do not."""


def _require_finite(name: str, value: float, option: str) -> None:
    # JSON (the form the Rust core validates) cannot carry NaN / infinity: refuse them here, clearly.
    if not math.isfinite(value):
        raise ValueError(f"{name} {value} must be a finite number ({option})")


@functools.lru_cache(maxsize=64)
def native_pipeline(native_json: str) -> Any:
    """``leukedge._native.Pipeline(native_json)``, built once per distinct configuration.
    Raises ``leukedge._native.ConfigError`` (a ``ValueError``) for an invalid configuration, and a
    RuntimeError saying how to build the core when it is not built."""
    from ._util import load_native

    return load_native().Pipeline(native_json)


@dataclass(frozen=True)
class StainConfig:
    """Stain normalisation settings.

    ``params`` holds fitted parameters as produced by ``leukedge._native.fit_stain`` (a JSON
    object); ``None`` means the built-in reference (torchstain's for Macenko).
    """

    method: str = "macenko"
    io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    black_threshold: int = 10
    white_threshold: int | None = None
    min_foreground: int = 500
    params: dict[str, Any] | None = None
    fit_pixels: int | None = None
    """Fit each image's stain model on at most this many foreground pixels (a fixed, evenly strided
    subsample; the transform is still applied to every foreground pixel). ``None`` (default) = every
    foreground pixel, torchstain's arithmetic. Changes pixels, so it enters the pixel hash (left out of
    the serialised config while ``None``, so existing hashes stay valid). Not recommended below 16384;
    how far the pixels move is measured by ``benchmarks/fit_pixels_diff.py``
    (``benchmarks/results/fit_pixels.json``)."""

    apply_at_output: bool = False
    """Apply the fitted stain transform after resizing, to the non-black pixels of the output, instead of
    to every foreground pixel before resizing (torchstain's order). The fit itself is unchanged. ``False``
    (default) = exact order. Changes pixels (the transform is not linear, and at the cell border it sees
    pixels blended with the black background), so it enters the pixel hash (left out of the serialised
    config while ``False``). Not bit-comparable to torchstain; meant for throughput. How far the pixels
    move: ``benchmarks/fit_pixels_diff.py`` (``benchmarks/results/fit_pixels.json``); the speed: README,
    Benchmarks."""

    def __post_init__(self) -> None:
        for name in ("io", "alpha", "beta"):
            _require_finite(f"stain.{name}", getattr(self, name), f"--stain-{name}")
        # Every bound lives in rust_ext/src/config.rs (one place): the Rust core validates.
        native_pipeline(json.dumps({"stain": dataclasses.asdict(self)}, sort_keys=True, separators=(",", ":")))


@dataclass(frozen=True)
class GateConfig:
    """The cell quality gate of the Rust core (``rust_ext/src/gate.rs``, bounds and their measurement in
    ``rust_ext/src/config.rs``): a decoded frame with fewer than ``min_pixels`` foreground pixels (no cell),
    a foreground outside ``[min_area, max_area]`` of the frame (debris; a blank, grey, noisy or unsegmented
    frame), or more than ``max_border`` of its border pixels foreground (a cell cut by the edge) is
    *rejected*: never classified, counted apart. Foreground is the stain mask's (``stain.black_threshold``).

    It never changes pixels, so it is not in the pixel hash; it travels with the model's preprocessing and
    is left out of the serialised config while at its defaults (older bundles and caches load unchanged
    and get the default gate). ``enabled=False`` turns it off (for unsegmented images)."""

    enabled: bool = True
    min_pixels: int = 100
    min_area: float = 0.015
    max_area: float = 0.5
    max_border: float = 0.08


@dataclass(frozen=True)
class PreprocessConfig:
    max_pixels: int = 64_000_000
    stain: StainConfig = field(default_factory=StainConfig)
    crop: str = "bbox"
    crop_margin: int = 8
    crop_window: int = 384
    """Side, in source pixels, of the fixed window that ``crop="window"`` cuts around the cell's centre
    (then resized to ``size``): the cell keeps its size relative to the frame, which bbox cropping
    erases. Used only by ``crop="window"``, and serialised only then (existing hashes unchanged)."""
    square: str = "pad"
    size: int = 224
    filter: str = "bilinear"
    layout: str = "nchw"
    dtype: str = "float32"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if isinstance(self.gate, dict):
            object.__setattr__(self, "gate", _gate_from_dict(self.gate))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three values each (--mean / --std)")
        for v in (*self.mean, *self.std):
            _require_finite(f"mean={list(self.mean)} / std={list(self.std)}:", v, "--mean / --std")
        # Every bound lives in rust_ext/src/config.rs (one place): the Rust core validates, and the
        # validated pipeline is cached for pipeline().
        self.pipeline()

    def pipeline(self) -> Any:
        """The ``leukedge._native.Pipeline`` of this config: parsed, validated and its tables built
        once (cached per configuration); ``.run(items, out=None, threads=0)`` preprocesses a batch."""
        return native_pipeline(self.to_native_json())

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["stain"].get("fit_pixels") is None:  # a later option, at its exact default: hashes unchanged
            del d["stain"]["fit_pixels"]
        if not d["stain"].get("apply_at_output"):  # likewise
            del d["stain"]["apply_at_output"]
        if d["crop"] != "window":  # used by crop="window" only: other configs keep their hashes
            del d["crop_window"]
        if self.gate == GateConfig():  # not in older configs: left out at its defaults
            del d["gate"]
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing setting(s): {', '.join(sorted(unknown))}")
        stain = d.pop("stain", None) or {}
        if isinstance(stain, dict):
            sknown = {f.name for f in dataclasses.fields(StainConfig)}
            bad = set(stain) - sknown
            if bad:
                raise ValueError(f"unknown stain setting(s): {', '.join(sorted(bad))}")
            stain = StainConfig(**stain)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        if isinstance(d.get("gate"), dict):
            d["gate"] = _gate_from_dict(d["gate"])
        return cls(stain=stain, **d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PreprocessConfig":
        try:
            return cls.from_json(Path(path).read_text())
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a valid preprocessing config: {exc}") from exc

    def to_native_json(self) -> str:
        """Compact JSON consumed by ``leukedge._native``."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def replace(self, **changes: Any) -> "PreprocessConfig":
        return dataclasses.replace(self, **changes)

    # -- identity ------------------------------------------------------------------------
    def pixel_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in _NON_PIXEL_FIELDS:
            d.pop(k, None)
        return d

    def pixel_hash(self) -> str:
        canon = json.dumps(self.pixel_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def diff(self, other: "PreprocessConfig") -> list[str]:
        """Human-readable list of pixel-affecting settings that differ."""
        a, b = _flatten(self.pixel_dict()), _flatten(other.pixel_dict())
        return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    def require_same_pixels(self, other: "PreprocessConfig", what: str = "model", against: str = "data",
                            fix: str | None = None) -> None:
        """Refuse ``other`` unless it gives the same pixels: one line naming both hashes, every differing setting
        and ``fix`` (default: re-run ``preprocess`` with the ``what``'s config or rebuild the ``what``)."""
        if self.pixel_hash() != other.pixel_hash():
            diffs = "; ".join(self.diff(other)) or "(hash differs)"
            fix = fix or (f"Re-run `leukedge preprocess` with the {what}'s config (--config <bundle>/bundle.json) "
                          f"or rebuild the {what}.")
            raise ConfigMismatchError(
                f"preprocessing of the {what} ({self.pixel_hash()[:12]}) does not match the {against} "
                f"({other.pixel_hash()[:12]}): {diffs}. {fix}"
            )


def _gate_from_dict(d: dict[str, Any]) -> GateConfig:
    known = {f.name for f in dataclasses.fields(GateConfig)}
    bad = set(d) - known
    if bad:
        raise ValueError(f"unknown gate setting(s): {', '.join(sorted(bad))}")
    return GateConfig(**d)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "params":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def normalize_uint8(batch_u8: np.ndarray, cfg: PreprocessConfig, layout: str = "nchw", dtype: str = "float32") -> np.ndarray:
    """Normalise a uint8 NHWC batch exactly like the Rust core: ``(u8/255 - mean)/std``."""
    x = batch_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    if layout == "nchw":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x.astype(dtype, copy=False)
