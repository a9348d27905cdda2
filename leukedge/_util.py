"""Small helpers and constants shared by every stage (each exists once, here).

Nothing in this module imports torch, onnx, Click or Rich, so any module may use it without a cost at
import time or an import cycle. It holds: the class names and file-name conventions, the backend
choices, atomic file writes, a bounded sha256 of a file, softmax, the loader of the Rust core, and the
small progress/report protocol through which library code tells a caller (the CLI) how far it got.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, Iterator, Protocol

import numpy as np

# --------------------------------------------------------------------------------------------
# constants
CLASS_NAMES = ("hem", "all")  # index == label
POSITIVE_CLASS = "all"
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
# --backend of `leukedge infer` / `leukedge station run` (what engines.get_backend accepts)
BACKEND_CHOICES = ("auto", "tensorrt", "tensorrt-rtx", "onnxruntime", "torch")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# --precision of `leukedge infer` / `leukedge station run`: which ONNX graph of an export ONNX Runtime runs
PRECISION_CHOICES = ("auto", "fp32", "fp16", "int8")
PRECISION_HELP = ("ONNX Runtime graph to use (auto: fp16 on CUDA, fp32 on CPU; int8: the export's calibrated Q/DQ "
                  "graph, only if it passed its check, see `leukedge export --int8`).")
CUDA_BINDINGS = ("auto", "cuda-python", "pycuda")


# --------------------------------------------------------------------------------------------
# small conversions
def as_int(v: Any, default: int = -1) -> int:
    """``int(v)``, or ``default`` where ``v`` is empty, None or not a number (manifest cells)."""
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def subject_sort_key(subject: str) -> tuple[int, int, str]:
    """C-NMC order of subject ids: ALL patients (``UID_12``) before healthy ones (``UID_H3``), by number."""
    digits = re.sub(r"\D", "", subject)
    return (1 if subject.upper().startswith("H") else 0, int(digits) if digits else 0, subject)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: the row maximum is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# files
class NotRegularFile(OSError):
    """A path that is not a regular file (FIFO, device, socket, folder): never read."""


class FileTooLarge(OSError):
    """A file above the size limit: refused before it is read."""


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO / named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def open_regular(path: str | os.PathLike, max_bytes: int | None = None) -> BinaryIO:
    """Open a regular file for binary reading, refusing anything else *before* reading it.

    A FIFO would block ``open`` until a writer appears and ``/dev/zero`` never ends, so the file is
    opened non-blocking and checked with ``fstat`` first. ``max_bytes``: refuse bigger files
    (:class:`FileTooLarge`). Raises :class:`NotRegularFile` / :class:`FileTooLarge` (both ``OSError``).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({_file_kind(st.st_mode)})", str(path))
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileTooLarge(errno.EFBIG, f"file of {st.st_size:,} bytes is above the limit of {max_bytes:,} bytes",
                               str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20, max_bytes: int | None = None) -> str:
    """sha256 of a regular file (streamed); special files and files above ``max_bytes`` are refused
    unread (see :func:`open_regular`)."""
    h = hashlib.sha256()
    with open_regular(path, max_bytes) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def path_text(path: str | os.PathLike) -> str:
    """A file name as readable, writable text: the name itself when it is valid UTF-8 without control
    characters; otherwise undecodable bytes as ``\\xNN`` and control characters (CR, LF, TAB, ...) as
    ``\\xNN`` too, so that it can be stored in SQLite / written as UTF-8 and never splits a CSV row. Not
    reversible on its own: :func:`path_raw` keeps the exact bytes whenever the two differ."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace").translate(_CONTROL)


def path_raw(path: str | os.PathLike) -> bytes | None:
    """The exact bytes of a file name (``os.fsencode``) when :func:`path_text` had to escape it, else None."""
    raw = os.fsencode(path)
    return None if path_text(path).encode("utf-8") == raw else raw


def path_raw_b64(path: str | os.PathLike) -> str:
    """:func:`path_raw` as base64 text ("" when the name needs no escaping): the lossless column of CSV / JSON."""
    import base64

    raw = path_raw(path)
    return "" if raw is None else base64.b64encode(raw).decode("ascii")


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it into place: readers see
    the old file or the new one, never a half-written one; on any failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


# --------------------------------------------------------------------------------------------
# the real sample cells
def sample_dir() -> Path | None:
    """The real C-NMC sample cells that the demo and the export check use, if any: ``$LEUKEDGE_SAMPLE_DIR``,
    else ``../shared/data/cnmc_sample`` beside a source checkout (a folder holding ``pyproject.toml`` and this
    package). An installed package never looks outside itself: there, only the environment variable counts."""
    env = os.environ.get("LEUKEDGE_SAMPLE_DIR")
    if env:
        return Path(env) if Path(env).is_dir() else None
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "pyproject.toml").is_file():
        return None
    cand = checkout.parent / "shared" / "data" / "cnmc_sample"
    return cand if cand.is_dir() else None


# --------------------------------------------------------------------------------------------
# the Rust core
NATIVE_MISSING = ("the Rust core leukedge._native is not built; install the package with `pip install -e .` "
                  "(needs a Rust toolchain and maturin)")


def load_native(required: bool = True) -> Any:
    """The ``leukedge._native`` extension module; if it is not built, a RuntimeError saying how to build it
    (``required``) or None."""
    try:
        from . import _native
    except ImportError as exc:
        if not required:
            return None
        raise RuntimeError(f"{NATIVE_MISSING}: {exc}") from exc
    return _native


# --------------------------------------------------------------------------------------------
# progress and messages: library code reports through a Reporter; the CLI passes one that draws
# Rich progress bars (leukedge.cli._console.RichReporter). The library never imports Rich itself.
class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...

    def update(self, **fields: Any) -> None: ...


class Reporter(Protocol):
    """Where library code sends messages (Rich-style markup allowed: ``[bold]...[/]``) and progress."""

    def log(self, message: str) -> None: ...

    def progress(self, description: str, total: int | None, *, transient: bool = False,
                 completed: int = 0) -> ContextManager[Task]: ...


class NullTask:
    """A progress task that shows nothing."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass


