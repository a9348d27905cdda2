"""Engine compatibility: may this engine (its sidecar ``ENGINE.json``) run with this TensorRT on this GPU?

A serialized TensorRT engine only runs with the exact TensorRT build that produced it and (unless
built hardware-compatible) on the compute capability it was built for.  TensorRT-RTX engines are
built ahead of time (AOT) for a list of compute capabilities and JIT-compiled on the target GPU.
The sidecar records all of that, plus the preprocessing configuration and hash, so that loading
can refuse a mismatch with an error that says exactly how to rebuild.
"""

from __future__ import annotations

import os
from typing import Any

# re-exported: the sidecar file, its reader, writer and preprocessing checks live in leukedge.formats.sidecar
from ..formats.sidecar import SIDECAR_FORMAT as SIDECAR_FORMAT
from ..formats.sidecar import EngineMismatchError as EngineMismatchError
from ..formats.sidecar import check_preprocess as check_preprocess
from ..formats.sidecar import read_sidecar as read_sidecar
from ..formats.sidecar import rebuild_command as rebuild_command
from ..formats.sidecar import sidecar_config as sidecar_config
from ..formats.sidecar import sidecar_path as sidecar_path
from ..formats.sidecar import write_sidecar as write_sidecar

# Compute capabilities TensorRT-RTX can build for (its ComputeCapability enum, 1.7: SM75 ... SM121). Built
# with no explicit target, an engine's portable set is TensorRT-RTX's business: the runtime's
# get_engine_validity decides, at load time, on the GPU itself.
RTX_SUPPORTED_CC = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
# What TensorRT-RTX's support matrix lists as the default portable set (for messages only).
RTX_DEFAULT_TARGETS_DOC = "8.6, 8.9 and 12.0 (TensorRT-RTX default portable set)"


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def check_compatible(
    info: dict[str, Any],
    engine_path: str | os.PathLike,
    *,
    flavour: str,
    trt_version: str,
    compute_capability: str | None,
) -> None:
    """Refuse an engine built by another TensorRT flavour/version or for another GPU.

    ``compute_capability`` is the current GPU's ("8.9"); ``None`` skips the GPU check.
    """
    built_flavour, built_version = info.get("flavour"), str(info.get("trt_version"))
    if built_flavour != flavour:
        raise EngineMismatchError(
            f"{engine_path} was built with {built_flavour} {built_version} but this runtime is {flavour} {trt_version}. "
            f"Rebuild it here: {rebuild_command(info, engine_path, flavour)}"
        )
    if built_version != str(trt_version):
        raise EngineMismatchError(
            f"{engine_path} was built with {built_flavour} {built_version} but {flavour} {trt_version} is installed; "
            f"serialized engines only load with the exact TensorRT version that built them. "
            f"Rebuild it here: {rebuild_command(info, engine_path, flavour)}"
        )
    if compute_capability is None:
        return
    here = _cc_tuple(compute_capability)
    if flavour == "tensorrt-rtx":
        targets = list(info.get("target_compute_capabilities") or [])
        if compute_capability not in RTX_SUPPORTED_CC:
            raise EngineMismatchError(
                f"{engine_path} is a TensorRT-RTX engine, and TensorRT-RTX does not target compute capability "
                f"{compute_capability} (it supports {', '.join(RTX_SUPPORTED_CC)}: RTX / desktop GPUs, not Hopper or "
                f"Jetson). Build with standard TensorRT on this GPU: {rebuild_command(info, engine_path, 'tensorrt')}"
            )
        if targets and not any(_cc_tuple(t) == here for t in targets):
            raise EngineMismatchError(
                f"{engine_path} is a TensorRT-RTX engine for compute capabilities {', '.join(targets)} but this GPU is "
                f"{compute_capability}. Rebuild it for this GPU: "
                f"{rebuild_command(info, engine_path, flavour)} --target-cc {compute_capability}"
            )
        return  # default portable set: TensorRT-RTX's get_engine_validity decides on the GPU
    built_cc = (info.get("built_on") or {}).get("compute_capability")
    if built_cc is None:
        return
    level = (info.get("hardware_compat") or "").lower()
    if level in ("ampere_plus", "ampere+"):
        ok = here >= (8, 0)
    else:
        ok = _cc_tuple(built_cc) == here
    if not ok:
        raise EngineMismatchError(
            f"{engine_path} was built on a GPU with compute capability {built_cc} "
            f"({(info.get('built_on') or {}).get('gpu', '?')}) but this GPU is {compute_capability}"
            f"{' (hardware compatibility ' + level + ')' if level else ''}. "
            f"Rebuild it here: {rebuild_command(info, engine_path, flavour)}"
        )
