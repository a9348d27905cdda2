"""`leukedge report`: build the HTML report of a run directory."""

from __future__ import annotations

from pathlib import Path

import click

from ..report import build_report


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "--output", "output", type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file [RUN_DIR/report.html] (--output: the old spelling).")
@click.option("--title", help="Title shown at the top of the report.")
def report_cmd(run_dir: Path, output: Path | None, title: str | None) -> None:
    """Rebuild the self-contained HTML report from any train, evaluate, infer or demo RUN_DIR."""
    try:
        path = build_report(run_dir, output, title)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"report written to {path}")


