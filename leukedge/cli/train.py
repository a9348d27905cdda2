"""`leukedge train`: recipe and run options (shared with `leukedge cv`) and the train command."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from .. import training
from .._util import DEVICE_CHOICES
from ..archs import ARCH_NAMES, PretrainedWeightsUnavailable
from ..config import ConfigMismatchError
from ..training import AUGMENT_MODES, SELECT_CHOICES, TTA_CHOICES, TrainConfig, load_recipe
from ..training import default_of as _d
from ._console import RichReporter

_RECIPE_OPTIONS = [
    click.option("--recipe", "recipe_file", metavar="NAME|FILE", default=None,
                 help="A shipped recipe by name (`default`: the shipped model's recipe) or a TOML file of train "
                      "options; options given on the command line win."),
    click.option("--arch", type=click.Choice(ARCH_NAMES),
                 default=_d("arch"), show_default=True,
                 help="tiny: a small CNN that trains in minutes on a CPU (demo, tests); efficientnet_lite0: ReLU6, ImageNet "
                      "weights included; resnet18, mobilenetv3_small_100, efficientnet_b0: timm models (their ImageNet "
                      "weights need the Hugging Face hub)."),
    click.option("--epochs", type=click.IntRange(1, 10_000), default=_d("epochs"), show_default=True),
    click.option("--batch-size", type=click.IntRange(2, 4096), default=_d("batch_size"), show_default=True),
    click.option("--lr", type=click.FloatRange(0, min_open=True), default=_d("lr"), show_default=True, help="Peak AdamW learning rate."),
    click.option("--weight-decay", type=click.FloatRange(0), default=_d("weight_decay"), show_default=True),
    click.option("--warmup-epochs", type=click.FloatRange(0), default=_d("warmup_epochs"), show_default=True,
                 help="Linear warm-up before the cosine decay."),
    click.option("--label-smoothing", type=click.FloatRange(0, 0.5), default=_d("label_smoothing"), show_default=True),
    click.option("--mixup", type=click.FloatRange(0, 10), default=_d("mixup"), show_default=True,
                 help="mixup alpha: mix each batch with a shuffled copy of itself, weight ~ Beta(alpha, alpha), and mix "
                      "the loss alike (0 = off). With a cached frozen prefix the prefix's outputs are mixed."),
    click.option("--noise", type=click.FloatRange(0, 64), default=_d("noise"), show_default=True,
                 help="Gaussian noise on the cell's pixels of every training input, sigma ~ U(0, NOISE) grey levels "
                      "(0 = off). With the feature cache the noisy views are cached once (a second cache).",),
    click.option("--seed", type=int, default=_d("seed"), show_default=True, help="Seeds the split, initialisation, shuffling and augmentation."),
    click.option("--pretrained/--no-pretrained", default=_d("pretrained"), show_default=True,
                 help="Start from ImageNet weights (efficientnet_lite0's ship with a pip package; timm's need the HF hub)."),
    click.option("--patience", type=click.IntRange(0), default=_d("patience"), show_default=True,
                 help="Stop after this many epochs without a better validation weighted F1 (0 = never; ignored with --select last)."),
    click.option("--augment", type=click.Choice(AUGMENT_MODES), default=_d("augment"), show_default=True,
                 help="full: flips, rotations, scale, colour jitter, noise; dihedral: the 8 symmetries of the square only."),
    click.option("--no-augment", is_flag=True, help="Same as --augment none."),
    click.option("--freeze-blocks", type=click.IntRange(0, 16), default=_d("freeze_blocks"), show_default=True,
                 help="efficientnet_lite0 only: keep the stem and this many early blocks at their ImageNet weights."),
    click.option("--feature-cache/--no-feature-cache", default=_d("feature_cache"), show_default=True,
                 help="With --freeze-blocks and --augment dihedral/none: compute the frozen blocks once per cell and view "
                      "(kept in CACHE/features) and train the rest on them; same model, several times faster."),
    click.option("--tta", type=click.Choice(TTA_CHOICES), default=_d("tta"), show_default=True,
                 help="Test-time augmentation built into the bundle and its ONNX graph: mean over the mirror (flip) "
                      "or the 8 symmetries (d4). Costs that many forward passes per cell."),
    click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=_d("threshold"), show_default=True,
                 help="Decision threshold on P(all), e.g. the out-of-fold one `leukedge cv` reports; built into the model."),
    click.option("--select", type=click.Choice(SELECT_CHOICES), default=_d("select"), show_default=True,
                 help="Keep the best validation epoch, or the last one (a fixed epoch budget; what `cv` uses)."),
    click.option("--fp16-weights", "half_weights", is_flag=True, default=_d("half_weights"),
                 help="Store the bundle weights as float16 (half the size; loaded as float32)."),
]


_RUN_OPTIONS = [
    click.option("--workers", type=click.IntRange(0, 64), default=_d("workers"), show_default=True, help="Data-loading worker processes."),
    click.option("--threads", type=click.IntRange(0, 512), default=_d("threads") or 0, show_default=True, help="Torch CPU threads (0 = torch default)."),
    click.option("--resume", is_flag=True, default=_d("resume"), help="Continue from the run's checkpoints (same split, optimiser and schedule)."),
    click.option("--device", type=click.Choice(DEVICE_CHOICES), default=_d("device"), show_default=True),
    click.option("--limit", type=click.IntRange(2), default=_d("limit"), help="Use at most this many images (quick experiments)."),
    click.option("--quiet", is_flag=True, default=_d("quiet"), help="No progress bar or per-epoch lines."),
]


def train_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Click command with the recipe and run options of `leukedge train`."""
    for opt in reversed(_RECIPE_OPTIONS + _RUN_OPTIONS):
        f = opt(f)
    return f


