"""INT8 export: Q/DQ graph calibrated on a dataset cache, checked against FP32, refused past its bound."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from leukedge.artifacts import EXPORT_INT8, EXPORT_INT8_TRT  # noqa: E402
from leukedge.config import ConfigMismatchError, PreprocessConfig  # noqa: E402
from leukedge.engines import BackendUnavailable, get_backend, resolve_model  # noqa: E402
from leukedge.export import export_bundle  # noqa: E402
from leukedge.quantize import INT8_FP32_LADDER, INT8_TOL, conv_count, prefix_nodes, prob_shift, split_by_subject  # noqa: E402

SAMPLE = Path(__file__).parents[1].parent / "shared/data/cnmc_sample"
SIZE = 48


def check_cells(d: Path) -> Path:
    """The export check's cells: the real sample where present, else the generated cells of ``d / "data"``
    (eight synthetic check images alone are too few for a collapsed INT8 graph to fail its bound)."""
    return SAMPLE if SAMPLE.is_dir() else d / "data"


def make_bundle(path: Path, cache: Path) -> Path:
    """A tiny CNN whose decision depends strongly on the cell: its head reads the features' first principal
    direction (where quantisation noise is smallest relative to the signal), scaled so that the logit difference
    has a spread (SD) of about 1 over the cache's cells, centred on 0 (a constant output would hide any quantisation
    error)."""
    from leukedge.artifacts import load_cache
    from leukedge.config import normalize_uint8
    from leukedge.models import build_model, save_bundle

    torch.manual_seed(0)
    cfg = PreprocessConfig(size=SIZE)
    m = build_model("tiny", input_size=SIZE, width=8).eval()
    c = load_cache(cache)
    x = torch.from_numpy(normalize_uint8(np.asarray(c.images[c.ok_indices()]), cfg))
    feats: list[torch.Tensor] = []
    h = m.head.register_forward_hook(lambda mod, inp, out: feats.append(inp[0]))
    with torch.no_grad():
        m(x)
        h.remove()
        f = feats[0]
        w = torch.zeros_like(m.head.weight)
        w[1] = torch.linalg.svd(f - f.mean(0), full_matrices=False).Vh[0]  # the features' main direction
        w[1] *= 1.0 / float((f @ w[1]).std())
        m.head.weight.copy_(w)
        d = f @ w[1]
        m.head.bias.copy_(torch.tensor([0.0, -float(d.median()) - 1.0]))  # threshold 1 SD off the median
    return save_bundle(path, m, arch="tiny", arch_kwargs={"width": 8}, config=cfg, synthetic=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("leukedge._native")
    from leukedge.preprocess import run_preprocess
    from leukedge.synth import generate_dataset

    d = tmp_path_factory.mktemp("int8")
    generate_dataset(d / "data", subjects=8, cells_per_subject=16, seed=1, size=128)
    run_preprocess([d / "data"], d / "cache", PreprocessConfig(size=SIZE), progress=False)
    bundle = make_bundle(d / "bundle", d / "cache")
    return d, bundle, d / "cache"


@pytest.fixture(scope="module")
def exported(setup):
    d, bundle, cache = setup
    res = export_bundle(bundle, d / "export", fp16=False, sample_dir=check_cells(d), n_synth=8, calibrate=cache,
                        calibration_cells=64)
    return res


def test_int8_graph_has_qdq_nodes_and_runs(exported):
    out = exported.out_dir
    m = onnx.load(str(out / EXPORT_INT8))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 3
    # per-channel weights: some DequantizeLinear has a 1-D scale of several values
    inits = {t.name: t for t in m.graph.initializer}
    scales = [inits[n.input[1]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)
    # the TensorRT graph: symmetric INT8 activations (every zero point 0, int8), no int32 (bias) DequantizeLinear
    mt = onnx.load(str(out / EXPORT_INT8_TRT))
    it = {t.name: t for t in mt.graph.initializer}
    zps = [it[n.input[2]] for n in mt.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in it]
    assert zps and all((onnx.numpy_helper.to_array(z) == 0).all() and z.data_type == onnx.TensorProto.INT8 for z in zps)
    assert not any(it[n.input[0]].data_type == onnx.TensorProto.INT32 for n in mt.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in it)
    # the ONNX Runtime graph: UINT8 activations (U8S8)
    assert any(inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in m.graph.node
               if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits)
    props = {p.key: p.value for p in m.metadata_props}
    assert props["leukedge.precision"] == "int8"
    assert props["leukedge.preprocess_hash"] == PreprocessConfig(size=SIZE).pixel_hash()
    manifest = json.loads((out / "export.json").read_text())
    info = manifest["int8"]
    assert info["format"] == "QDQ" and info["per_channel"] and info["calibration"]["calibration_cells"] > 0
    assert set(info["calibration"]["calibration_subjects"]).isdisjoint(info["calibration"]["heldout_subjects"])
    assert manifest["files"]["int8"]["sha256"]
    rep = json.loads((out / "export_report.json").read_text())["int8"]
    assert {"real", "synthetic", "heldout"} & set(rep["by_source"])
    assert "weighted_f1_int8" in rep["by_source"]["heldout"]
    assert info["passed"] is rep["all"]["pass"] is True, rep["failures"]
    # auto mixed precision: the search stopped at the first passing prefix, the one the graph has
    assert info["search"][-1]["passed"] and all(not t["passed"] for t in info["search"][:-1])
    assert info["fp32_convs"] == info["search"][-1]["fp32_convs"] == rep["fp32_convs"]
    # the symmetric TensorRT graph is checked on its own (less exact on this random tiny model: it may be refused)
    rep_trt = json.loads((out / "export_report.json").read_text())["int8_trt"]
    assert info["tensorrt"]["passed"] is rep_trt["all"]["pass"]
    assert info["tensorrt"]["activations"].startswith("int8, symmetric")
    assert exported.passed is (rep["all"]["pass"] and rep_trt["all"]["pass"])
    b = get_backend("onnxruntime", out, device="cpu", precision="int8")
    assert b.name == "onnxruntime-cpu-int8"
    x = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    logits = b.infer(x)
    assert logits.shape == (3, 2) and np.isfinite(logits).all()
    # auto never picks INT8
    assert get_backend("onnxruntime", out, device="cpu").name == "onnxruntime-cpu-fp32"


def test_bias_correction_matches_every_int8_convolutions_mean_output_to_fp32(setup, exported, tmp_path):
    """correct_biases: after it, each INT8 convolution's per-channel mean output over the correction cells equals
    FP32's, even from a Q/DQ graph whose bias was pushed off on purpose; export records it."""
    from leukedge.artifacts import load_cache
    from leukedge.config import normalize_uint8
    from leukedge.quantize import BIAS_CORRECTION_CELLS, _activation_inputs, _channel_means, correct_biases, quantize_int8

    _, _, cache = setup
    c = load_cache(cache)
    x = normalize_uint8(np.asarray(c.images[c.ok_indices()]), PreprocessConfig(size=SIZE))[:BIAS_CORRECTION_CELLS]
    fp32_path = exported.out_dir / "model_fp32.onnx"
    info = quantize_int8(fp32_path, tmp_path / "q.onnx", x, symmetric=False, bias_correction=False)
    assert info["bias_correction"] is None
    fp32, q = onnx.load(str(fp32_path)), onnx.load(str(tmp_path / "q.onnx"))
    init = {i.name: i for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type == "Conv" and len(n.input) == 3 and n.input[2] in init
             and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert convs
    b = init[convs[0].input[2]]
    b.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(b) + np.float32(0.5), b.name))
    names, pre_act = [n.output[0] for n in convs], _activation_inputs(fp32)
    ref = _channel_means(fp32, [pre_act.get(n, n) for n in names], x)  # each convolution's output before its ReLU
    off = _channel_means(q, names, x)
    assert max(float(np.abs(a - r).max()) for a, r in zip(off, ref)) > 0.1  # the pushed bias shows
    assert correct_biases(fp32, q, x) == len(convs)
    fixed = _channel_means(q, names, x)
    for a, r in zip(fixed, ref):
        assert np.abs(a - r).max() <= 1e-4 * max(1.0, float(np.abs(r).max())), (a, r)
    manifest = json.loads((exported.out_dir / "export.json").read_text())
    assert manifest["int8"]["bias_correction"]["convolutions"] >= 1


