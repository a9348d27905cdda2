"""`leukedge build-engine`: the command and the engine summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..engines.base import BackendUnavailable
from ..engines.build import RTX_CC_NAMES, BuildError, build_engine, validate_engine
from ..engines.sidecar import RTX_DEFAULT_TARGETS_DOC
from ..engines.tensorrt_backend import FLAVOURS
from ..formats.sidecar import sidecar_path
from ._console import RichReporter


def print_summary(info: dict[str, Any], engine_path: Path, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"{engine_path.name} — {info['flavour']} {info['trt_version']}")
    for c in ("tensor", "mode", "dtype", "shape", "profile min / opt / max"):
        t.add_column(c)
    prof = info["profile"]
    for mode, lst in (("input", info["inputs"]), ("output", info["outputs"])):
        for x in lst:
            shp = "x".join("batch" if d < 0 else str(d) for d in x["shape"])
            p = ""
            if x["name"] == prof["input"]:
                chw = "x".join(map(str, prof["chw"]))
                p = f"{prof['min']}x{chw} / {prof['opt']}x{chw} / {prof['max']}x{chw}"
            t.add_row(x["name"], mode, x["dtype"], shp, p)
    console.print(t)
    b = info["built_on"]
    target = ", ".join(info["target_compute_capabilities"]) or RTX_DEFAULT_TARGETS_DOC
    rows = [
        ("engine", f"{engine_path} ({info['engine_size'] / 1024:.0f} KiB)"),
        ("sidecar", str(sidecar_path(engine_path))),
        ("built on", f"{b['gpu']} (CC {b['compute_capability']})" if b.get("gpu") else b["mode"]),
        ("target CC", target),
        ("precision", f"{info['precision']} ({info['precision_source']})"),
        ("build time", f"{info['build_seconds']:.2f} s (total {info['total_seconds']:.2f} s)"),
        ("ONNX", f"{info['onnx']['path']} sha256 {info['onnx']['sha256'][:12]}"),
        ("preprocess hash", info["preprocess_hash"][:16]),
    ]
    for k, v in rows:
        console.print(f"  [bold]{k:<16}[/] {v}")
    console.print(f"  [bold]{'runs on':<16}[/] {runs_on(info)}", soft_wrap=True)
    for n in info.get("notes", []):
        console.print(f"  [yellow]note[/] {n}")


#: where each GPU family gets its engine (said after every build and on a refused --target-cc)
JETSON_NOTE = ("Jetson Orin (CC 8.7) and Hopper (CC 9.0, e.g. H100/H200) are not TensorRT-RTX targets: there, build "
               "with standard TensorRT on the device itself (`leukedge build-engine EXPORT_DIR -o model.plan --backend "
               "tensorrt`); on a Jetson TensorRT comes with JetPack (JetPack 6: TensorRT 10.3, JetPack 5: 8.5; "
               "`sudo apt install nvidia-jetpack`), not from pip.")


def _check_target_cc(values: tuple[str, ...]) -> tuple[str, ...]:
    for v in values:
        if v not in RTX_CC_NAMES:
            raise click.BadParameter(f"{v!r} is not a TensorRT-RTX target (it builds for "
                                     f"{', '.join(sorted(RTX_CC_NAMES))}). {JETSON_NOTE}", param_hint="--target-cc")
    return values


def runs_on(info: dict[str, Any]) -> str:
    """Which GPUs the engine will and will not run on, in words."""
    if str(info.get("flavour", "")).startswith("tensorrt-rtx"):
        target = ", ".join(info.get("target_compute_capabilities") or []) or RTX_DEFAULT_TARGETS_DOC
        return (f"runs on RTX / desktop GPUs of compute capability {target} with TensorRT-RTX "
                f"{info.get('trt_version', '')}; NOT on Jetson Orin (8.7) or Hopper (9.0). {JETSON_NOTE}")
    b = info.get("built_on") or {}
    gpu = f"{b['gpu']} (CC {b['compute_capability']})" if b.get("gpu") else "the GPU it was built on"
    hc = " and other Ampere+ GPUs (hardware-compatible)" if info.get("hardware_compat") else ""
    return (f"runs only on {gpu}{hc} with TensorRT {info.get('trt_version', '')}: engines are specific to the GPU and "
            "the TensorRT version; rebuild on each target")


@click.command("build-engine")
@click.argument("onnx_src", metavar="ONNX_OR_EXPORT_DIR", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", "engine", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Engine file to write (e.g. export/model.plan); the sidecar goes to ENGINE.json.")
@click.option("--backend", type=click.Choice(["auto", *FLAVOURS]), default="auto", show_default=True,
              help="auto: tensorrt when a GPU is present, else tensorrt-rtx (ahead of time, no GPU needed).")
@click.option("--min-batch", type=click.IntRange(1), default=1, show_default=True, help="Optimisation profile: smallest batch.")
@click.option("--opt-batch", type=click.IntRange(1), default=32, show_default=True,
              help="Optimisation profile: batch the kernels are tuned for (use `leukedge infer --batch`).")
@click.option("--max-batch", type=click.IntRange(1), default=64, show_default=True, help="Optimisation profile: largest batch.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Timing cache file to load (if present) and update (standard TensorRT).")
@click.option("--workspace", "workspace_mib", type=click.IntRange(16), default=1024, show_default=True,
              help="Builder workspace limit in MiB.")
@click.option("--hardware-compat", is_flag=True, help="Standard TensorRT: build an Ampere+ hardware-compatible engine.")
@click.option("--target-cc", multiple=True, callback=lambda ctx, param, value: _check_target_cc(value), metavar="CC",
              help=f"TensorRT-RTX: compute capability to build for (repeatable; {', '.join(sorted(RTX_CC_NAMES))}) "
                   "[default: portable Ampere+ set]. Not 8.7 (Jetson Orin) or 9.0 (Hopper): build those with standard "
                   "TensorRT on the device.")
@click.option("--int8", is_flag=True,
              help="Build from the export's symmetric INT8 Q/DQ graph (model_int8_trt.onnx, only if it passed its export check): "
                   "explicit quantization, accepted by TensorRT >= 8 (strongly typed from 10) and TensorRT-RTX.")
@click.option("--validate", is_flag=True, help="Compare engine outputs with ONNX Runtime on sample cells (needs a GPU).")
@click.option("--verbose", is_flag=True, help="Verbose TensorRT log.")
def build_engine_cmd(onnx_src: Path, engine: Path, backend: str, min_batch: int, opt_batch: int, max_batch: int,
                     timing_cache: Path | None, workspace_mib: int, hardware_compat: bool, target_cc: tuple[str, ...],
                     int8: bool, validate: bool, verbose: bool) -> None:
    """Compile ONNX_OR_EXPORT_DIR (an export directory uses its FP16 graph) into a TensorRT engine."""
    from rich.console import Console

    console = Console()
    try:
        info = build_engine(onnx_src, engine, backend=backend, min_batch=min_batch, opt_batch=opt_batch,
                            max_batch=max_batch, timing_cache=timing_cache, workspace_mib=workspace_mib,
                            hardware_compat=hardware_compat, target_cc=target_cc, verbose=verbose,
                            reporter=RichReporter(), int8=int8)
    except (BuildError, BackendUnavailable, ValueError) as exc:
        hint = ""
        if backend == "tensorrt" and isinstance(exc, BackendUnavailable | BuildError) and "tensorrt" in str(exc).lower():
            hint = (" Standard TensorRT is not a pip install: on a Jetson it comes with JetPack (the SDK: JetPack 6 = "
                    "TensorRT 10.3, `sudo apt install nvidia-jetpack`); on a desktop GPU install NVIDIA's TensorRT for "
                    "your CUDA version. Without it, --backend tensorrt-rtx builds ahead of time for RTX / desktop GPUs.")
        raise click.ClickException(str(exc) + hint) from exc
    print_summary(info, engine, console)
    if validate:
        try:
            res = validate_engine(engine, onnx_src)
        except (BuildError, BackendUnavailable, ValueError, RuntimeError) as exc:
            raise click.ClickException(f"engine written, but validation failed: {exc}") from exc
        if "skipped" in res:
            console.print(f"[yellow]validation skipped[/]: {res['skipped']}")
        else:
            from rich.table import Table

            t = Table(title=f"engine vs {res['reference']}")
            for c in ("cells", "n", "max abs diff", "max rel diff", "max |Δp(all)|", "top-1 agree"):
                t.add_column(c)
            for name, m in [*res["by_source"].items(), ("all", res["all"])]:
                t.add_row(name, str(m["n"]), f"{m['max_abs_logit']:.3e}", f"{m['max_rel_logit']:.3e}",
                          f"{m['max_abs_prob']:.3e}", f"{m['top1_agreement']:.1%}")
            console.print(t)
            rep = engine.with_name(engine.name + ".validation.json")
            rep.write_text(json.dumps(res, indent=2) + "\n")
            if not res["all"]["pass"]:
                raise click.ClickException(f"engine disagrees with ONNX Runtime beyond tolerance {res['tolerance']} (see {rep})")
            console.print(f"[green]validation passed[/] ({rep})")


