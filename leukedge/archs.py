"""The model architectures: one registry of name, description, allowed and default ``arch_kwargs``,
ImageNet weights and builder.

Everything else derives from :data:`REGISTRY`: the ``--arch`` choices of ``leukedge train`` / ``cv``,
the architectures a ``bundle.json`` may name and the ``arch_kwargs`` it may carry
(:func:`leukedge.bundle_meta.check_arch_kwargs`), the settings a training run starts from, and which
function of :mod:`leukedge.models` builds the network. Adding a timm architecture is one entry here.

This module imports neither torch nor timm, so torch-free code (bundle validation, the CLI's option
list, ONNX-only inference) can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but cannot be obtained (offline, no local copy)."""


#: an allowed ``arch_kwargs`` key's value: (type, minimum, maximum)
KwargSpec = tuple[type, float, float]

_DROP_RATES: dict[str, KwargSpec] = {"drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0)}


@dataclass(frozen=True)
class Arch:
    """One architecture.

    ``kwargs``: the ``arch_kwargs`` keys it accepts, allow-listed because ``bundle.json`` is untrusted input
    (timm's ``checkpoint_path`` or ``pretrained_cfg_overlay`` would let a bundle open arbitrary files);
    ``defaults``: the ``arch_kwargs`` a training run starts from (recorded in the bundle); ``pretrained``:
    whether ImageNet weights exist for it; ``builder``: the family of :func:`leukedge.models.build_model`
    that builds it (``"tiny"``, ``"efficientnet_lite0"`` or ``"timm"``).
    """

    name: str
    description: str
    builder: str
    pretrained: bool = True
    kwargs: Mapping[str, KwargSpec] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, Arch] = {a.name: a for a in (
    Arch("tiny", "small plain CNN (4 conv stages, ~0.3 M parameters) that trains in minutes on a CPU", "tiny",
         pretrained=False, kwargs={"width": (int, 1, 1024), "dropout": (float, 0.0, 1.0)},
         defaults={"width": 16, "dropout": 0.1}),
    Arch("efficientnet_lite0", "EfficientNet-Lite0 (ReLU6, no SE; ImageNet weights ship with the pip package)",
         "efficientnet_lite0", kwargs={"dropout_rate": (float, 0.0, 1.0), "drop_connect_rate": (float, 0.0, 1.0)},
         defaults={"dropout_rate": 0.2, "drop_connect_rate": 0.2}),
    Arch("resnet18", "timm ResNet-18", "timm", kwargs=_DROP_RATES),
    Arch("mobilenetv3_small_100", "timm MobileNetV3-Small 1.0", "timm", kwargs=_DROP_RATES),
    Arch("efficientnet_b0", "timm EfficientNet-B0", "timm", kwargs=_DROP_RATES),
)}

#: the architecture names, in ``--arch`` order
ARCH_NAMES: tuple[str, ...] = tuple(REGISTRY)

#: arch -> {allowed ``arch_kwargs`` key: (type, min, max)} (the shape :mod:`leukedge.bundle_meta` checks against)
ARCH_KWARGS: dict[str, dict[str, KwargSpec]] = {a.name: dict(a.kwargs) for a in REGISTRY.values()}


def get_arch(name: str) -> Arch:
    """The registry entry of ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCH_NAMES)}") from None


def default_arch_kwargs(arch: str) -> dict[str, Any]:
    """The ``arch_kwargs`` a training run of ``arch`` starts from (empty for an unknown name)."""
    entry = REGISTRY.get(arch)
    return dict(entry.defaults) if entry is not None else {}