def test_constant_calibration_fails_the_bound_and_is_not_used(setup, tmp_path):
    d, bundle, cache = setup
    broken = tmp_path / "constant_cache"
    shutil.copytree(cache, broken)
    imgs = np.load(broken / "images.npy", mmap_mode="r+")
    imgs[:] = 128  # every calibration cell the same grey image: activation ranges collapse
    imgs.flush()
    del imgs
    res = export_bundle(bundle, tmp_path / "export", fp16=False, sample_dir=check_cells(d), n_synth=8,
                        calibrate=broken,
                        calibration_cells=64)
    assert not res.passed
    rep = res.report["int8"]
    assert rep["failures"] and not rep["all"]["pass"]
    # the auto search tried every FP32 prefix of the ladder the tiny graph has, fewest first, and none passed
    search = json.loads((tmp_path / "export" / "export.json").read_text())["int8"]["search"]
    n_conv = conv_count(onnx.load(str(tmp_path / "export" / "model_fp32.onnx")))
    assert [t["fp32_convs"] for t in search] == [k for k in INT8_FP32_LADDER if k < n_conv]
    assert len(search) >= 2 and not any(t["passed"] for t in search)
    assert json.loads((tmp_path / "export" / "export.json").read_text())["int8"]["passed"] is False
    assert resolve_model(tmp_path / "export").onnx_int8 is None
    with pytest.raises(BackendUnavailable, match="INT8"):
        get_backend("onnxruntime", tmp_path / "export", device="cpu", precision="int8")
    from leukedge.engines.build import BuildError, resolve_onnx

    with pytest.raises(BuildError, match="did not pass"):
        resolve_onnx(tmp_path / "export", int8=True)


