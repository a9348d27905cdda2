"""Validation of a model bundle's ``bundle.json`` (torch-free, so ONNX-only code paths can use it).

``bundle.json`` is edited by hand and copied between machines, so it is treated as untrusted
input: every field that drives code is checked here, with an error that names the file and the
field, before anything is built from it. In particular ``arch_kwargs`` is allow-listed per
architecture: it is passed to the model constructor (``timm.create_model`` for the timm
architectures), and keys such as ``checkpoint_path`` or ``pretrained_cfg_overlay`` would let a
bundle make it open arbitrary files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# arch -> {allowed arch_kwargs key: (type, min, max)}
ARCH_KWARGS: dict[str, dict[str, tuple[type, float, float]]] = {
    "tiny": {"width": (int, 1, 1024), "dropout": (float, 0.0, 1.0)},
    "efficientnet_lite0": {"dropout_rate": (float, 0.0, 1.0), "drop_connect_rate": (float, 0.0, 1.0)},
    "resnet18": {"drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0)},
    "mobilenetv3_small_100": {"drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0)},
    "efficientnet_b0": {"drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0)},
}


class BundleMetaError(ValueError):
    """``bundle.json`` is not a valid model description (the message names the file and field)."""


def check_arch_kwargs(arch: str, kwargs: Any, where: str = "arch_kwargs") -> dict[str, Any]:
    """``kwargs`` if every key is allowed for ``arch`` and every value has the right type and range."""
    if not isinstance(kwargs, dict):
        raise BundleMetaError(f"{where}: must be a JSON object, not {type(kwargs).__name__}")
    allowed = ARCH_KWARGS.get(arch, {})
    for key, value in kwargs.items():
        if key not in allowed:
            raise BundleMetaError(
                f"{where}: {key!r} is not an allowed setting of arch {arch!r} "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
            )
        typ, lo, hi = allowed[key]
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if typ is int:
            ok_type = ok_type and float(value).is_integer()
        if not ok_type or not math.isfinite(value) or not lo <= value <= hi:
            raise BundleMetaError(f"{where}: {key}={value!r} must be a{'n integer' if typ is int else ' number'} "
                                  f"in [{lo:g}, {hi:g}]")
    return {k: (int(v) if allowed[k][0] is int else float(v)) for k, v in kwargs.items()}


def validate_bundle_meta(meta: Any, path: str | Path, archs: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check a parsed ``bundle.json`` (``path`` is only used in messages); returns ``meta``.

    Raises :class:`BundleMetaError` for anything that would otherwise fail later with a traceback:
    not an object, missing keys, an unknown architecture, a non-integer ``input_size``, class names
    that are not two distinct strings, disallowed ``arch_kwargs``.
    """
    where = str(path)
    if not isinstance(meta, dict):
        raise BundleMetaError(f"{where}: must hold a JSON object, not a JSON {type(meta).__name__}")
    for key in ("format", "arch", "input_size", "preprocess", "preprocess_hash"):
        if key not in meta:
            raise BundleMetaError(f"{where}: missing key {key!r}")
    arch = meta["arch"]
    known = archs or tuple(ARCH_KWARGS)
    if not isinstance(arch, str) or arch not in known:
        raise BundleMetaError(f"{where}: arch={arch!r} is not one of {', '.join(known)}")
    size = meta["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise BundleMetaError(f"{where}: input_size={size!r} must be an integer between 8 and 4096")
    if not isinstance(meta["preprocess"], dict):
        raise BundleMetaError(f"{where}: preprocess must be a JSON object, not {type(meta['preprocess']).__name__}")
    if meta.get("num_classes", 2) != 2 or isinstance(meta.get("num_classes", 2), bool):
        raise BundleMetaError(f"{where}: num_classes={meta.get('num_classes')!r}; leukedge models have 2 classes")
    names = meta.get("class_names", ["hem", "all"])
    if (not isinstance(names, list) or len(names) != 2 or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != 2):
        raise BundleMetaError(f"{where}: class_names={names!r} must be two different names, e.g. [\"hem\", \"all\"]")
    check_arch_kwargs(arch, meta.get("arch_kwargs", {}), f"{where}: arch_kwargs")
    return meta
