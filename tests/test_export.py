"""ONNX export (FP32 + strongly typed FP16) agrees with PyTorch; preprocessing travels with the export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")

from leukedge.cli.export import export_cmd  # noqa: E402
from leukedge.config import PreprocessConfig  # noqa: E402
from leukedge.export import FP16_TOL, FP32_TOL, compare_logits, export_bundle, passes  # noqa: E402

SAMPLE = Path(__file__).parents[1].parent / "shared/data/cnmc_sample"
SIZE = 48


def make_bundle(path: Path, size: int = SIZE, seed: int = 0) -> Path:
    """A tiny CNN with spread-out logits (random BN statistics, scaled head) saved as a bundle."""
    from leukedge.models import build_model, save_bundle

    torch.manual_seed(seed)
    m = build_model("tiny", input_size=size, width=8)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
        m.head.weight.mul_(20.0)
    cfg = PreprocessConfig(size=size)
    return save_bundle(path, m.eval(), arch="tiny", arch_kwargs={"width": 8}, config=cfg, synthetic=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    bundle = make_bundle(d / "bundle")
    res = export_bundle(bundle, d / "export", fp16=True, io_dtype="float16", sample_dir=SAMPLE, n_synth=12)
    return bundle, res


def test_files_and_metadata(exported):
    bundle, res = exported
    out = res.out_dir
    for name in ("model_fp32.onnx", "model_fp16.onnx", "preprocess.json", "export.json", "export_report.json"):
        assert (out / name).is_file(), name
    cfg = PreprocessConfig.load(out / "preprocess.json")
    meta = json.loads((bundle / "bundle.json").read_text())
    assert cfg.pixel_hash() == meta["preprocess_hash"]
    for name, dt in (("model_fp32.onnx", onnx.TensorProto.FLOAT), ("model_fp16.onnx", onnx.TensorProto.FLOAT16)):
        m = onnx.load(str(out / name))
        props = {p.key: p.value for p in m.metadata_props}
        assert props["leukedge.preprocess_hash"] == cfg.pixel_hash()
        assert PreprocessConfig.from_json(props["leukedge.preprocess"]) == cfg
        (inp,), (outp,) = m.graph.input, m.graph.output
        assert (inp.name, outp.name) == ("input", "logits")
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
        assert outp.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert inp.type.tensor_type.elem_type == dt
    # FP16 graph is really FP16: no FP32 weights left
    m16 = onnx.load(str(out / "model_fp16.onnx"))
    assert all(t.data_type != onnx.TensorProto.FLOAT for t in m16.graph.initializer)


def test_agreement_report(exported):
    _, res = exported
    rep = json.loads((res.out_dir / "export_report.json").read_text())
    assert res.passed
    r32, r16 = rep["results"]["fp32"]["all"], rep["results"]["fp16"]["all"]
    assert r32["max_abs_logit"] <= FP32_TOL["max_abs_logit"] and r32["top1_agreement"] == 1.0
    assert r16["max_abs_prob"] <= FP16_TOL["max_abs_prob"] and r16["flips"] == r16["borderline_flips"]
    assert r32["n"] >= 8
    if SAMPLE.is_dir() and "random" not in rep["inputs"]:
        assert rep["inputs"].get("real", 0) >= 40  # the 52 real sample cells


def test_dynamic_batch_against_torch(exported):
    """Independent check: batch sizes 1, 3, 17 through ORT FP32/FP16 vs PyTorch."""
    import onnxruntime as ort

    from leukedge.models import load_bundle

    bundle, res = exported
    model = load_bundle(bundle).model
    rng = np.random.default_rng(1)
    s32 = ort.InferenceSession(str(res.files["fp32"]), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(str(res.files["fp16"]), providers=["CPUExecutionProvider"])
    for n in (1, 3, 17):
        x = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        y32 = s32.run(None, {"input": x})[0]
        y16 = s16.run(None, {"input": x.astype(np.float16)})[0]
        assert y32.shape == (n, 2) and y16.shape == (n, 2) and y16.dtype == np.float16
        np.testing.assert_allclose(y32, ref, atol=1e-4, rtol=1e-4)
        m = compare_logits(ref, y16)
        assert m["max_abs_prob"] <= FP16_TOL["max_abs_prob"]


def test_fp32_io_variant_and_cli(tmp_path):
    from click.testing import CliRunner

    bundle = make_bundle(tmp_path / "b", seed=3)
    r = CliRunner().invoke(export_cmd, [str(bundle), "-o", str(tmp_path / "e"), "--io-dtype", "float32",
                                        "--synthetic", "4", "--samples", str(tmp_path / "none")])
    assert r.exit_code == 0, r.output
    m16 = onnx.load(str(tmp_path / "e" / "model_fp16.onnx"))
    assert m16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m16.graph.initializer)
    assert "top-1" in r.output


def test_compare_logits_detects_disagreement():
    ref = np.array([[0.0, 1.0], [1.0, 0.0]])
    m = compare_logits(ref, ref[:, ::-1])
    assert m["top1_agreement"] == 0.0 and m["max_abs_logit"] == 1.0
    assert m["flips"] == 2 and m["borderline_flips"] == 0
    assert not passes(m, FP16_TOL)


def test_fp16_tolerance_allows_only_borderline_flips():
    """A class flip of a cell at P(all) ~ 0.5 within the probability bound passes; a decisive cell whose
    probability moves by more than the bound fails, flip or no flip."""
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    ref = np.array([[0.0, logit(0.51)], [0.0, logit(0.9)], [0.0, logit(0.1)]])
    near = np.array([[0.0, logit(0.49)], [0.0, logit(0.89)], [0.0, logit(0.1)]])
    m = compare_logits(ref, near)
    assert m["flips"] == 1 and m["borderline_flips"] == 1 and passes(m, FP16_TOL)
    far = np.array([[0.0, logit(0.51)], [0.0, logit(0.8)], [0.0, logit(0.1)]])
    m = compare_logits(ref, far)
    assert m["flips"] == 0 and not passes(m, FP16_TOL)