_MARKUP = re.compile(r"\[(?:/|bold|dim|italic|red|green|yellow|blue|magenta|cyan|white)[^\]\[]*\]")


_MARKUP_TAG = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def escape_markup(text: str) -> str:
    """``text`` with anything that looks like a Rich style tag escaped, so it prints literally."""
    out = _MARKUP_TAG.sub(lambda m: m.group(1) * 2 + "\\" + m.group(2), text)
    return out + "\\" if out.endswith("\\") and not out.endswith("\\\\") else out


def strip_markup(message: str) -> str:
    """``message`` without Rich style tags (``[bold red]``, ``[/]``), for plain-text output."""
    return _MARKUP.sub("", message)


#: seconds between two plain progress lines of one task (``LEUKEDGE_PROGRESS_S`` overrides it)
PROGRESS_EVERY_S = 30.0
#: a plain progress line also at every this fraction of the total (10 %, 20 % ...)
PROGRESS_EVERY_FRACTION = 0.1


def _progress_every_s() -> float:
    try:
        return max(0.0, float(os.environ.get("LEUKEDGE_PROGRESS_S", PROGRESS_EVERY_S)))
    except ValueError:
        return PROGRESS_EVERY_S


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: a duration as people read it in a log."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class LineProgress:
    """A progress task that prints plain lines, for output that is not a terminal (nohup, CI, systemd):
    ``infer: 3,200/24,689 (13 %) | 84.1/s | ETA 4m15s | elapsed 38s``.

    A line is printed when another 10 % of ``total`` is done, when ``every_s`` seconds (default 30,
    ``LEUKEDGE_PROGRESS_S``) passed since the last line, and once at the end (:meth:`finish`), so a log
    shows steady progress without a line per item. ``emit`` receives each line (e.g. ``print``); the
    ``stats`` field (free text such as the running loss) is appended. Every leukedge command uses this,
    through :class:`PlainReporter` and the CLI's reporter when stderr is not a terminal."""

    def __init__(self, description: str, total: int | None, emit: Callable[[str], None], *, completed: int = 0,
                 every_s: float | None = None, clock: Callable[[], float] | None = None) -> None:
        import time

        self.description, self.total, self.emit = description, total, emit
        self.completed = self._start = completed
        self.stats = ""
        self.every_s = _progress_every_s() if every_s is None else every_s
        self._clock = clock or time.monotonic
        self._t0 = self._last_t = self._clock()
        self._last_step = self._step(completed)
        self._printed_at = completed

    def _step(self, done: int) -> int:
        if not self.total:
            return 0
        return int(done / self.total / PROGRESS_EVERY_FRACTION + 1e-9)

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.completed += n
        self._fields(fields)
        self._maybe_line()

    def update(self, **fields: Any) -> None:
        moved = "completed" in fields
        if moved:
            self.completed = int(fields.pop("completed"))
        self._fields(fields)
        if moved:
            self._maybe_line()

    def _maybe_line(self) -> None:
        now = self._clock()
        step = self._step(self.completed)
        if step > self._last_step or now - self._last_t >= self.every_s:
            self._last_step = step
            self._line(now)

    def _fields(self, fields: dict[str, Any]) -> None:
        if "total" in fields:
            self.total = fields.pop("total")
        if "description" in fields:
            self.description = str(fields.pop("description"))
        if "stats" in fields:
            self.stats = str(fields.pop("stats") or "")

    def line(self, now: float | None = None) -> str:
        """The current progress as one line."""
        now = self._clock() if now is None else now
        elapsed = now - self._t0
        done_here = self.completed - self._start
        rate = done_here / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description}: {self.completed:,}" + (f"/{self.total:,}" if self.total else "")
                 + (f" ({100 * self.completed / self.total:.0f} %)" if self.total else "")]
        parts.append(f"{rate:,.1f}/s" if rate < 100 else f"{rate:,.0f}/s")
        if self.total and rate > 0 and self.completed < self.total:
            parts.append(f"ETA {format_duration((self.total - self.completed) / rate)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.stats:
            parts.append(strip_markup(self.stats))
        return " | ".join(parts)

    def _line(self, now: float) -> None:
        self._last_t = now
        self._printed_at = self.completed
        self.emit(self.line(now))

    def finish(self) -> None:
        """The closing line (``done``), unless nothing happened since the last line."""
        if self.completed != self._printed_at or self.completed == self._start:
            now = self._clock()
            self._last_t = now
            self._printed_at = self.completed
            self.emit(self.line(now) + " | done")


@contextlib.contextmanager
def line_progress(description: str, total: int | None, emit: Callable[[str], None], *,
                  completed: int = 0) -> Iterator[LineProgress]:
    """A :class:`LineProgress` task whose closing line is printed when the block ends."""
    task = LineProgress(description, total, emit, completed=completed)
    try:
        yield task
    finally:
        task.finish()


class PlainReporter:
    """Messages and progress as plain lines on stderr (progress: :class:`LineProgress`, a line every 10 %
    or 30 s); ``quiet``: neither. What library calls use when no Reporter is given, e.g. in a notebook."""

    def __init__(self, quiet: bool = False, stream: Any = None) -> None:
        self.quiet = quiet
        self.stream = stream

    def log(self, message: str) -> None:
        if not self.quiet:
            print(strip_markup(message), file=self.stream or sys.stderr, flush=True)

    def _emit(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None, *, transient: bool = False,
                 completed: int = 0) -> Iterator[Task]:
        if self.quiet:
            yield NullTask()
            return
        with line_progress(description, total, self._emit, completed=completed) as task:
            yield task


NULL_REPORTER = PlainReporter(quiet=True)


# --------------------------------------------------------------------------------------------
# the package's stage functions
class _CallableModule(types.ModuleType):
    """A stage module that can be called like its main function (see :func:`callable_module`)."""

    _main: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._main(*args, **kwargs)


def callable_module(module_name: str, main: Callable[..., Any]) -> None:
    """``leukedge.train`` and ``leukedge.evaluate`` name both a submodule and the function the package
    exports. Importing the submodule rebinds the package attribute to the module, so the module is made
    callable: ``leukedge.train(...)`` then runs ``leukedge.train.train(...)`` whichever object it finds."""
    module = sys.modules[module_name]
    module.__class__ = _CallableModule
    module._main = main  # type: ignore[attr-defined]
