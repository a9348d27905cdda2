"""The architecture registry and TrainConfig as the single source of the training defaults (torch-free)."""

from __future__ import annotations

import click
import pytest

from leukedge import archs, bundle_meta
from leukedge.cli.train import train_cmd
from leukedge.training import TrainConfig, default_of


def test_registry_is_the_one_list_of_architectures():
    assert archs.ARCH_NAMES == ("tiny", "efficientnet_lite0", "resnet18", "mobilenetv3_small_100", "efficientnet_b0")
    # bundle_meta validates bundle.json against the same allow-list (until it imports archs.ARCH_KWARGS itself)
    assert bundle_meta.ARCH_KWARGS == archs.ARCH_KWARGS
    for a in archs.REGISTRY.values():
        assert set(a.defaults) <= set(a.kwargs), a.name
        assert bundle_meta.check_arch_kwargs(a.name, dict(a.defaults)) == dict(a.defaults)
        assert a.builder in ("tiny", "efficientnet_lite0", "timm")
    with pytest.raises(ValueError, match="unknown architecture 'vgg'; choose one of: tiny, efficientnet_lite0"):
        archs.get_arch("vgg")
    assert archs.default_arch_kwargs("tiny") == {"width": 16, "dropout": 0.1}
    assert archs.default_arch_kwargs("resnet18") == {} and archs.default_arch_kwargs("nope") == {}


def test_train_config_defaults_are_the_cli_defaults():
    """Every `leukedge train` option that sets a TrainConfig field shows and uses that field's default."""
    cfg = TrainConfig()
    assert (cfg.arch, cfg.pretrained) == ("efficientnet_lite0", True)
    checked = 0
    for p in train_cmd.params:
        if isinstance(p, click.Option) and p.name in TrainConfig.__dataclass_fields__:
            want = default_of(p.name)
            assert p.default == (0 if p.name == "threads" and want is None else want), p.name
            checked += 1
    assert checked >= 28
    arch = next(p for p in train_cmd.params if p.name == "arch")
    assert tuple(arch.type.choices) == archs.ARCH_NAMES


def test_an_arch_without_imagenet_weights_is_never_pretrained():
    assert TrainConfig(arch="tiny").pretrained is False
    assert TrainConfig(arch="resnet18").pretrained is True
    assert TrainConfig(arch="efficientnet_lite0", pretrained=False).pretrained is False
    with pytest.raises(ValueError, match="unknown architecture"):
        TrainConfig(arch="vgg")
