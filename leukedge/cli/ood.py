"""``leukedge calibrate-ood``: calibrate and store the out-of-distribution threshold of a model bundle."""

from __future__ import annotations

from pathlib import Path

import click

from .._util import BACKEND_CHOICES
from ..ood import DEFAULT_QUANTILE


@click.command("calibrate-ood")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("cache", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--quantile", type=click.FloatRange(0.5, 1.0), default=DEFAULT_QUANTILE, show_default=True,
              help="Threshold = this quantile of the training cells' energy scores (the share of cells like the "
                   "training ones that are still accepted).")
@click.option("--split", default="train", show_default=True,
              help="Use the cache rows of this split (when the cache has splits; else every ok row). 'any' = all.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--batch", type=click.IntRange(1, 1024), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Use at most this many cells.")
def calibrate_ood_cmd(bundle: Path, cache: Path, quantile: float, split: str, backend: str, batch: int,
                      limit: int | None) -> None:
    """Calibrate the out-of-distribution (energy) threshold of model BUNDLE on CACHE, a dataset cache of
    its training cells (`leukedge preprocess --config BUNDLE`), and store it in BUNDLE/bundle.json ("ood").

    From then on `infer` and the station reject cells whose energy is above it (status `rejected`,
    reason "out of distribution"); they are counted apart and never in a blast fraction. Re-export the
    bundle afterwards only if you ship the export folder on its own (it reads the threshold from the bundle).
    """
    from ..config import ConfigMismatchError
    from ..ood import calibrate_bundle
    from ._console import progress_bar

    with progress_bar(transient=True) as prog:
        task = prog.add_task("energy scores", total=None)
        try:
            th = calibrate_bundle(bundle, cache, quantile=quantile, split=None if split == "any" else split,
                                  backend=backend, batch=batch, limit=limit,
                                  progress=lambda n: prog.advance(task, n))
        except (FileNotFoundError, ValueError, ConfigMismatchError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"OOD threshold {th.threshold:.4f} (energy, {100 * th.quantile:g} % quantile of {th.n_cells:,} cells) "
               f"stored in {bundle / 'bundle.json'}")
