"""Polling folder scanner that hands over each image file once it is complete.

A file is *complete* when

* its (size, mtime) has been observed unchanged on at least two polls spanning ``settle_s``
  seconds (measured on this machine's monotonic clock, so a skewed file-server clock cannot make
  a half-written file look old), or
* it appeared under its final name while a temporary name for it (``x.bmp.tmp``, ``x.part``,
  rsync's ``.x.bmp.AbC123``, ``~x.bmp`` ...) had been seen shortly before: a rename from a temporary
  name is the writer saying "done".

Temporary names, dotfiles and dot-folders are never read.  After a file is complete it is hashed
(sha256, streamed) and its (size, mtime) are checked again; if they moved while hashing, the file
goes back to settling.  Files already in the station database are recognised by (size, mtime)
without being read again, or by (path, sha256) after a touch.

Polling cost stays low in big folders: a folder is re-listed only when its mtime moved, and files
that already have a stored result are not stat()ed again except on a full sweep (``full_scan_s``),
which also notices a processed file rewritten in place.

Only :class:`Scanner` state is touched by the scanner thread; the station talks back through
:meth:`Scanner.report_done` / :meth:`Scanner.report_retry`, which are thread-safe.
"""

from __future__ import annotations

import fnmatch
import os
import queue
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .._util import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # re-exported
from ..data import file_sha256
from .db import KnownFile

TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".filepart", ".swp", ".lock")
# rsync writes ".name.XXXXXX" and renames; other tools write "~name", "name~" or "#name#".
_RSYNC_RE = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]{6}$")
RENAME_WINDOW_S = 30.0
# A folder listing is reused while the folder's mtime is unchanged, except when that mtime is this
# recent (coarse mtime clocks on network / FAT file systems could hide a change within the same tick).
RACY_DIR_S = 2.0


def is_ignored_name(name: str, extra_globs: tuple[str, ...] = ()) -> bool:
    """True for names that are never read: temporary, hidden and editor/backup files."""
    low = name.lower()
    if name.startswith((".", "~", "#")) or name.endswith("~"):
        return True
    if low.endswith(TEMP_SUFFIXES):
        return True
    return any(fnmatch.fnmatch(name, g) for g in extra_globs)


def final_names_for_temp(name: str) -> list[str]:
    """Names a temporary file is likely to be renamed to (used to recognise a rename as completion)."""
    out: list[str] = []
    base = name
    m = _RSYNC_RE.match(base)
    if m:
        out.append(m.group("final"))
    base = base.lstrip(".~#").rstrip("~#")
    low = base.lower()
    for suf in TEMP_SUFFIXES:
        if low.endswith(suf):
            base = base[: -len(suf)]
            break
    if base:
        out.append(base)
    return out


def parent_sample_id(path: str) -> str:
    return Path(path).parent.name


def make_sample_fn(root: str, pattern: str | None) -> Callable[[str], str]:
    """Sample id of a file: a regex named group ``sample`` on the path relative to ``root``
    (forward slashes), else the name of the file's parent folder."""
    if not pattern:
        return parent_sample_id
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--sample-pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    if "sample" not in rx.groupindex:
        raise ValueError(f"--sample-pattern {pattern!r} needs a named group (?P<sample>...)")

    def sample_of(path: str) -> str:
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        m = rx.search(rel)
        if m and m.group("sample"):
            return m.group("sample")
        return parent_sample_id(path)

    return sample_of


