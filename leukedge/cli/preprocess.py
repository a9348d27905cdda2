"""`leukedge preprocess`: options, summary table and progress of the dataset cache build."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..artifacts import load_config_source
from ..config import (
    CROP_MODES,
    FILTERS,
    SQUARE_MODES,
    STAIN_METHODS,
    PreprocessConfig,
    StainConfig,
)
from ..data import SPLIT_STRATEGIES
from ..preprocess import PreprocessSummary, fit_stain_reference, run_preprocess
from ._console import RichReporter


def print_summary(summary: PreprocessSummary, console: Any) -> None:
    if summary.synthetic:
        console.print("[bold magenta]SYNTHETIC DATA[/] in this cache (generated cells, not real ones)")
    t = Table(title=f"Dataset cache {summary.out_dir}")
    t.add_column("")
    t.add_column("images", justify="right")
    t.add_row("total", str(summary.n_total))
    t.add_row("[green]ok[/]", str(summary.n_ok))
    t.add_row("[red]failed[/]" if summary.n_failed else "failed", str(summary.n_failed))
    t.add_row("reused from the previous run", str(summary.n_reused))
    if summary.n_resumed:
        t.add_row("resumed from an interrupted run", str(summary.n_resumed))
    t.add_row("computed", str(summary.n_computed))
    t.add_row("stain fallbacks (too little foreground / fit failed)", str(summary.n_stain_fallback))
    for cls, c in sorted(summary.per_class.items()):
        t.add_row(f"class {cls}", f"{c['ok']} ok" + (f", {c['failed']} failed" if c["failed"] else ""))
    for sp, n in sorted(summary.splits.items()):
        t.add_row(f"split {sp}", str(n))
    console.print(t)
    console.print(f"pixel hash {summary.pixel_hash[:12]}, {summary.elapsed_s:.1f} s")
    if summary.failures:
        # Plain lines, never wrapped, so a path can be copied (and grepped) whole.
        console.print(f"[red]{len(summary.failures)} file(s) failed:[/]")
        for p, e in summary.failures[:200]:
            console.print(f"  {p}: {e}", markup=False, highlight=False, soft_wrap=True)
        if len(summary.failures) > 200:
            console.print(f"  ... and {len(summary.failures) - 200} more (status=error in manifest.csv)")


#: `leukedge preprocess` without --stain: the shipped model's setting (the library's PreprocessConfig keeps macenko,
#: whose pixel hash existing caches and bundles carry)
DEFAULT_STAIN = "none"

_PIXEL_OPTIONS = ("stain", "stain_io", "stain_alpha", "stain_beta", "black_threshold", "white_threshold", "min_foreground",
                  "stain_reference", "crop", "crop_margin", "crop_window", "square", "size", "filter", "mean", "std")


def _config_from_options(base: PreprocessConfig, o: dict[str, Any]) -> PreprocessConfig:
    stain = dataclasses.asdict(base.stain)
    for opt, key in (("stain", "method"), ("stain_io", "io"), ("stain_alpha", "alpha"), ("stain_beta", "beta"),
                     ("black_threshold", "black_threshold"), ("white_threshold", "white_threshold"),
                     ("min_foreground", "min_foreground")):
        if o.get(opt) is not None:
            stain[key] = o[opt]
    changes: dict[str, Any] = {"stain": StainConfig(**stain)}
    for opt in ("crop", "crop_margin", "crop_window", "square", "size", "filter", "max_pixels"):
        if o.get(opt) is not None:
            changes[opt] = o[opt]
    for opt in ("mean", "std"):
        if o.get(opt):
            changes[opt] = tuple(o[opt])
    return base.replace(**changes)


@click.command("preprocess")
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Output cache folder.")
@click.option("--config", "config_file", type=click.Path(exists=True),
              help="Use exactly this preprocessing: a config.json, a bundle.json / model bundle folder (its "
                   "\"preprocess\" settings) or a dataset cache folder. Cannot be combined with pixel options.")
@click.option("--stain", type=click.Choice(STAIN_METHODS),
              help=f"Stain normalisation [default: {DEFAULT_STAIN}: what the shipped model uses, since C-NMC images are "
                   "already stain-normalised; macenko or reinhard for images from other sources].")
@click.option("--stain-reference", multiple=True, metavar="PATH", help="Fit stain parameters on these images (folders, files, globs; repeatable).")
@click.option("--stain-io", type=float, help="Transmitted light intensity Io [default: 240].")
@click.option("--stain-alpha", type=float, help="Macenko angle percentile alpha [default: 1].")
@click.option("--stain-beta", type=float, help="Macenko optical-density threshold beta [default: 0.15].")
@click.option("--black-threshold", type=click.IntRange(0, 254), help="Background if max(R,G,B) <= this [default: 10].")
@click.option("--white-threshold", type=click.IntRange(1, 255), help="Also background if min(R,G,B) >= this [default: off].")
@click.option("--min-foreground", type=click.IntRange(0), help="Fewer foreground pixels -> stain fallback [default: 500].")
@click.option("--crop", type=click.Choice(CROP_MODES),
              help="bbox: crop to the cell's bounding box (the cell fills the frame, its size is lost); window: a fixed "
                   "--crop-window square of source pixels centred on the cell (size kept); none: the whole frame [default: bbox].")
@click.option("--crop-margin", type=click.IntRange(0), help="Margin around the bounding box in px (--crop bbox) [default: 8].")
@click.option("--crop-window", type=click.IntRange(8, 4096), help="Side of the native-scale window in source px (--crop window) [default: 384].")
@click.option("--square", type=click.Choice(SQUARE_MODES), help="Make non-square images square by padding or centre crop [default: pad].")
@click.option("--size", type=click.IntRange(8, 4096), help="Output width and height [default: 224].")
@click.option("--filter", "filter_", type=click.Choice(FILTERS), help="Resize filter [default: bilinear].")
@click.option("--mean", type=float, nargs=3, help="Normalisation mean R G B (stored for training) [default: ImageNet].")
@click.option("--std", type=float, nargs=3, help="Normalisation std R G B [default: ImageNet].")
@click.option("--max-pixels", type=click.IntRange(1), help="Refuse images with more pixels [default: 64000000].")
@click.option("--split-by", type=click.Choice(SPLIT_STRATEGIES), default="auto", show_default=True,
              help="auto: official folds when there are several, else by subject. image: image-level (leaks patients!).")
@click.option("--val-fold", type=int, help="Official fold used for validation with --split-by fold/auto [default: the last].")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.2, show_default=True,
              help="Share of subjects in validation with --split-by subject.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subject split.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="Worker threads (0 = all cores).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per native call.")
@click.option("--allow-errors", is_flag=True, help="Exit 0 even if some files failed (they are zero rows with status=error).")
@click.option("--no-reuse", is_flag=True, help="Recompute everything instead of reusing rows of an existing cache in OUT.")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="Also write the summary as JSON.")
@click.pass_context
def preprocess_cmd(ctx: click.Context, sources: tuple[str, ...], out: str, config_file: str | None, **opts: Any) -> None:
    """Decode, stain-normalise and resize images from SOURCES into a dataset cache OUT.

    SOURCES are folders (Kaggle / original C-NMC / generic <class>/ layouts), files, globs or list
    files. OUT gets images.npy (uint8 NHWC), manifest.csv, config.json and cache.json. Re-running
    into the same OUT reuses rows whose file and settings are unchanged.
    """
    opts["filter"] = opts.pop("filter_")
    console = Console()
    given = [k for k in _PIXEL_OPTIONS if ctx.get_parameter_source(k if k != "filter" else "filter_") == click.core.ParameterSource.COMMANDLINE]
    try:
        if config_file:
            if given:
                names = ", ".join("--" + k.replace("_", "-") for k in given)
                raise click.UsageError(f"{names} cannot be combined with --config {config_file}: the config is used exactly")
            cfg = load_config_source(config_file)
            if opts.get("max_pixels"):
                cfg = cfg.replace(max_pixels=opts["max_pixels"])
        else:
            cfg = _config_from_options(PreprocessConfig(stain=StainConfig(method=DEFAULT_STAIN)), opts)
            if opts.get("stain_reference"):
                cfg = fit_stain_reference(list(opts["stain_reference"]), cfg)
                console.print(f"Fitted {cfg.stain.method} stain parameters on the reference images: {json.dumps(cfg.stain.params)}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = run_preprocess(
                list(sources), out, cfg, threads=opts["threads"], batch_size=opts["batch_size"], split_by=opts["split_by"],
                val_fold=opts["val_fold"], val_fraction=opts["val_fraction"], seed=opts["seed"], reuse=not opts["no_reuse"],
                reporter=RichReporter(Console(stderr=True)),
            )
        for w in caught:
            console.print(f"[bold yellow]warning:[/] {w.message}")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # a full or read-only output disk
        raise click.ClickException(f"cannot write the cache in {out}: {exc.strerror or exc}"
                                   + (f" ({exc.filename})" if exc.filename else "")) from exc
    print_summary(summary, console)
    if opts.get("summary_json"):
        Path(opts["summary_json"]).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    if summary.n_failed and not opts["allow_errors"]:
        console.print(f"[red]{summary.n_failed} file(s) failed[/] (the cache was written with them as zero rows, "
                      "status=error); pass --allow-errors to accept this.")
        ctx.exit(1)