def config_from_cli(ctx: click.Context, params: dict[str, Any], defaults: dict[str, Any] | None = None,
                    **extra: Any) -> TrainConfig:
    """A TrainConfig from a recipe file (``--recipe``) overlaid with the options given on the command line.

    ``defaults`` replace the options' own defaults (a command's different default, e.g. ``cv``'s
    ``select="last"``) where neither the command line nor the recipe sets them."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    recipe_file = params.pop("recipe_file", None)
    no_augment = params.pop("no_augment", False)
    explicit = {k for k in params if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    if no_augment:
        params["augment"] = "none"
        explicit.add("augment")
    for k, v in params.items():
        if k in known:
            values[k] = v
    for k, v in (defaults or {}).items():
        if k not in explicit:
            values[k] = v
    if recipe_file:
        try:
            recipe = load_recipe(recipe_file)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--recipe") from exc
        values.update({k: v for k, v in recipe.items() if k not in explicit})
        values["recipe"] = str(recipe_file) if Path(recipe_file).is_file() else f"{recipe_file} (shipped recipe)"
    if values.get("threads") == 0:
        values["threads"] = None
    values["progress"] = not values.get("quiet", False)
    values.update(extra)
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(f"{recipe_file or 'options'}: {exc}") from exc


def run_errors() -> tuple[type[BaseException], ...]:
    return (ConfigMismatchError, ValueError, FileNotFoundError, FloatingPointError)


@click.command("train")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Run directory: bundle/, history.json, metrics.json, training_curves.png, checkpoints/.")
@train_options
@click.option("--val-fold", type=int, default=_d("val_fold"), help="Official fold used for validation (default: the last one when the cache has several folds).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=_d("val_fraction"), show_default=True,
              help="Fraction of subjects held out when there are no official folds.")
@click.option("--image-level-split", is_flag=True, default=_d("image_level_split"),
              help="Split by image instead of by patient. LEAKS patients into validation: scores become inflated.")
@click.option("--resplit", is_flag=True, default=_d("resplit"), help="Ignore the train/val split stored in the cache by `leukedge preprocess` and make a new one.")
@click.option("--no-validation", is_flag=True, default=_d("no_validation"), help="Train on every labelled image for exactly --epochs epochs and keep the last model.")
@click.pass_context
def train_cmd(ctx: click.Context, cache: str, out_dir: str, **params: Any) -> None:
    """Train a classifier on the preprocessed dataset CACHE (from `leukedge preprocess`).

    Validation is patient-disjoint. By default the cache's own train/val split is used (made by
    `leukedge preprocess`: the last official C-NMC fold when the data spans several folds, else a
    subject-grouped, class-stratified split); --val-fold, --val-fraction with --resplit, or
    --image-level-split (leaks patients, loudly) make a new one. The model with the best
    validation weighted F1 (or the last, with --select last) is saved as a bundle in OUT/bundle
    together with its preprocessing settings and its recipe, next to history.json, metrics.json and
    training_curves.png. A --recipe file (TOML, keys = these options) fixes a whole recipe;
    `leukedge cv` takes the same options. `--recipe default` is the shipped model's recipe (about 6x
    faster on a CPU than fine-tuning the whole network); the estimated time per epoch is printed once
    the first batches have run, and every epoch is a row of OUT/results.csv (and TensorBoard event
    files in OUT/tensorboard when tensorboard is installed).
    """
    cfg = config_from_cli(ctx, params)
    try:
        training.train(cache, out_dir, cfg, reporter=RichReporter(quiet=cfg.quiet, bars=cfg.progress))
    except PretrainedWeightsUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    except run_errors() as exc:
        raise click.ClickException(str(exc) if str(cache) in str(exc) else f"{cache}: {exc}") from exc


