"""Rich output of the CLI layer: the consoles and the one progress-bar factory every command uses.

Library code reports through the small :class:`leukedge._util.Reporter` protocol; :class:`RichReporter`
is its Rich implementation (messages with markup, progress bars), passed in by the commands.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .._util import NullTask, line_progress


def progress_bar(console: Console | None = None, *, transient: bool = False, disable: bool = False,
                 stats: bool = False) -> Progress:
    """The progress bar of every leukedge command: description, bar, done/total, elapsed, remaining
    (``stats``: plus a free-text ``{task.fields[stats]}`` column, e.g. the running loss)."""
    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TimeRemainingColumn()]
    if stats:
        columns.append(TextColumn("{task.fields[stats]}"))
    return Progress(*columns, console=console or Console(stderr=True), transient=transient, disable=disable)


class _RichTask:
    def __init__(self, progress: Progress, task_id: Any) -> None:
        self._progress, self._id = progress, task_id

    def advance(self, n: int = 1, **fields: Any) -> None:
        self._progress.update(self._id, advance=n, **fields)

    def update(self, **fields: Any) -> None:
        self._progress.update(self._id, **fields)


class RichReporter:
    """:class:`leukedge._util.Reporter` on a Rich console: ``log`` prints (markup rendered), ``progress``
    draws a bar (nested calls share one live display, e.g. the epochs bar and the current epoch's bar).
    ``quiet``: no messages; ``bars=False``: no progress bars.

    When the console is not a terminal (nohup, CI, a systemd journal, a pipe) there is no bar: each task
    prints plain progress lines instead (:class:`leukedge._util.LineProgress`: every 10 % or 30 s, with
    rate and ETA, and a closing line), the one mechanism every command shares."""

    def __init__(self, console: Console | None = None, *, quiet: bool = False, bars: bool = True) -> None:
        self.console = console or Console(stderr=True, quiet=quiet)
        self.bars = bars
        self._live: Progress | None = None

    def log(self, message: str) -> None:
        self.console.print(message)

    def plain_line(self, line: str) -> None:
        """One plain log line: no markup, no highlighting, never wrapped (a journal keeps it whole)."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None, *, transient: bool = False,
                 completed: int = 0) -> Iterator[Any]:
        if not self.console.is_terminal:
            if not self.bars or self.console.quiet:
                yield NullTask()
                return
            with line_progress(description, total, self.plain_line, completed=completed) as task:
                yield task
            return
        if self._live is not None:  # nested: a task of the running display, removed when done
            tid = self._live.add_task(description, total=total, completed=completed, stats="")
            try:
                yield _RichTask(self._live, tid)
            finally:
                self._live.remove_task(tid)
            return
        bar = progress_bar(self.console, transient=transient, disable=not self.bars, stats=True)
        self._live = bar
        try:
            with bar:
                tid = bar.add_task(description, total=total, completed=completed, stats="")
                yield _RichTask(bar, tid)
        finally:
            self._live = None

