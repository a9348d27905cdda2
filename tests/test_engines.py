"""Backends, TensorRT-RTX ahead-of-time engine builds (real, no GPU needed) and sidecar checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import fake_gpu  # noqa: E402

from leukedge.config import ConfigMismatchError, PreprocessConfig  # noqa: E402
from leukedge.engines import BackendUnavailable, EngineMismatchError, get_backend, resolve_model  # noqa: E402
from leukedge.engines.gpu import GpuInfo  # noqa: E402
from leukedge.engines.sidecar import (  # noqa: E402
    check_compatible,
    check_preprocess,
    read_sidecar,
    rebuild_command,
    sidecar_path,
    write_sidecar,
)
from leukedge.engines.tensorrt_backend import gpu_info  # noqa: E402

SIZE = 48
HAS_GPU = gpu_info() is not None


def _rtx():
    try:
        import tensorrt_rtx  # noqa: F401

        return True, ""
    except Exception as exc:  # noqa: BLE001
        return False, f"tensorrt_rtx not importable: {exc}"


RTX_OK, RTX_WHY = _rtx()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    import sys

    from leukedge.export import export_bundle

    sys.path.insert(0, str(Path(__file__).parent))  # works with any pytest import mode
    from test_export import make_bundle

    d = tmp_path_factory.mktemp("eng")
    bundle = make_bundle(d / "bundle", size=SIZE)
    export_bundle(bundle, d / "export", fp16=True, io_dtype="float16", check=False)
    return bundle, d / "export"


@pytest.fixture(scope="module")
def rtx_engine(export_dir):
    if not RTX_OK:
        pytest.skip(RTX_WHY)
    from leukedge.engines.build import build_engine

    _, exp = export_dir
    eng = exp / "model.plan"
    info = build_engine(exp, eng, backend="tensorrt-rtx", min_batch=1, opt_batch=8, max_batch=32,
                        workspace_mib=256)
    return eng, info


@pytest.mark.skipif(not RTX_OK, reason=RTX_WHY or "tensorrt_rtx unavailable")
def test_rtx_aot_build_real(rtx_engine, export_dir):
    import tensorrt_rtx as trt

    eng, info = rtx_engine
    data = eng.read_bytes()
    assert len(data) > 10_000 and info["engine_size"] == len(data)
    side = json.loads(sidecar_path(eng).read_text())
    assert side["flavour"] == "tensorrt-rtx" and side["trt_version"] == trt.__version__
    assert side["precision"] == "fp16" and "strongly typed" in side["precision_source"]
    assert side["inputs"] == [{"name": "input", "dtype": "float16", "shape": [-1, 3, SIZE, SIZE]}]
    assert side["outputs"][0]["name"] == "logits" and side["outputs"][0]["dtype"] == "float16"
    assert side["profile"]["min"] == 1 and side["profile"]["opt"] == 8 and side["profile"]["max"] == 32
    cfg = PreprocessConfig.load(export_dir[1] / "preprocess.json")
    assert side["preprocess_hash"] == cfg.pixel_hash()
    import hashlib

    assert side["onnx"]["sha256"] == hashlib.sha256((export_dir[1] / "model_fp16.onnx").read_bytes()).hexdigest()
    assert side["engine_sha256"] == hashlib.sha256(data).hexdigest()
    if not HAS_GPU:
        assert side["built_on"]["mode"] == "AOT, no GPU"
    # The plan is a real TensorRT-RTX engine: the runtime accepts its header.
    rt = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    assert rt.engine_header_size > 0 and len(data) > rt.engine_header_size


@pytest.mark.skipif(not RTX_OK, reason=RTX_WHY or "tensorrt_rtx unavailable")
def test_rtx_target_cc_and_cli(export_dir, tmp_path):
    from leukedge.cli.build_engine import build_engine_cmd

    _, exp = export_dir
    out = tmp_path / "sm89.plan"
    r = CliRunner().invoke(build_engine_cmd, [str(exp), "-o", str(out), "--backend", "tensorrt-rtx", "--target-cc", "8.9",
                                              "--max-batch", "16", "--opt-batch", "4", "--validate"])
    assert r.exit_code == 0, r.output
    side = read_sidecar(out)
    assert side["target_compute_capabilities"] == ["8.9"]
    assert "float16" in r.output and "16x3x48x48" in r.output
    if not HAS_GPU:
        assert "validation skipped" in r.output and "no GPU" in r.output
    # a CC mismatch at load time says how to rebuild
    with pytest.raises(EngineMismatchError, match=r"leukedge build-engine .* --target-cc 8\.6"):
        check_compatible(side, out, flavour="tensorrt-rtx", trt_version=side["trt_version"], compute_capability="8.6")
    check_compatible(side, out, flavour="tensorrt-rtx", trt_version=side["trt_version"], compute_capability="8.9")


def test_bad_profile_rejected(export_dir, tmp_path):
    from leukedge.engines.build import BuildError, build_engine

    with pytest.raises(BuildError, match="min-batch"):
        build_engine(export_dir[1], tmp_path / "x.plan", min_batch=8, opt_batch=4, max_batch=16)


def _fake_sidecar(tmp_path: Path, cfg: PreprocessConfig, **over) -> Path:
    eng = tmp_path / "fake.plan"
    eng.write_bytes(b"not an engine")
    info = {
        "flavour": "tensorrt", "trt_version": "10.3.0", "built_on": {"gpu": "NVIDIA L4", "compute_capability": "8.9"},
        "target_compute_capabilities": ["8.9"], "hardware_compat": None, "precision": "fp16",
        "inputs": [{"name": "input", "dtype": "float16", "shape": [-1, 3, cfg.size, cfg.size]}],
        "outputs": [{"name": "logits", "dtype": "float16", "shape": [-1, 2]}],
        "profile": {"input": "input", "min": 1, "opt": 8, "max": 32, "chw": [3, cfg.size, cfg.size]},
        "onnx": {"path": str(tmp_path / "gone" / "model_fp16.onnx"), "source": "/exports/tiny"},
        "preprocess": cfg.to_dict(), "preprocess_hash": cfg.pixel_hash(),
    }
    info.update(over)
    write_sidecar(eng, info)
    return eng


def test_sidecar_version_mismatch(tmp_path):
    eng = _fake_sidecar(tmp_path, PreprocessConfig(size=SIZE))
    info = read_sidecar(eng)
    with pytest.raises(EngineMismatchError) as ei:
        check_compatible(info, eng, flavour="tensorrt", trt_version="10.4.1", compute_capability="8.9")
    msg = str(ei.value)
    assert "10.3.0" in msg and "10.4.1" in msg
    assert "leukedge build-engine /exports/tiny -o" in msg and "--max-batch 32" in msg
    with pytest.raises(EngineMismatchError, match="tensorrt-rtx"):
        check_compatible(info, eng, flavour="tensorrt-rtx", trt_version="1.7.1.116", compute_capability="8.9")
    check_compatible(info, eng, flavour="tensorrt", trt_version="10.3.0", compute_capability="8.9")


def test_sidecar_compute_capability_mismatch(tmp_path):
    eng = _fake_sidecar(tmp_path, PreprocessConfig(size=SIZE))
    info = read_sidecar(eng)
    with pytest.raises(EngineMismatchError, match=r"compute capability 8\.9 .* this GPU is 9\.0.*leukedge build-engine"):
        check_compatible(info, eng, flavour="tensorrt", trt_version="10.3.0", compute_capability="9.0")
    # hardware-compatible (Ampere+) engines run on any CC >= 8.0
    info["hardware_compat"] = "ampere_plus"
    check_compatible(info, eng, flavour="tensorrt", trt_version="10.3.0", compute_capability="9.0")
    with pytest.raises(EngineMismatchError):
        check_compatible(info, eng, flavour="tensorrt", trt_version="10.3.0", compute_capability="7.5")
    # TensorRT-RTX on a GPU it cannot target: points to standard TensorRT
    info.update(flavour="tensorrt-rtx", trt_version="1.7", target_compute_capabilities=[])
    with pytest.raises(EngineMismatchError, match="--backend tensorrt "):
        check_compatible(info, eng, flavour="tensorrt-rtx", trt_version="1.7", compute_capability="9.0")


def test_sidecar_preprocess_mismatch(tmp_path, export_dir):
    bundle, exp = export_dir
    other = PreprocessConfig(size=SIZE).replace(crop_margin=3)
    eng = _fake_sidecar(tmp_path, other)
    info = read_sidecar(eng)
    with pytest.raises(ConfigMismatchError, match="crop_margin"):
        check_preprocess(info, eng, PreprocessConfig.load(exp / "preprocess.json"), "export")
    from leukedge.infer import Predictor

    with pytest.raises(ConfigMismatchError, match="rebuild"):
        Predictor(bundle, engine=eng, backend="onnxruntime")
    # an edited sidecar (hash no longer matches its own config) is refused as well
    info["preprocess_hash"] = "0" * 64
    write_sidecar(eng, info)
    with pytest.raises(EngineMismatchError, match="edited"):
        resolve_model(eng)
    assert "leukedge build-engine" in rebuild_command(info, eng)


def test_missing_sidecar(tmp_path):
    eng = tmp_path / "lonely.plan"
    eng.write_bytes(b"x")
    with pytest.raises(EngineMismatchError, match="no sidecar"):
        read_sidecar(eng)


def test_backend_selection_and_agreement(export_dir):
    bundle, exp = export_dir
    x = np.random.default_rng(0).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32)
    outs = {}
    for kind, model in (("torch", bundle), ("onnxruntime", exp)):
        with get_backend(kind, model, device="cpu") as b:
            y = b.infer(x)
            assert y.shape == (5, 2) and y.dtype == np.float32
            outs[kind] = y
            assert b.reason
    np.testing.assert_allclose(outs["onnxruntime"], outs["torch"], atol=1e-4)
    with get_backend("onnxruntime", exp, device="cpu", precision="fp16") as b16:
        assert b16.input_dtype == "float16"
        assert (b16.infer(x).argmax(1) == outs["torch"].argmax(1)).all()
    # auto on a bundle without export -> PyTorch; on an export -> ONNX Runtime (no engine here, or no GPU)
    with get_backend("auto", bundle, device="cpu") as b:
        assert b.name.startswith("torch")
    with get_backend("auto", exp, device="cpu") as b:  # device cpu never tries the engine, on any GPU
        assert b.name.startswith("onnxruntime") and "onnx" in b.reason.lower()
    with get_backend("torch", exp, device="cpu") as b:  # the export records its bundle
        np.testing.assert_allclose(b.infer(x), outs["torch"], atol=1e-6)
    with pytest.raises(BackendUnavailable, match="not a model bundle"):
        get_backend("torch", exp / "model_fp32.onnx")
    with pytest.raises(ValueError, match="NCHW"):
        get_backend("onnxruntime", exp).infer(x[:, 0])


FAKE_GPUS = {
    "none": None,
    "rtx4090": GpuInfo("NVIDIA GeForce RTX 4090", "8.9", driver="12.8", runtime="12.8"),
    "h200": GpuInfo("NVIDIA H200", "9.0", driver="13.0", runtime="13.0"),
    "orin": GpuInfo("Orin (nvgpu)", "8.7", driver="12.6", runtime="12.6"),
    "old-driver": GpuInfo("NVIDIA GeForce RTX 3060", "8.6", driver="12.2", runtime="13.0"),
}


@pytest.mark.skipif(not RTX_OK, reason=RTX_WHY or "tensorrt_rtx unavailable")
@pytest.mark.parametrize("fake", list(FAKE_GPUS))
def test_auto_falls_back_when_the_engine_cannot_run(rtx_engine, export_dir, fake):
    # on this GPU-less machine even the "RTX 4090" cannot execute the engine: TensorRT-RTX's own validity
    # check refuses it, which is the path a real mismatched GPU takes too
    eng, _ = rtx_engine
    with fake_gpu(FAKE_GPUS[fake]):
        with get_backend("auto", eng) as b:
            assert b.name.startswith("onnxruntime")
            assert "not usable" in b.reason
            if fake in ("none", "old-driver"):
                assert "GPU" in b.reason or "driver" in b.reason
        expected = BackendUnavailable if fake in ("none", "old-driver") else EngineMismatchError
        with pytest.raises(expected):
            get_backend("tensorrt-rtx", eng)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU (none found)")
def test_tensorrt_runtime_matches_onnxruntime(export_dir, tmp_path):
    from leukedge.engines.build import BuildError, build_engine, pick_flavour

    _, exp = export_dir
    try:
        flavour, _ = pick_flavour("auto")
    except BuildError as exc:  # e.g. an H200 without standard TensorRT: the refusal is the expected result
        assert gpu_info()["name"] in str(exc)
        pytest.skip(f"no TensorRT flavour can run on this GPU: {exc}")
    eng = tmp_path / "gpu.plan"
    build_engine(exp, eng, backend=flavour, min_batch=1, opt_batch=8, max_batch=32)
    x = np.random.default_rng(0).standard_normal((13, 3, SIZE, SIZE)).astype(np.float32)
    with get_backend("onnxruntime", exp, device="cpu", precision="fp32") as ref, get_backend(flavour, eng) as b:
        y, t = b.infer_timed(x)
        r = ref.infer(x)
        assert t.compute_ms is not None and t.h2d_ms is not None and t.d2h_ms is not None
        assert (y.argmax(1) == r.argmax(1)).mean() >= 0.9
        assert np.abs(y - r).max() < 0.1 * max(1.0, np.abs(r).max())


def test_auto_without_onnxruntime_or_torch_is_one_clear_error(monkeypatch):
    """A base install (neither leukedge[infer] nor [train]): `infer` with the shipped model says what to install
    instead of a ModuleNotFoundError traceback from the PyTorch fallback (seen from a wheel in a fresh venv)."""
    import sys


    for mod in ("onnxruntime", "torch", "leukedge.engines.onnxrt", "leukedge.engines.torch_backend"):
        monkeypatch.setitem(sys.modules, mod, None)  # import of it raises ImportError
    with pytest.raises(BackendUnavailable, match=r"leukedge\[infer\]") as info:
        get_backend("auto", None, device="cpu")
    assert "PyTorch not installed" in str(info.value) and "onnxruntime unavailable" in str(info.value)
    with pytest.raises(BackendUnavailable, match="PyTorch is not installed"):
        get_backend("torch", None, device="cpu")
