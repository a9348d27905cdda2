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
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
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


class _NullTask:
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


class PlainReporter:
    """Messages as plain lines on stderr, no progress bars (``quiet``: no messages either).
    What library calls use when no Reporter is given, e.g. in a notebook."""

    def __init__(self, quiet: bool = False, stream: Any = None) -> None:
        self.quiet = quiet
        self.stream = stream

    def log(self, message: str) -> None:
        if not self.quiet:
            print(strip_markup(message), file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None, *, transient: bool = False,
                 completed: int = 0) -> Iterator[Task]:
        yield _NullTask()


NULL_REPORTER = PlainReporter(quiet=True)


def reporter_or_default(reporter: Reporter | None, quiet: bool = False) -> Reporter:
    return reporter if reporter is not None else PlainReporter(quiet=quiet)


ProgressCallback = Callable[[int], None]


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
