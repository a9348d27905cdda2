"""Test-time augmentation and the decision threshold travel inside the model and its ONNX graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from leukedge.config import PreprocessConfig, StainConfig, normalize_uint8  # noqa: E402
from leukedge.export import export_model  # noqa: E402
from leukedge.models import TestTimeModel, TinyCNN, dihedral_views, load_bundle, logit_bias, save_bundle  # noqa: E402

CFG = PreprocessConfig(stain=StainConfig(method="none"), size=48)


def _cells(n: int = 6, seed: int = 0) -> np.ndarray:
    from conftest import make_cell

    return np.stack([make_cell(48, seed=seed + i) for i in range(n)])


def _prob(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e[:, 1] / e.sum(1)


def test_views_are_the_eight_symmetries():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = dihedral_views(x, "d4")
    assert len(views) == 8 and len({v.numpy().tobytes() for v in views}) == 8
    expected = [torch.rot90(x.flip(-1) if m else x, k, (-2, -1)) for m in (0, 1) for k in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(views, expected))
    assert [v.shape for v in dihedral_views(x, "flip")] == [x.shape] * 2


@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_tta_model_is_invariant_and_onnx_matches_pytorch(tmp_path, tta, sample_cells_or_synth):
    torch.manual_seed(0)
    model = TestTimeModel(TinyCNN(width=8).eval(), tta, threshold=0.35).eval()
    x = sample_cells_or_synth
    xf = torch.from_numpy(normalize_uint8(x, CFG))
    with torch.inference_mode():
        ref = model(xf).numpy()
        mirrored = model(xf.flip(-1)).numpy()
        rotated = model(torch.rot90(xf, 1, (-2, -1))).numpy()
    np.testing.assert_allclose(_prob(mirrored), _prob(ref), atol=1e-5)
    if tta == "d4":
        np.testing.assert_allclose(_prob(rotated), _prob(ref), atol=1e-5)
    # the threshold is a shift of the `all` logit: p' >= 0.5 exactly when p >= 0.35
    with torch.inference_mode():
        raw = TestTimeModel(model.members[0], tta).eval()(xf).numpy()
    np.testing.assert_allclose(ref[:, 1] - raw[:, 1], logit_bias(0.35), atol=1e-5)
    res = export_model(model, CFG, tmp_path / "exp", check=False)
    for name, tol in (("model_fp32.onnx", 1e-4), ("model_fp16.onnx", 0.03)):
        sess = ort.InferenceSession(str(tmp_path / "exp" / name), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        dtype = np.float16 if "float16" in inp.type else np.float32
        got = sess.run(None, {inp.name: xf.numpy().astype(dtype)})[0].astype(np.float32)
        assert np.abs(_prob(got) - _prob(ref)).max() < tol, name
    assert res is not None


@pytest.fixture(params=["synthetic", "sample"])
def sample_cells_or_synth(request) -> np.ndarray:
    if request.param == "synthetic":
        return _cells()
    from conftest import sample_cell_paths

    paths = sample_cell_paths()
    if not paths:
        pytest.skip("real C-NMC sample not present")
    from leukedge._native import preprocess_batch

    x, status = preprocess_batch([str(p) for p in paths[:8]], CFG.replace(layout="nhwc", dtype="uint8").to_json())
    assert all(s["ok"] for s in status)
    return np.asarray(x)


def test_tta_bundle_round_trip_and_backends_agree(tmp_path):
    from leukedge.engines import get_backend

    torch.manual_seed(1)
    model = TestTimeModel(TinyCNN(width=8).eval(), "d4", threshold=0.6).eval()
    save_bundle(tmp_path / "b", model, arch="tiny", arch_kwargs={"width": 8}, config=CFG, half=True)
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["test_time"] == {"members": 1, "tta": "d4", "views": 8, "threshold": 0.6}
    b = load_bundle(tmp_path / "b")
    assert isinstance(b.model, TestTimeModel) and b.model.tta == "d4"
    export_model(b.model, b.config, tmp_path / "b" / "export", meta=b.meta, check=False)
    x = normalize_uint8(_cells(4, seed=9), CFG)
    with get_backend("torch", tmp_path / "b", device="cpu") as tb, get_backend("onnxruntime", tmp_path / "b",
                                                                                device="cpu", precision="fp32") as ob:
        np.testing.assert_allclose(_prob(ob.infer(x)), _prob(tb.infer(x)), atol=1e-4)


def test_ensemble_members_round_trip(tmp_path):
    torch.manual_seed(2)
    members = [TinyCNN(width=8).eval() for _ in range(3)]
    model = TestTimeModel(members, "flip").eval()
    save_bundle(tmp_path / "e", model, arch="tiny", arch_kwargs={"width": 8}, config=CFG)
    b = load_bundle(tmp_path / "e")
    x = torch.from_numpy(normalize_uint8(_cells(3), CFG))
    with torch.inference_mode():
        np.testing.assert_allclose(b.model(x).numpy(), model(x).numpy(), atol=1e-6)
        mean_p = np.mean([_prob(TestTimeModel(m, "flip")(x).numpy()) for m in members], axis=0)
    np.testing.assert_allclose(_prob(b.model(x).detach().numpy()), mean_p, atol=1e-5)
