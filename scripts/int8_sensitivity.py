#!/usr/bin/env python
"""Which convolutions carry a model's INT8 error, and whether INT8 islands inside an FP32 prefix pay (the
measurement behind the default model card's INT8 section).

Starting from an FP32 prefix of the first BASE convolutions (``leukedge export --int8-fp32-convs BASE``), each
of them in turn is quantised alone (``one-out``), or a given set stays FP32 and the rest is INT8 (``--fp32``).
Every graph is ONNX Runtime's U8S8 Q/DQ graph of ``leukedge.quantize.quantize_int8``, calibrated and checked as
``leukedge export --int8 --calibrate CACHE`` does (256 calibration cells, held-out subjects' cells), and its
ONNX Runtime speed at batch 1 and 32 is measured against the BASE-prefix graph in the same process. One JSON
line per graph.

Usage::

    python scripts/int8_sensitivity.py BUNDLE CACHE one-out [--base 12]
    python scripts/int8_sensitivity.py BUNDLE CACHE set --fp32 0,1,2,4,5,6,7,8,9,10,11
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def conv_units(graph: Any) -> list[list[str]]:
    """Node names per convolution: the k-th Conv and the nodes after it up to the next Conv (its activation,
    residual Add); the nodes before the first Conv go with it."""
    nodes = list(graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    bounds = [0, *convs[1:], len(nodes)]
    return [[nodes[j].name or f"{nodes[j].op_type}_{j}" for j in range(a, b)] for a, b in zip(bounds, bounds[1:])]


def speed(path: Path, batch: int, repeats: int = 20) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = {s.get_inputs()[0].name: np.random.default_rng(0).normal(size=(batch, 3, 192, 192)).astype(np.float32)}
    for _ in range(3):
        s.run(None, x)
    t = time.perf_counter()
    for _ in range(repeats):
        s.run(None, x)
    return batch * repeats / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("cache")
    ap.add_argument("mode", choices=("one-out", "set"))
    ap.add_argument("--base", type=int, default=12, help="the FP32 prefix (first convolutions) to start from")
    ap.add_argument("--fp32", default="", help="set: comma-separated convolution indices (graph order) kept FP32")
    ap.add_argument("--no-speed", action="store_true")
    a = ap.parse_args()

    from leukedge.model import open_model
    from leukedge.quantize import calibration_data, check_int8, quantize_int8

    spec = open_model(a.bundle)
    fp32 = Path(spec.onnx_fp32)
    xc, held, _ = calibration_data(a.cache, spec.config)
    tmp = Path(tempfile.mkdtemp(prefix="int8sens-"))

    def build(keep: list[int], name: str) -> dict[str, Any]:
        out = tmp / f"{name}.onnx"
        t = time.time()
        quantize_int8(fp32, out, xc, symmetric=False,
                      fp32_nodes=lambda g: [n for k in keep for n in conv_units(g.graph)[k]])
        rep, ok = check_int8(fp32, out, [], held)
        row: dict[str, Any] = {"fp32_convs": keep, "p95_abs_prob": round(rep["all"]["abs_prob"]["p95"], 4),
                               "nonborderline_flips": rep["all"]["nonborderline_flips"],
                               "f1_drop": round(rep["by_source"]["heldout"]["f1_drop"], 4), "passed": ok,
                               "seconds": round(time.time() - t)}
        if not a.no_speed:
            row["img_s_b1"], row["img_s_b32"] = round(speed(out, 1)), round(speed(out, 32))
        print(json.dumps(row), flush=True)
        return row

    base = list(range(a.base))
    build(base, "base")
    if a.mode == "one-out":
        for k in base:
            build([u for u in base if u != k], f"minus{k}")
    else:
        build(sorted(int(v) for v in a.fp32.split(",") if v.strip()), "set")


if __name__ == "__main__":
    main()
