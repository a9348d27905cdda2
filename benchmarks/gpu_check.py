#!/usr/bin/env python
"""One GPU check for the GPU machine (an H200 with PyTorch, cuda-python, no TensorRT), in under 5 minutes.

Steps (each recorded as ok / failed / skipped with its reason in OUT/gpu_check.json, and logged to OUT/gpu_check.log):
  environment   nvidia-smi, driver and CUDA runtime versions, library versions, the GPU leukedge detects
  plumbing      per CUDA binding (cuda-python, pycuda): pinned host -> device -> device -> host round trip on a
                stream, byte-exact, with cudaMemGetInfo before and after three open/close cycles
  flavours      which TensorRT flavour can run on this GPU; if none, the exact refusal of `leukedge build-engine`
  torch         PyTorch CUDA backend FP32 / FP16 / FP16 + CUDA graphs vs ONNX Runtime on the sample cells
                (max |dp|, top-1 agreement) and throughput + p50/p99 at batch 1..256
  e2e           `leukedge infer` on the GPU backend with Rust preprocessing on all cores, vs each stage alone
  tensorrt      with a flavour that can run: the same comparison and benchmark on an engine

--dry-run (CPU, CI): every GPU step is reported as skipped with its reason; the PyTorch backend's code runs on the
CPU in FP32 (no graphs) against ONNX Runtime, so its agreement logic is exercised.

Usage: python benchmarks/gpu_check.py --out DIR [--model BUNDLE] [--images DIR] [--dry-run] [--batches 1,8,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leukedge.infer import summarize_ms  # noqa: E402

BATCHES = (1, 8, 32, 64, 128, 256)
log = logging.getLogger("gpu_check")


class Skip(Exception):
    """A step that cannot run here; its message is the reason."""


def step(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        result = fn()
        entry = {"status": "ok", "result": result}
    except Skip as exc:
        entry = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded, the other steps still run
        entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    report["steps"][name] = entry
    log.info("%-12s %s %s", name, entry["status"], entry.get("reason") or entry.get("error") or "")
    return entry.get("result")


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for pkg in ("leukedge", "numpy", "torch", "onnxruntime", "onnxruntime-gpu", "cuda-python", "cuda-bindings",
                "pycuda", "tensorrt", "tensorrt-rtx-cu12"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def environment(dry: bool) -> dict[str, Any]:
    from leukedge.engines.gpu import detect_gpu

    smi = None
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        smi = (r.stdout or r.stderr).strip()
    probe = detect_gpu()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cores(),
            "nvidia_smi": smi, "gpu": probe.gpu.to_dict() if probe.gpu else None, "gpu_status": probe.status,
            "gpu_reason": probe.reason, "versions": versions(), "dry_run": dry}


def _cores() -> int:
    from leukedge.engines.threads import usable_cores

    return usable_cores()


def plumbing(binding_name: str, dry: bool) -> dict[str, Any]:
    if dry:
        raise Skip("dry run: no GPU memory to copy through")
    from leukedge.engines.cuda_binding import get_binding
    from leukedge.engines.gpu import detect_gpu

    if detect_gpu().gpu is None:
        raise Skip(f"no usable GPU: {detect_gpu().reason}")
    try:
        first = get_binding(binding_name)
    except Exception as exc:  # noqa: BLE001 - BackendUnavailable: the binding is not installed
        raise Skip(str(exc)) from exc
    before = first.mem_get_info()
    nbytes = 64 << 20
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 256, nbytes, dtype=np.uint8)
    cycles = []
    for _ in range(3):
        b = get_binding(binding_name)
        with b.activate():
            h_in, h_out = b.host_alloc(nbytes), b.host_alloc(nbytes)
            d1, d2 = b.malloc(nbytes), b.malloc(nbytes)
            s = b.stream_create()
            e0, e1 = b.event_create(), b.event_create()
            h_in.array[:] = pattern
            h_out.array[:] = 0
            b.event_record(e0, s)
            b.htod_async(d1, h_in.array, s)
            b.dtod_async(d2, d1, nbytes, s)
            b.dtoh_async(h_out.array, d2, s)
            b.event_record(e1, s)
            b.stream_sync(s)
            exact = bool(np.array_equal(h_out.array, pattern))
            ms = b.elapsed_ms(e0, e1)
            for e in (e0, e1):
                b.event_destroy(e)
            b.stream_destroy(s)
            b.free(d1)
            b.free(d2)
            b.free_host(h_in)
            b.free_host(h_out)
        b.close()
        cycles.append({"byte_exact": exact, "round_trip_ms": ms, "gb_per_s": 3 * nbytes / ms / 1e6})
    after = first.mem_get_info()
    first.close()
    if not all(c["byte_exact"] for c in cycles):
        raise RuntimeError(f"{binding_name}: round trip not byte-exact: {cycles}")
    return {"binding": binding_name, "bytes": nbytes, "cycles": cycles, "mem_free_before": before[0],
            "mem_free_after": after[0], "mem_total": before[1], "leaked_bytes": before[0] - after[0]}


def flavours(export: Path | None, out: Path, dry: bool) -> dict[str, Any]:
    from leukedge.engines.build import BuildError, pick_flavour
    from leukedge.engines.gpu import detect_gpu
    from leukedge.engines.tensorrt_backend import available_flavours

    res: dict[str, Any] = {"installed": available_flavours()}
    if dry:
        from leukedge.engines.gpu import FAKE_GPU_ENV

        before = os.environ.get(FAKE_GPU_ENV)  # the dry-run seam of GPU detection: a faked H200
        os.environ[FAKE_GPU_ENV] = json.dumps({"name": "NVIDIA H200", "compute_capability": "9.0", "driver": "13.0",
                                               "runtime": "13.0"})
        try:
            pick_flavour("auto")
            fake = "no refusal"
        except BuildError as exc:
            fake = str(exc)
        finally:
            if before is None:
                os.environ.pop(FAKE_GPU_ENV, None)
            else:
                os.environ[FAKE_GPU_ENV] = before
        raise Skip(f"dry run: the flavour decision needs the real GPU (installed here: {res['installed'] or 'none'}); "
                   f"on a faked H200 the refusal would be: {fake}")
    if detect_gpu().gpu is None:
        raise Skip(f"no usable GPU: {detect_gpu().reason}")
    try:
        res["flavour"], res["why"] = pick_flavour("auto")
    except BuildError as exc:
        res["flavour"], res["refusal"] = None, str(exc)
    if export is not None:
        # the exact message `leukedge build-engine` prints here
        r = subprocess.run([sys.executable, "-c", "from leukedge.cli import main; main()", "build-engine", str(export), "-o",
                            str(out / "check.plan"), "--max-batch", "256", "--opt-batch", "64", "--validate"],
                           capture_output=True, text=True, timeout=240)
        res["build_engine"] = {"exit_code": r.returncode, "output": (r.stdout + r.stderr)[-4000:]}
    return res


def sample_batch(bundle: Path, images: Path | None, n: int = 64) -> tuple[np.ndarray, list[str]]:
    from leukedge.infer import native_preprocess
    from leukedge.models import load_bundle

    cfg = load_bundle(bundle).config.replace(layout="nchw", dtype="float32")
    paths = sorted(str(p) for p in images.rglob("*.bmp"))[:n] if images else []
    if not paths:
        from leukedge.synth import make_cell

        items = [make_cell(i % 2, seed=i, size=450) for i in range(n)]
        paths = [f"<synthetic {i}>" for i in range(n)]
    else:
        items = paths
    x, st = native_preprocess()(items, cfg.to_native_json(), threads=0)
    return np.ascontiguousarray(x), paths


def agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    def prob(z):
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    return {"n": int(len(ref)), "max_abs_dp": float(np.abs(prob(ref) - prob(got)).max()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean())}


def bench(backend, x: np.ndarray, batches: tuple[int, ...], budget_s: float) -> dict[str, Any]:
    out = {}
    for b in batches:
        if backend.max_batch is not None and b > backend.max_batch:
            continue
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:]))).astype(backend.input_dtype)
        backend.infer(xb)  # warm up (captures the graph for this size)
        times, t_end = [], time.perf_counter() + budget_s
        while time.perf_counter() < t_end or len(times) < 3:
            t0 = time.perf_counter()
            backend.infer(xb)
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= 200:
                break
        s = summarize_ms(times)
        out[str(b)] = {"img_per_s": b / (s["mean"] / 1e3), "p50_ms": s["p50"], "p99_ms": s["p99"], "n": s["n"]}
    return out


def torch_backends(bundle: Path, export: Path, x: np.ndarray, batches: tuple[int, ...], dry: bool) -> dict[str, Any]:
    from leukedge.engines.onnxrt import OnnxRuntimeBackend
    from leukedge.engines.torch_cuda import TorchCudaBackend

    with OnnxRuntimeBackend(export / "model_fp32.onnx", device="cpu") as ref:
        r = ref.infer(x)
    import torch

    res: dict[str, Any] = {"torch": torch.__version__}
    if dry or not torch.cuda.is_available():
        why = "dry run" if dry else "PyTorch sees no CUDA device"
        with TorchCudaBackend.from_bundle(bundle, device="cpu", precision="fp32") as b:
            res["cpu_fp32_logic_check"] = agreement(r, b.infer(x))
        if res["cpu_fp32_logic_check"]["top1_agreement"] < 1.0:
            raise RuntimeError(f"PyTorch backend (CPU FP32) disagrees with ONNX Runtime: {res}")
        raise Skip(f"{why}: CUDA FP32/FP16/graphs not run; the backend's CPU FP32 path agrees with ONNX Runtime "
                   f"(max |dp| {res['cpu_fp32_logic_check']['max_abs_dp']:.2e})")
    for label, kw in (("fp32", {"precision": "fp32", "graphs": False}), ("fp16", {"precision": "fp16", "graphs": False}),
                      ("fp16+graphs", {"precision": "fp16", "graphs": True})):
        with TorchCudaBackend.from_bundle(bundle, **kw) as b:
            got = np.concatenate([b.infer(x[i:i + 32]) for i in range(0, len(x), 32)])
            res[label] = {"agreement": agreement(r, got), "bench": bench(b, x, batches, budget_s=2.0),
                          "graphs_captured": b.graph_cache.captures}
    return res


def end_to_end(bundle: Path, images: Path | None, out: Path, dry: bool) -> dict[str, Any]:
    import torch

    if dry or not torch.cuda.is_available():
        raise Skip("dry run" if dry else "PyTorch sees no CUDA device, so there is no GPU backend to run end to end")
    from leukedge.infer import run_inference

    if images is None:
        from leukedge.synth import make_cell, write_bmp

        images = out / "cells"
        (images / "all").mkdir(parents=True, exist_ok=True)
        for i in range(512):
            write_bmp(images / "all" / f"UID_{i % 7 + 1}_{i + 1}_1_all.bmp", make_cell(i % 2, seed=i, size=450))
    res = {}
    for batch in (32, 128):
        r = run_inference(bundle, [images], out / f"e2e_b{batch}.csv", batch=batch, backend="torch", warmup=2)
        st = r.stats
        res[str(batch)] = {"backend": st["backend"], "e2e_img_s": st["throughput_img_s"],
                           "stage_img_s": st["stage_throughput_img_s"], "threads": st["threads"],
                           "e2e_over_slower_stage": st["throughput_img_s"] / min(v for v in st["stage_throughput_img_s"].values() if v)}
    return res


def tensorrt_engine(export: Path, x: np.ndarray, batches: tuple[int, ...], flav: dict | None, out: Path,
                    dry: bool) -> dict[str, Any]:
    if dry:
        raise Skip("dry run: no GPU to run an engine on")
    if not flav or not flav.get("flavour"):
        raise Skip("no TensorRT flavour can run on this GPU" + (f": {flav['refusal']}" if flav and flav.get("refusal") else ""))
    from leukedge.engines.build import build_engine
    from leukedge.engines.onnxrt import OnnxRuntimeBackend
    from leukedge.engines.tensorrt_backend import TensorRTBackend

    eng = out / "check.plan"
    if not eng.is_file():
        build_engine(export, eng, backend=flav["flavour"], opt_batch=64, max_batch=256)
    with OnnxRuntimeBackend(export / "model_fp32.onnx", device="cpu") as ref, TensorRTBackend(eng) as b:
        r = ref.infer(x)
        got = b.infer(x)
        return {"agreement": agreement(r, got), "bench": bench(b, x, batches, budget_s=2.0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--model", type=Path, default=None, help="model bundle [default: the shipped default model]")
    ap.add_argument("--images", type=Path, default=None, help="cell images [default: ../shared/data/cnmc_sample]")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--dry-run", action="store_true", help="CPU only: report every GPU step as skipped")
    a = ap.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(out / "gpu_check.log", mode="w"), logging.StreamHandler()]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    try:
        return _run(a, out)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


def _run(a: argparse.Namespace, out: Path) -> int:
    batches = tuple(int(b) for b in a.batches.split(","))
    images = a.images
    if images is None:
        cand = ROOT.parent / "shared" / "data" / "cnmc_sample"
        images = cand if cand.is_dir() else None
    from leukedge.infer import default_model_path

    bundle = a.model or default_model_path()
    t0 = time.perf_counter()
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
    step(report, "environment", lambda: environment(a.dry_run))
    for name in ("cuda-python", "pycuda"):
        step(report, f"plumbing:{name}", lambda name=name: plumbing(name, a.dry_run))
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=out))
    export = None

    def do_export() -> dict[str, Any]:
        nonlocal export
        from leukedge.export import export_bundle

        export = work / "export"
        export_bundle(bundle, export, fp16=True, check=False)
        return {"export": str(export)}

    step(report, "export", do_export)
    flav = step(report, "flavours", lambda: flavours(export, work, a.dry_run))
    x, paths = sample_batch(bundle, images)
    report["sample"] = {"n": len(paths), "from": str(images) if images else "synthetic"}
    if export is not None:
        step(report, "torch", lambda: torch_backends(bundle, export, x, batches, a.dry_run))
        step(report, "tensorrt", lambda: tensorrt_engine(export, x, batches, flav, work, a.dry_run))
    step(report, "e2e", lambda: end_to_end(bundle, images, work, a.dry_run))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["failed"] = [k for k, v in report["steps"].items() if v["status"] == "failed"]
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    shutil.rmtree(work / "export", ignore_errors=True)
    log.info("done in %.1f s: %d ok, %d skipped, %d failed -> %s", report["seconds"],
             sum(v["status"] == "ok" for v in report["steps"].values()),
             sum(v["status"] == "skipped" for v in report["steps"].values()), len(report["failed"]), out / "gpu_check.json")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
