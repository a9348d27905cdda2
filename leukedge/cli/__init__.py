"""The ``leukedge`` command line.

Each stage's Click command(s) and Rich output live in ``leukedge/cli/<stage>.py`` (the library
modules they call know nothing of Click or Rich); this file only registers them, importing lazily so that ``leukedge --help`` stays fast and a missing optional
dependency (torch, onnxruntime, TensorRT) only affects the commands that need it.
"""

from __future__ import annotations

import importlib

import click

from .._version import __version__

# command name -> (module, attribute, one-line help shown by `leukedge --help`), in pipeline order (the order --help lists)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("leukedge.cli.demo", "demo_cmd", "Run the pipeline end to end: the shipped model on real and synthetic cells (no data set, GPU or PyTorch needed)."),
    "data": ("leukedge.cli.data", "data_group", "Inspect C-NMC folders and generate synthetic cells."),
    "preprocess": ("leukedge.cli.preprocess", "preprocess_cmd", "Decode, stain-normalise and resize images into a dataset cache."),
    "train": ("leukedge.cli.train", "train_cmd", "Train a classifier on a preprocessed cache (subject-disjoint validation)."),
    "cv": ("leukedge.cli.cv", "cv_cmd", "Cross-validate a training recipe: official-fold transfer or subject-grouped folds (several seeds)."),
    "evaluate": ("leukedge.cli.evaluate", "evaluate_cmd", "Evaluate a model bundle: weighted F1, ROC-AUC, per-subject breakdown, plots."),
    "export": ("leukedge.cli.export", "export_cmd", "Export a model bundle to ONNX (FP32 and FP16) and check it against PyTorch."),
    "calibrate-ood": ("leukedge.cli.ood", "calibrate_ood_cmd", "Calibrate a model's out-of-distribution threshold on its training cache."),
    "build-engine": ("leukedge.cli.build_engine", "build_engine_cmd", "Compile an ONNX export into a TensorRT / TensorRT-RTX FP16 engine."),
    "infer": ("leukedge.cli.infer", "infer_cmd", "Batched, pipelined inference over image files with latency statistics."),
    "station": ("leukedge.cli.station", "station_group", "Microscope-station mode: watch a folder and classify new cells."),
    "report": ("leukedge.cli.report", "report_cmd", "Build a self-contained HTML report from a run directory."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)  # pipeline order, as listed in _COMMANDS

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)

            @click.command(name=name, help=_COMMANDS[name][2], context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def _missing(args: tuple[str, ...]) -> None:
                raise click.ClickException(
                    f"`leukedge {name}` needs the optional dependency {missing!r}, which is not installed "
                    f"(pip install 'leukedge[dev]' installs everything)."
                )

            return _missing
        return getattr(mod, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="leukedge")
def main() -> None:
    """leukedge: classify single white-blood-cell images (C-NMC 2019) as leukemic (ALL) or normal (HEM).

    Typical flow: data inspect → preprocess → train → evaluate → export → build-engine → infer.
    `leukedge demo` runs all of it on synthetic cells.
    """


if __name__ == "__main__":
    main()
