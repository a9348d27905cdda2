"""Console output of the station: a live status line on a terminal, periodic log lines otherwise
(systemd journal, CI logs)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from .._util import path_text
from ..station.db import ResultRow


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:,.0f} ms" if v < 10_000 else f"{v / 1000:,.1f} s")


def batch_line(batch_id: int, size: int, reason: str, rows: list[ResultRow]) -> str:
    """One batch as a log line: ``batch #12: 16 files (full) | 15 ok, 1 error | latency p50 702 ms,
    max 811 ms | preprocess 21 ms, compute 64 ms``. Latency is a file's time from detection to its
    committed row; preprocess / compute are the batch's engine times."""
    n_err = sum(1 for r in rows if r.status == "error")
    lat = sorted(r.latency_ms for r in rows)
    parts = [f"batch #{batch_id}: {size} file{'s' if size != 1 else ''} ({reason})",
             f"{len(rows) - n_err} ok, {n_err} error{'s' if n_err != 1 else ''}"]
    if lat:
        parts.append(f"latency p50 {_ms(lat[len(lat) // 2])}, max {_ms(lat[-1])}")
    pre = max((r.preprocess_ms for r in rows if r.preprocess_ms is not None), default=None)
    comp = max((r.compute_ms for r in rows if r.compute_ms is not None), default=None)
    if pre is not None or comp is not None:
        parts.append(f"preprocess {_ms(pre)}, compute {_ms(comp)}")
    return " | ".join(parts)


class Reporter:
    def __init__(self, console: Console | None = None, *, quiet: bool = False, log_every_s: float = 10.0,
                 live: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.log_every_s = log_every_s
        self.use_live = (self.console.is_terminal if live is None else live) and not quiet
        self._live: Live | None = None
        self._station: Any = None
        self._last_log = time.monotonic()
        self._last_batch = ""

    def message(self, markup: str) -> None:
        if not self.quiet or "[red" in markup or "[yellow" in markup:
            self.console.print(markup)

    def status_line(self) -> Text:
        st = self._station
        if st is None:
            return Text("")
        d = st.live()
        t = Text()
        t.append("● ", style="bold green" if not st.stopping else "bold yellow")
        t.append(f"{d['processed']:,} classified", style="bold")
        if d["errors"]:
            t.append(f" ({d['errors']:,} errors)", style="red")
        t.append(f" | {d['throughput_1m']:.1f} cells/s (1 min)")
        t.append(f" | queue {d['queue_len']}")
        t.append(f" | settling {d['settling']}")
        t.append(f" | latency p50 {_ms(d['latency_p50_ms'])} p95 {_ms(d['latency_p95_ms'])}")
        if self._last_batch:
            t.append(f" | {self._last_batch}", style="dim")
        return t

    def start(self, station: Any) -> None:
        self._station = station
        s = station.s
        if not self.quiet:
            self.console.print(
                f"[bold]leukedge station[/] watching [cyan]{s.watch_dir}[/] -> [cyan]{s.db_path}[/]\n"
                f"  model {station.model.model} (id {station.model.model_id}, preprocessing "
                f"{station.model.preprocess_hash[:12]}) on [bold]{station.model.backend}[/]"
                + (f" [dim]({escape(station.model.reason)})[/]" if station.model.reason else "") + "\n"
                f"  batch {s.batch_size}, max wait {s.max_wait_ms:g} ms, settle {s.settle_ms:g} ms, poll {s.poll_ms:g} ms"
                + ("" if s.once or s.exit_when_idle_s is not None else "  (Ctrl-C or SIGTERM stops cleanly)")
            )
        if self.use_live:
            self._live = Live(get_renderable=self.status_line, console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.start()

    def batch_done(self, station: Any, batch_id: int, size: int, reason: str, rows: list[ResultRow]) -> None:
        self._last_batch = f"batch #{batch_id}: {size} ({reason})"
        for r in rows:
            if r.status == "error":
                self.message(f"[red]error[/] {escape(path_text(r.path))}: {escape(str(r.error))}")
            elif r.status == "rejected":
                self.message(f"[yellow]rejected[/] {escape(path_text(r.path))}: {escape(str(r.reason))}")
            elif r.reason:  # an ok file used with a caveat (a multi-page TIFF)
                self.message(f"[cyan]note[/] {escape(path_text(r.path))}: {escape(str(r.reason))}")
        if not self.use_live and not self.quiet:
            # one plain line per batch, never wrapped: what a systemd journal or a log file keeps
            self.console.print(batch_line(batch_id, size, reason, rows), markup=False, highlight=False, soft_wrap=True)
            if time.monotonic() - self._last_log >= self.log_every_s:
                self._last_log = time.monotonic()
                self.console.print(self.status_line(), soft_wrap=True)

    def stop(self, station: Any) -> None:
        had_live = self._live is not None
        if self._live is not None:
            self._live.stop()  # leaves the last status line on screen
            self._live = None
        sm = station.summary
        if sm is not None and not self.quiet:
            if not had_live:
                self.console.print(self.status_line())
            self.console.print(
                f"[bold]stopped[/]: {sm.exit_reason}. This run: {sm.processed:,} results ({sm.errors:,} errors, "
                f"{sm.rejected:,} rejected) in "
                f"{sm.batches:,} batches; {sm.left_in_queue} file(s) left for the next start."
            )