@dataclass
class ReadyFile:
    """A complete file, hashed, waiting for a batch."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    sample_id: str
    detected_at: float          # wall clock, first time the final name was seen
    ready_at: float             # wall clock, complete and hashed
    ready_mono: float           # monotonic, for the batch deadline
    how: str                    # settled | renamed
    error: str | None = None    # set for files refused before inference (too large, empty)
    reactivate: bool = False    # content already classified earlier: only mark it current again
    detected_mono: float | None = None  # monotonic, first seen: durations never jump with the wall clock
    ctime_ns: int | None = None  # st_ctime_ns and st_ino when hashed: a later replacement of equal size and
    inode: int | None = None     # mtime changes them, so it is hashed again


@dataclass
class _Listing:
    dirs: list[str]
    temps: list[str]
    files: list[str]


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    detected_at: float
    stable_since: float
    observations: int = 1
    renamed: bool = False
    detected_mono: float | None = None


@dataclass
class ScanStats:
    scans: int = 0
    settling: int = 0
    in_flight: int = 0
    last_scan_ms: float = 0.0
    last_change_mono: float = field(default_factory=time.monotonic)
    files_seen: int = 0


class Scanner:
    def __init__(
        self,
        root: str | os.PathLike,
        *,
        settle_s: float = 0.5,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        ignore_globs: tuple[str, ...] = (),
        max_bytes: int = 100 * 1024 * 1024,
        sample_fn: Callable[[str], str] = parent_sample_id,
        known: dict[str, dict[str, KnownFile]] | None = None,
        exclude_paths: tuple[str, ...] = (),
        trust_rename: bool = True,
        full_scan_s: float = 10.0,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.settle_s = float(settle_s)
        self.empty_settle_s = max(10 * self.settle_s, 2.0)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.ignore_globs = tuple(ignore_globs)
        self.max_bytes = int(max_bytes)
        self.sample_fn = sample_fn
        self.trust_rename = trust_rename
        self.exclude = {os.path.abspath(p) for p in exclude_paths}
        self.known: dict[str, dict[str, KnownFile]] = known or {}
        # path -> (size, mtime_ns) of the current stored result: recognised without reading.
        self.done_stats: dict[str, tuple[int, int]] = {}
        # path -> (ctime_ns, inode) of the current stored result, where known: a file replaced by another of the
        # same size and mtime (cp --preserve, a restored backup) changes them and is hashed again
        self.done_ids: dict[str, tuple[int, int]] = {}
        for path, by_hash in self.known.items():
            for k in by_hash.values():
                if not k.superseded and k.size is not None and k.mtime_ns is not None:
                    self.done_stats[path] = (k.size, k.mtime_ns)
                    if k.ctime_ns is not None and k.inode is not None:
                        self.done_ids[path] = (k.ctime_ns, k.inode)
        self.candidates: dict[str, _Candidate] = {}
        self.in_flight: set[str] = set()
        self.recent_temps: dict[str, float] = {}   # final path or dir/stem -> monotonic time seen
        self.stats = ScanStats()
        self._feedback: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self.unreadable: dict[str, str] = {}        # path -> last error while hashing (retried)
        self.full_scan_s = float(full_scan_s)
        self._last_full = float("-inf")
        self._dirs: dict[str, tuple[int, _Listing]] = {}   # folder -> (mtime_ns, listing)
        self._next_dirs: dict[str, tuple[int, _Listing]] = {}
        # paths whose current result is gone (deleted, renamed, moved away): the station marks their
        # rows superseded, so that totals follow the files (thread-safe hand-over)
        self._vanished: "queue.SimpleQueue[str]" = queue.SimpleQueue()

    # -- feedback from the station (any thread) -------------------------------------------------
    def report_done(self, path: str, sha256: str, size: int, mtime_ns: int, ctime_ns: int | None = None,
                    inode: int | None = None) -> None:
        self._feedback.put(("done", path, sha256, size, mtime_ns, ctime_ns, inode))

    def report_retry(self, path: str) -> None:
        """The file changed while it was being classified: look at it again from scratch."""
        self._feedback.put(("retry", path))

    def _drain_feedback(self) -> None:
        while True:
            try:
                msg = self._feedback.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "done":
                _, path, sha, size, mtime_ns, ctime_ns, inode = msg
                self.in_flight.discard(path)
                by_hash = self.known.setdefault(path, {})
                for k in by_hash.values():
                    k.superseded = True
                by_hash[sha] = KnownFile(sha, size, mtime_ns, False, ctime_ns, inode)
                self.done_stats[path] = (size, mtime_ns)
                if ctime_ns is not None and inode is not None:
                    self.done_ids[path] = (ctime_ns, inode)
                else:
                    self.done_ids.pop(path, None)
            elif msg[0] == "retry":
                path = msg[1]
                self.in_flight.discard(path)
                self.done_stats.pop(path, None)
                self.candidates.pop(path, None)

    def take_vanished(self) -> list[str]:
        """Paths under the watch folder whose stored result no longer has a file (any thread)."""
        out = []
        while True:
            try:
                out.append(self._vanished.get_nowait())
            except queue.Empty:
                return out

    def _under_root(self, path: str) -> bool:
        return path.startswith(self.root.rstrip(os.sep) + os.sep)

    def _retry_unreadable(self) -> None:
        """On a full sweep, look again at files whose stored result is "unreadable": a permission fix
        (``chmod 644``) changes neither size nor mtime, so they would never be read again otherwise."""
        for path, by_hash in self.known.items():
            if path in self.done_stats and any(
                    sha.startswith("unreadable:") and not k.superseded for sha, k in by_hash.items()):
                del self.done_stats[path]  # back to settling; a still unreadable file is not stored twice

    # -- scanning ----------------------------------------------------------------------------------
    def _list_dir(self, d: str, full: bool, wall: float) -> _Listing | None:
        """Entries of one folder; re-read only when its mtime moved (or it changed recently)."""
        try:
            dst = os.stat(d)
        except OSError:
            return None
        cached = self._dirs.get(d)
        if (not full and cached is not None and cached[0] == dst.st_mtime_ns
                and wall - dst.st_mtime > RACY_DIR_S):
            self._next_dirs[d] = cached
            return cached[1]
        listing = _Listing([], [], [])
        try:
            with os.scandir(d) as it:
                for e in it:
                    name = e.name
                    try:
                        if e.is_dir(follow_symlinks=False):
                            if not name.startswith("."):
                                listing.dirs.append(e.path)
                            continue
                    except OSError:
                        continue
                    if is_ignored_name(name, self.ignore_globs):
                        listing.temps.append(name)
                    elif name.lower().endswith(self.extensions) and e.path not in self.exclude:
                        listing.files.append(e.path)
        except OSError:
            return None
        self._next_dirs[d] = (dst.st_mtime_ns, listing)
        return listing

    def _walk(self, full: bool) -> tuple[dict[str, os.stat_result], set[str], list[tuple[str, str]]]:
        """stat() every watched file, except -- between full sweeps -- files whose result is stored
        (returned in ``unchanged``): in-place rewrites of those are noticed by the next full sweep."""
        files: dict[str, os.stat_result] = {}
        unchanged: set[str] = set()
        temps: list[tuple[str, str]] = []
        wall = time.time()
        self._next_dirs = {}
        stack = [self.root]
        while stack:
            d = stack.pop()
            listing = self._list_dir(d, full, wall)
            if listing is None:
                continue
            stack.extend(listing.dirs)
            if self.trust_rename:
                temps.extend((d, name) for name in listing.temps)
            for path in listing.files:
                if not full and path in self.done_stats and path not in self.candidates:
                    unchanged.add(path)
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    continue  # vanished between listing and stat
                if _is_regular(st):
                    files[path] = st
        self._dirs = self._next_dirs
        return files, unchanged, temps

    def scan(self) -> list[ReadyFile]:
        """One poll: returns the files that became complete since the last poll (hashed)."""
        t0 = time.perf_counter()
        self._drain_feedback()
        now = time.monotonic()
        wall = time.time()
        full = now - self._last_full >= self.full_scan_s
        if full:
            self._retry_unreadable()
        files, unchanged, temps = self._walk(full)
        if full:
            self._last_full = now
        for d, name in temps:
            for final in final_names_for_temp(name):
                final_path = os.path.join(d, final)
                self.recent_temps[final_path] = now
                self.recent_temps[os.path.splitext(final_path)[0]] = now
        if self.recent_temps:
            self.recent_temps = {k: t for k, t in self.recent_temps.items() if now - t <= RENAME_WINDOW_S}
        temp_present = {os.path.join(d, f) for d, name in temps for f in final_names_for_temp(name)}

        ready_paths = self._settled(files, temp_present, now, wall)
        self._forget_missing(files, unchanged)
        ready: list[ReadyFile] = []
        for path in ready_paths:
            item = self._hash_ready(path, self.candidates[path])
            if item is not None:
                ready.append(item)
        self.stats.scans += 1
        self.stats.settling = len(self.candidates)
        self.stats.in_flight = len(self.in_flight)
        self.stats.files_seen = len(files) + len(unchanged)
        self.stats.last_scan_ms = (time.perf_counter() - t0) * 1000
        return ready

    def _settled(self, files: dict[str, os.stat_result], temp_present: set[str], now: float, wall: float) -> list[str]:
        """Paths whose size and mtime have stayed the same long enough (or that were renamed into place)."""
        ready_paths: list[str] = []
        for path, st in files.items():
            key = (st.st_size, st.st_mtime_ns)
            if path in self.in_flight:
                continue
            if self.done_stats.get(path) == key:
                ids = self.done_ids.get(path)
                if ids is None or ids == (st.st_ctime_ns, st.st_ino):
                    continue
                del self.done_stats[path]  # same size and mtime, but another file or rewritten: hash it again
            cand = self.candidates.get(path)
            if cand is None or (cand.size, cand.mtime_ns) != key:
                renamed = False
                if cand is None and self.trust_rename and st.st_size > 0 and path not in temp_present:
                    renamed = path in self.recent_temps or os.path.splitext(path)[0] in self.recent_temps
                if cand is None:
                    cand = _Candidate(st.st_size, st.st_mtime_ns, wall, now, 1, renamed, now)
                    self.candidates[path] = cand
                else:
                    cand.size, cand.mtime_ns = key
                    cand.stable_since, cand.observations, cand.renamed = now, 1, False
                self.stats.last_change_mono = now
            else:
                cand.observations += 1
            settle = self.empty_settle_s if cand.size == 0 else self.settle_s
            if cand.renamed or (cand.observations >= 2 and now - cand.stable_since >= settle):
                ready_paths.append(path)

        return ready_paths

    def _forget_missing(self, files: dict[str, os.stat_result], unchanged: set[str]) -> None:
        """Forget what disappeared: candidates, done files (their results stop counting) and unreadable ones."""
        for path in [p for p in self.candidates if p not in files]:
            del self.candidates[path]
        for path in [p for p in self.done_stats if p not in files and p not in unchanged]:
            del self.done_stats[path]
            if self._under_root(path):
                # its result no longer counts; if the file comes back it is reactivated, not re-read
                for k in self.known.get(path, {}).values():
                    k.superseded = True
                self._vanished.put(path)
        for path in [p for p in self.unreadable if p not in files]:
            del self.unreadable[path]


    def _hash_ready(self, path: str, cand: _Candidate) -> ReadyFile | None:
        key = (cand.size, cand.mtime_ns)
        try:
            if cand.size > self.max_bytes:  # refused unread: never hash gigabytes to reject them
                digest = f"too-large:{cand.size}:{cand.mtime_ns}"
            else:
                digest = file_sha256(path)
            st = os.stat(path)
        except OSError as exc:
            # Unreadable (permissions, vanished): keep it settling and retry on the next poll;
            # it is recorded as an error only once it is stable and still unreadable.
            if path not in self.unreadable:
                self.unreadable[path] = f"{type(exc).__name__}: {exc}"
                return None
            digest = "unreadable:" + f"{cand.size}:{cand.mtime_ns}"
            st = None
        if st is not None and (st.st_size, st.st_mtime_ns) != key:
            # It changed while being hashed: start settling again.
            del self.candidates[path]
            self.stats.last_change_mono = time.monotonic()
            return None
        del self.candidates[path]
        error = None
        if st is None:  # unreadable on two polls in a row
            error = f"cannot read file: {self.unreadable.pop(path)}"
        else:  # readable now (perhaps after a chmod): a failure seen earlier no longer matters
            self.unreadable.pop(path, None)
        by_hash = self.known.get(path, {})
        reactivate = False
        if digest in by_hash:
            if not by_hash[digest].superseded:
                # Same content as the stored result (touched, or restart with a new mtime).
                self.done_stats[path] = key
                if st is not None:
                    self.done_ids[path] = (st.st_ctime_ns, st.st_ino)
                return None
            reactivate = True
        if error is None and cand.size == 0:
            error = "empty file (0 bytes)"
        elif error is None and cand.size > self.max_bytes:
            error = f"file too large: {cand.size:,} bytes > limit {self.max_bytes:,} (--max-file-mb)"
        self.in_flight.add(path)
        return ReadyFile(
            path=path, sha256=digest, size=cand.size, mtime_ns=cand.mtime_ns, sample_id=self.sample_fn(path),
            detected_at=cand.detected_at, ready_at=time.time(), ready_mono=time.monotonic(),
            how="renamed" if cand.renamed else "settled", error=error, reactivate=reactivate,
            detected_mono=cand.detected_mono, ctime_ns=st.st_ctime_ns if st is not None else None,
            inode=st.st_ino if st is not None else None,
        )


def _is_regular(st: os.stat_result) -> bool:
    import stat as _stat

    return _stat.S_ISREG(st.st_mode)
