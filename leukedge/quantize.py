"""INT8 export: a Q/DQ ONNX graph calibrated on real cells, and its check against the FP32 graph.

``leukedge export BUNDLE -o OUT --int8 --calibrate CACHE`` quantises ``OUT/model_fp32.onnx`` with
``onnxruntime.quantization.quantize_static`` into two QDQ graphs (QuantizeLinear/DequantizeLinear pairs),
both with INT8 weights per output channel and ranges calibrated on cells of the dataset cache CACHE:
``model_int8.onnx`` for ONNX Runtime (UINT8 activations with a zero point: U8S8, its fast x86 format) and
``model_int8_trt.onnx`` for TensorRT (symmetric INT8 activations, zero point 0, float biases: what
TensorRT's explicit quantization accepts). Those cells were
preprocessed by the Rust core; the cache's pixel hash must equal the bundle's (a cache prepared
differently is refused), and its uint8 pixels are normalised exactly as the core does
(:func:`leukedge.config.normalize_uint8`). After quantisation every INT8 convolution's float bias is corrected
so that its mean output on the calibration cells equals FP32's (:func:`correct_biases`). The classifier head (the
last Gemm) and the test-time
computation after it (TTA averaging, the threshold's logit shift) stay FP32, inside the same graph.

The cache's subjects are split (seeded): calibration uses cells of some subjects, the check uses the
held-out subjects' cells, plus the real sample cells and synthetic cells. The check compares INT8 with
the FP32 graph (both on ONNX Runtime): the distribution of ``|dP(all)|``, class flips (borderline ones,
where FP32's P(all) lies within :data:`INT8_BORDERLINE` of 0.5, counted apart), and weighted F1 of both
on the held-out cells. :data:`INT8_TOL` is the bound; past it the INT8 graph is written but marked
failed in ``export.json``, and inference refuses to pick it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._util import softmax
from .formats.export import set_onnx_meta

# The bound an INT8 graph must meet against FP32 on every cell checked (real sample, synthetic, held-out).
INT8_TOL = {
    "p95_abs_prob": 0.05,  # 95 % of the cells move by at most 0.05 in P(all)
    "nonborderline_flips": 0,  # no class flips on cells FP32 puts further than INT8_BORDERLINE from 0.5
    "f1_drop": 0.01,  # weighted F1 (held-out subjects of the calibration cache) at most 0.01 below FP32 (1/n on n < 100 cells)
}
INT8_BORDERLINE = 0.1
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
#: ``--int8-fp32-convs auto``: the FP32 prefixes tried, fewest leading convolutions first (graph order), until the
#: graph passes :data:`INT8_TOL`. For EfficientNet-Lite, 3 = the stem and block 0, then 3 convolutions per block.
INT8_FP32_LADDER = (0, 3, 6, 9, 12, 15, 24)


@dataclass
class CalibrationSplit:
    """Row indices of the cache used to calibrate and to check, and their subjects."""

    calibrate: np.ndarray
    heldout: np.ndarray
    calibrate_subjects: list[str]
    heldout_subjects: list[str]


def split_by_subject(subjects: list[str | None], labels: np.ndarray, ok: np.ndarray, *, heldout_fraction: float = 0.3,
                     max_calibrate: int = 256, max_heldout: int = 1024, seed: int = 0) -> CalibrationSplit:
    """Hold out about ``heldout_fraction`` of the subjects (at least one of each class where a class has two or
    more subjects), calibrate on cells of the others; both capped (evenly strided after a seeded shuffle)."""
    rng = np.random.default_rng(seed)
    subj = np.array([s if s is not None else f"?{i}" for i, s in enumerate(subjects)], dtype=object)
    usable = ok & np.isin(labels, (0, 1))
    held: set[str] = set()
    for cls in (0, 1):
        names = sorted({str(s) for s in subj[usable & (labels == cls)]})
        if len(names) >= 2:
            k = max(1, round(len(names) * heldout_fraction))
            held.update(str(s) for s in rng.permutation(np.array(names, dtype=object))[:k])
    if not held:
        raise ValueError("the calibration cache needs labelled cells of at least two subjects of one class "
                         "to hold some out for the check")
    is_held = np.array([str(s) in held for s in subj])
    cal = np.flatnonzero(usable & ~is_held)
    hold = np.flatnonzero(usable & is_held)
    if len(cal) == 0:
        raise ValueError("no calibration cells left after holding out subjects")
    cal = np.sort(rng.permutation(cal)[:max_calibrate])
    hold = np.sort(rng.permutation(hold)[:max_heldout])
    return CalibrationSplit(cal, hold, sorted({str(s) for s in subj[cal]}), sorted(held))


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over an array of inputs, in batches."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 16) -> None:
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        out = {self.name: self.x[self.i:self.i + self.batch]}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return (len(self.x) + self.batch - 1) // self.batch


def head_nodes(model: Any) -> list[str]:
    """Names of the last Gemm/MatMul node (the classifier) and of every node after it in graph order (the
    test-time computation): kept FP32."""
    nodes = list(model.graph.node)
    last = max((i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul")), default=None)
    if last is None:
        return []
    for i, n in enumerate(nodes):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    return [n.name for n in nodes[last:]]


def conv_count(model: Any) -> int:
    return sum(n.op_type == "Conv" for n in model.graph.node)


def prefix_nodes(model: Any, n_convs: int) -> list[str]:
    """Names of every node up to and including the ``n_convs``-th Conv in graph order: kept FP32 (the first,
    high-resolution layers, where one per-tensor activation range serves channels of very different scales:
    the default model's stem weights differ in scale per channel by more than 10x)."""
    if n_convs <= 0:
        return []
    nodes = list(model.graph.node)
    for i, n in enumerate(nodes):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    seen = 0
    for i, n in enumerate(nodes):
        seen += n.op_type == "Conv"
        if seen == n_convs:
            return [m.name for m in nodes[: i + 1]]
    raise ValueError(f"the graph has {seen} convolutions: cannot keep the first {n_convs} in FP32")


def quantize_int8(fp32_path: Path, out_path: Path, calib: np.ndarray, *, method: str = "minmax",
                  props: dict[str, str] | None = None, symmetric: bool = True, fp32_convs: int = 0,
                  fp32_nodes: Callable[[Any], list[str]] | None = None, bias_correction: bool = True) -> dict[str, Any]:
    """Write the Q/DQ INT8 graph of ``fp32_path`` to ``out_path``, calibrated on ``calib`` (float32 NCHW);
    returns what was done (for ``export.json``). ``fp32_convs``: the first convolutions (graph order), and every
    node before the last of them, stay FP32 (:func:`prefix_nodes`). ``fp32_nodes``: given the pre-processed graph,
    names of further nodes kept FP32 (any set, not only a prefix: ``scripts/int8_sensitivity.py``).
    ``bias_correction``: :func:`correct_biases` on the calibration cells (on by default).

    ``symmetric``: INT8 activations with zero point 0, what TensorRT requires; otherwise UINT8 activations with
    a zero point (U8S8, ONNX Runtime's recommended format on x86: on the 2-core test machine 2.2x FP32 at batch 32
    where the symmetric S8S8 graph ran 0.77x, and closer to FP32 on held-out cells)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    if len(calib) == 0:
        raise ValueError("no calibration cells")
    out_path = Path(out_path)
    tmp_pre = out_path.with_name(".tmp-pre-" + out_path.name)
    tmp_q = out_path.with_name(".tmp-q-" + out_path.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32_path), str(tmp_pre), skip_symbolic_shape=False)
            pre = onnx.load(str(tmp_pre))
            keep = head_nodes(pre)
            prefix = prefix_nodes(pre, fp32_convs)
            if fp32_nodes is not None:
                prefix += [n for n in fp32_nodes(pre) if n not in set(prefix)]
            keep = prefix + [k for k in keep if k not in set(prefix)]
            onnx.save(pre, str(tmp_pre))
            name = pre.graph.input[0].name
            cal_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                          "entropy": CalibrationMethod.Entropy}[method]
            quantize_static(
                str(tmp_pre), str(tmp_q), _Reader(name, np.ascontiguousarray(calib, np.float32)),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=cal_method, nodes_to_exclude=keep,
                # biases stay float: a DequantizeLinear of an int32 bias is refused by TensorRT's ONNX parser
                # ("input has type Int32 but must have type FP8, FP4, Int4, Int8, or UInt8", TensorRT-RTX 1.x)
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": False},
            )
        m = onnx.load(str(tmp_q))
        corrected = correct_biases(onnx.load(str(fp32_path)), m, calib) if bias_correction else None
        if props:
            set_onnx_meta(m, props)
        m.producer_name = "leukedge"
        onnx.checker.check_model(m)
        from ._util import atomic_write_bytes

        atomic_write_bytes(out_path, m.SerializeToString())
    finally:
        for t in (tmp_pre, tmp_q):
            t.unlink(missing_ok=True)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
            "weights": "int8, symmetric, per output channel",
            "activations": "int8, symmetric (zero point 0)" if symmetric else "uint8, asymmetric (zero point)",
            "calibration_method": method, "calibration_cells": int(len(calib)), "fp32_convs": fp32_convs,
            "kept_fp32": keep[len(prefix):] if fp32_convs else keep, "kept_fp32_prefix_nodes": len(prefix),
            "quantize_linear_nodes": ops.get("QuantizeLinear", 0), "dequantize_linear_nodes": ops.get("DequantizeLinear", 0),
            "bias_correction": ({"convolutions": corrected, "cells": int(min(len(calib), BIAS_CORRECTION_CELLS))}
                                if corrected is not None else None)}


#: calibration cells whose mean convolution outputs :func:`correct_biases` matches
BIAS_CORRECTION_CELLS = 64


def _activation_inputs(model: Any) -> dict[str, str]:
    """``{output: input}`` of the Relu and Clip (ReLU6) nodes of ``model``: the activations the Q/DQ quantiser folds
    into the preceding convolution's output range (the convolution then writes the activation's output name)."""
    return {n.output[0]: n.input[0] for n in model.graph.node if n.op_type in ("Relu", "Clip")}


def _channel_means(model: Any, names: list[str], x: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Per-channel means over the cells of ``x`` of the tensors ``names`` of ``model`` (an ONNX ModelProto)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    sums: list[np.ndarray] = [np.zeros(0)] * len(names)
    count = [0] * len(names)
    for i in range(0, len(x), batch):
        for j, a in enumerate(sess.run(names, {feed: x[i:i + batch]})):
            a = a.astype(np.float64).reshape(a.shape[0], a.shape[1], -1)
            sums[j] = a.sum(axis=(0, 2)) + (sums[j] if count[j] else 0.0)
            count[j] += a.shape[0] * a.shape[2]
    return [s / c for s, c in zip(sums, count)]


def correct_biases(fp32: Any, qdq: Any, calib: np.ndarray) -> int:
    """Empirical bias correction of the Q/DQ graph ``qdq`` (an ONNX ModelProto, changed in place) against ``fp32``:
    quantisation shifts the mean of a convolution's output (its weights' rounding errors times the mean input), and
    the shift adds up through the network. For every INT8 convolution in graph order (weights from a
    DequantizeLinear, float bias), with the earlier corrections in place, its float bias is moved by the difference
    of its per-channel mean output from FP32's over the first :data:`BIAS_CORRECTION_CELLS` calibration cells
    (the empirical bias correction of Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
    Bias Correction", section 4.2). The means compared are of the convolution's own output, before its activation
    (where the quantiser folded a ReLU6 into the output's range, FP32's tensor is that activation's input), so the
    bias moves them exactly. Returns how many convolutions moved.

    On the default model (ONNX Runtime U8S8) it takes the whole graph's p95 |dP(all)| from 0.37 to 0.12, and an FP32
    prefix of 3 convolutions passes the bound (0.044) where 12 were needed; TensorRT's S8S8 graph passes with 12
    instead of 24."""
    from onnx import numpy_helper

    x = np.ascontiguousarray(calib[:BIAS_CORRECTION_CELLS], np.float32)
    init = {i.name: i for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    pre_act = _activation_inputs(fp32)
    fp32_tensors = {o for n in fp32.graph.node for o in n.output}
    convs = [n for n in qdq.graph.node if n.op_type == "Conv" and len(n.input) == 3 and n.input[2] in init
             and getattr(producer.get(n.input[1]), "op_type", "") == "DequantizeLinear" and n.output[0] in fp32_tensors]
    if not convs or not len(x):
        return 0
    ref = dict(zip((n.output[0] for n in convs),
                   _channel_means(fp32, [pre_act.get(n.output[0], n.output[0]) for n in convs], x)))
    for n in convs:
        got = _channel_means(qdq, [n.output[0]], x)[0]
        b = init[n.input[2]]
        fixed = numpy_helper.to_array(b).astype(np.float64) - (got - ref[n.output[0]])
        b.CopyFrom(numpy_helper.from_array(fixed.astype(numpy_helper.to_array(b).dtype), b.name))
    return len(convs)


def prob_shift(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """|dP(all)| distribution and class flips of ``got`` logits against ``ref`` (both ``(N, 2)``)."""
    pr = softmax(np.asarray(ref, np.float64))[:, -1]
    pg = softmax(np.asarray(got, np.float64))[:, -1]
    d = np.abs(pr - pg)
    flip = (pr >= 0.5) != (pg >= 0.5)
    border = np.abs(pr - 0.5) <= INT8_BORDERLINE
    q = (lambda v: float(np.quantile(d, v))) if len(d) else (lambda v: 0.0)
    return {
        "n": int(len(d)),
        "abs_prob": {"mean": float(d.mean()) if len(d) else 0.0, "p50": q(0.5), "p90": q(0.9), "p95": q(0.95),
                     "p99": q(0.99), "max": float(d.max()) if len(d) else 0.0},
        "flips": int(flip.sum()),
        "borderline_flips": int((flip & border).sum()),
        "nonborderline_flips": int((flip & ~border).sum()),
    }


def weighted_f1(labels: np.ndarray, logits: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, np.asarray(logits).argmax(1), average="weighted", zero_division=0))


def check_int8(fp32_path: Path, int8_path: Path, inputs: list[tuple[str, np.ndarray]],
               heldout: tuple[np.ndarray, np.ndarray] | None) -> tuple[dict[str, Any], bool]:
    """Compare the INT8 graph with the FP32 graph on ONNX Runtime (CPU) on ``inputs`` (``[(source, x)]``) and the
    held-out cells ``(x, labels)``; returns the report and whether :data:`INT8_TOL` holds."""
    from .engines.onnxrt import OnnxRuntimeBackend

    fp32 = OnnxRuntimeBackend(fp32_path, device="cpu")
    int8 = OnnxRuntimeBackend(int8_path, device="cpu")

    def both(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.concatenate([fp32.infer(x[i:i + 64]) for i in range(0, len(x), 64)])
        b = np.concatenate([int8.infer(x[i:i + 64]) for i in range(0, len(x), 64)])
        return a, b

    by_source: dict[str, Any] = {}
    refs, gots = [], []
    for name, x in list(inputs) + ([("heldout", heldout[0])] if heldout is not None and len(heldout[0]) else []):
        a, b = both(x)
        by_source[name] = prob_shift(a, b)
        refs.append(a)
        gots.append(b)
        if name == "heldout" and heldout is not None:
            f32, f8 = weighted_f1(heldout[1], a), weighted_f1(heldout[1], b)
            by_source[name].update({"weighted_f1_fp32": f32, "weighted_f1_int8": f8, "f1_drop": f32 - f8})
    allm = prob_shift(np.concatenate(refs), np.concatenate(gots)) if refs else prob_shift(np.zeros((0, 2)), np.zeros((0, 2)))
    f1_drop = by_source.get("heldout", {}).get("f1_drop")
    fails = []
    if allm["abs_prob"]["p95"] > INT8_TOL["p95_abs_prob"]:
        fails.append(f"p95 |dP(all)| {allm['abs_prob']['p95']:.3f} > {INT8_TOL['p95_abs_prob']}")
    if allm["nonborderline_flips"] > INT8_TOL["nonborderline_flips"]:
        fails.append(f"{allm['nonborderline_flips']} class flip(s) of cells further than {INT8_BORDERLINE} from 0.5")
    # one changed cell moves weighted F1 by about 1/n: on fewer than 100 held-out cells the bound is one cell's worth
    n_held = by_source.get("heldout", {}).get("n", 0)
    f1_bound = max(INT8_TOL["f1_drop"], 1.0 / n_held) if n_held else INT8_TOL["f1_drop"]
    if f1_drop is not None and f1_drop > f1_bound + 1e-12:
        fails.append(f"weighted F1 {f1_drop:.3f} below FP32 on {n_held} held-out cells (> {f1_bound:.3f})")
    allm["pass"] = not fails
    report = {"reference": fp32_path.name, "onnx": int8_path.name, "tolerance": INT8_TOL, "borderline": INT8_BORDERLINE,
              "all": allm, "by_source": by_source, "failures": fails}
    fp32.close()
    int8.close()
    return report, not fails


def quantize_checked(fp32_path: Path, out_path: Path, calib: np.ndarray, inputs: list[tuple[str, np.ndarray]],
                     heldout: tuple[np.ndarray, np.ndarray] | None, *, fp32_convs: int | str = "auto", method: str = "minmax",
                     props: dict[str, str] | None = None, symmetric: bool = False, start: int = 0,
                     progress: Any = None) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Quantise ``fp32_path`` and check it against FP32 (:func:`check_int8`); returns ``(info, report, passed)``.

    ``fp32_convs="auto"``: mixed precision found by search, as Polygraphy's ``debug precision`` does for TensorRT
    layers: the prefixes of :data:`INT8_FP32_LADDER` are tried, fewest FP32 convolutions first, and the first graph
    within :data:`INT8_TOL` is kept (if none passes, the last one tried is written and marked failed).
    ``start``: the search begins at that prefix. ``info["search"]`` lists every try. An integer keeps exactly that
    many. ``progress(str)`` hears each try."""
    import onnx

    if fp32_convs == "auto":
        n = conv_count(onnx.load(str(fp32_path), load_external_data=False))
        ladder = [k for k in INT8_FP32_LADDER if start <= k < n] or [start]
    else:
        ladder = [int(fp32_convs)]
    tries: list[dict[str, Any]] = []
    for k in ladder:
        info = quantize_int8(fp32_path, out_path, calib, method=method, props=props, symmetric=symmetric, fp32_convs=k)
        report, ok = check_int8(fp32_path, out_path, inputs, heldout)
        held = report["by_source"].get("heldout", {})
        tries.append({"fp32_convs": k, "p95_abs_prob": report["all"]["abs_prob"]["p95"],
                      "nonborderline_flips": report["all"]["nonborderline_flips"], "f1_drop": held.get("f1_drop"),
                      "passed": ok})
        if progress is not None:
            progress(f"INT8 {'S8S8' if symmetric else 'U8S8'}, first {k} convolutions FP32: "
                     f"p95 |dP(all)| {tries[-1]['p95_abs_prob']:.3f}, {tries[-1]['nonborderline_flips']} non-borderline "
                     f"flip(s): {'passed' if ok else 'failed'}")
        if ok:
            break
    info["search"] = tries
    report["fp32_convs"] = info["fp32_convs"]
    return info, report, ok


def calibration_data(cache_path: str | os.PathLike, config: Any, *, max_calibrate: int = 256, max_heldout: int = 1024,
                     seed: int = 0) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    """Calibration inputs, held-out ``(inputs, labels)`` and a description, from the cache at ``cache_path``
    (refused unless its pixel hash equals ``config``'s)."""
    from .config import normalize_uint8
    from .formats.cache import load_cache

    cache = load_cache(cache_path)
    config.require_same_pixels(cache.config, what="model", against=f"calibration cache {cache.path}")
    ok = np.array([r["status"] == "ok" for r in cache.manifest])
    split = split_by_subject(cache.subjects, cache.labels, ok, max_calibrate=max_calibrate, max_heldout=max_heldout,
                             seed=seed)
    cfg = config.replace(layout="nchw", dtype="float32")
    xc = normalize_uint8(np.asarray(cache.images[split.calibrate]), cfg)
    xh = normalize_uint8(np.asarray(cache.images[split.heldout]), cfg) if len(split.heldout) else np.zeros((0, 3, cfg.size, cfg.size), np.float32)
    desc = {"cache": str(Path(cache.path).resolve()), "pixel_hash": cache.pixel_hash, "synthetic": cache.synthetic,
            "calibration_cells": int(len(split.calibrate)), "calibration_subjects": split.calibrate_subjects,
            "heldout_cells": int(len(split.heldout)), "heldout_subjects": split.heldout_subjects, "seed": seed}
    return xc, (xh, cache.labels[split.heldout]), desc