def test_fp32_prefix_keeps_the_first_convolutions_unquantised(setup, exported, tmp_path):
    """--int8-fp32-convs N: the first N Conv nodes read float weights (no DequantizeLinear on them), the rest INT8."""
    d, bundle, cache = setup
    fp32 = onnx.load(str(exported.out_dir / "model_fp32.onnx"))
    n_conv = conv_count(fp32)
    assert n_conv >= 3
    names = prefix_nodes(fp32, 2)
    assert [n.op_type for n in fp32.graph.node if n.name in names].count("Conv") == 2
    assert names[-1] == [n.name for n in fp32.graph.node if n.op_type == "Conv"][1]
    with pytest.raises(ValueError, match="convolutions"):
        prefix_nodes(fp32, n_conv + 1)
    res = export_bundle(bundle, tmp_path / "export", fp16=False, sample_dir=check_cells(d), n_synth=8, calibrate=cache,
                        calibration_cells=64, int8_fp32_convs=2)
    m = onnx.load(str(tmp_path / "export" / EXPORT_INT8))
    deq = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert [c.input[1] in deq for c in convs] == [False] * 2 + [True] * (n_conv - 2)
    info = json.loads((tmp_path / "export" / "export.json").read_text())["int8"]
    assert info["fp32_convs"] == info["tensorrt"]["fp32_convs"] == 2 and len(info["search"]) == 1
    assert res.report["int8"]["fp32_convs"] == 2


def test_cli_int8_fp32_convs_is_auto_or_a_count(setup, tmp_path):
    from click.testing import CliRunner

    from leukedge.cli.export import export_cmd

    _, bundle, cache = setup
    r = CliRunner().invoke(export_cmd, [str(bundle), "-o", str(tmp_path / "e"), "--int8", "--calibrate", str(cache),
                                        "--int8-fp32-convs", "some"])
    assert r.exit_code == 2 and "auto or a number" in r.output


def test_cache_with_other_pixels_is_refused(setup, tmp_path):
    d, bundle, _ = setup
    from leukedge.preprocess import run_preprocess

    run_preprocess([d / "data"], tmp_path / "cache40", PreprocessConfig(size=40), progress=False)
    with pytest.raises(ConfigMismatchError):
        export_bundle(bundle, tmp_path / "export", fp16=False, check=False, calibrate=tmp_path / "cache40")


def test_cli_needs_both_flags(setup, tmp_path):
    from click.testing import CliRunner

    from leukedge.cli.export import export_cmd

    _, bundle, _ = setup
    r = CliRunner().invoke(export_cmd, [str(bundle), "-o", str(tmp_path / "e"), "--int8"])
    assert r.exit_code == 2 and "--calibrate" in r.output


def test_split_by_subject_is_subject_disjoint():
    subjects = [f"{s}" for s in ("1", "2", "3", "H1", "H2") for _ in range(6)]
    labels = np.array([0 if s.startswith("H") else 1 for s in subjects])
    ok = np.ones(len(subjects), bool)
    ok[0] = False
    sp = split_by_subject(subjects, labels, ok, heldout_fraction=0.3, seed=0)
    assert set(sp.calibrate_subjects).isdisjoint(sp.heldout_subjects)
    assert 0 not in sp.calibrate and 0 not in sp.heldout
    held_labels = {int(labels[i]) for i in sp.heldout}
    assert held_labels == {0, 1}  # one subject of each class held out
    with pytest.raises(ValueError):
        split_by_subject(["a"] * 4, np.array([1, 1, 0, 0]), np.ones(4, bool))


def test_prob_shift_counts_borderline_flips_apart():
    ref = np.log(np.array([[0.45, 0.55], [0.9, 0.1], [0.2, 0.8]]))
    got = np.log(np.array([[0.55, 0.45], [0.3, 0.7], [0.2, 0.8]]))
    m = prob_shift(ref, got)
    assert (m["flips"], m["borderline_flips"], m["nonborderline_flips"]) == (2, 1, 1)
    assert m["abs_prob"]["max"] == pytest.approx(0.6)
    assert INT8_TOL["nonborderline_flips"] == 0


def test_build_engine_int8_with_tensorrt_rtx(exported, tmp_path):
    """TensorRT-RTX builds ahead of time without a GPU: it accepts the Q/DQ graph (explicit quantization, strongly
    typed; float biases, since its parser refuses an int32 DequantizeLinear)."""
    pytest.importorskip("tensorrt_rtx")
    from leukedge.engines.build import build_engine

    out = exported.out_dir
    # the export folder (needs the TensorRT graph to have passed its check), else the file named explicitly
    passed = json.loads((out / "export.json").read_text())["int8"]["tensorrt"]["passed"]
    src = out if passed else out / EXPORT_INT8_TRT
    info = build_engine(src, tmp_path / "int8.plan", backend="tensorrt-rtx", min_batch=1, opt_batch=4,
                        max_batch=8, int8=passed)
    assert info["precision"] == "int8" and info["strongly_typed"]
    assert info["onnx"]["graph_precision"] == "int8" and Path(info["onnx"]["path"]).name == EXPORT_INT8_TRT
    assert (tmp_path / "int8.plan").stat().st_size > 0
