"""``leukedge preprocess``: decode, stain-normalise and resize images into a dataset cache.

The cache (docs/architecture.md section 3) is a folder with

- ``images.npy``: uint8 ``(N, size, size, 3)`` NHWC, memory-mappable; failed rows are zero;
- ``manifest.csv``: ``index,path,label,class_name,subject,fold,split,status,error,sha256,stain_fallback``;
- ``config.json``: the :class:`~leukedge.config.PreprocessConfig` (layout nhwc, dtype uint8);
- ``cache.json``: ``{"version", "pixel_hash", "synthetic", "created", "sources", ...}``, written last:
  a folder without it is not a complete cache.

Public API:

- :func:`run_preprocess` ``(sources, out_dir, config=None, threads=0, batch_size=64, split_by="auto",
  val_fold=None, val_fraction=0.2, seed=0, reuse=True, progress=True, console=None) -> PreprocessSummary``
- :func:`load_cache` ``(path) -> Cache`` with ``images``, ``manifest``, ``config``, ``meta`` and helpers
  ``ok_indices()``, ``indices(split=...)``, ``labels``, ``subjects``, ``splits``, ``folds``, ``synthetic``.
- :func:`load_config_source` ``(path) -> PreprocessConfig``: a config.json, a bundle.json / bundle folder
  (its ``"preprocess"`` key) or a cache folder.
- :func:`fit_stain_reference` ``(paths, config) -> PreprocessConfig`` (stain params fitted on reference images).
- Click command :data:`preprocess_cmd`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._util import NULL_REPORTER, Reporter
from ._util import load_native as _native
from ._version import __version__
from .artifacts import CACHE_VERSION, Cache, load_cache, write_manifest

# re-exported: the cache readers used to live here
from .artifacts import MANIFEST_FIELDS as MANIFEST_FIELDS
from .artifacts import load_config_source as load_config_source
from .artifacts import read_manifest as read_manifest
from .config import PreprocessConfig
from .data import Record, assign_splits, discover, file_sha256, is_synthetic

TMP_DIR = ".tmp"


def cache_config(config: PreprocessConfig | None) -> PreprocessConfig:
    """The config a dataset cache is written with: the given pixel settings, NHWC uint8."""
    return (config or PreprocessConfig()).replace(layout="nhwc", dtype="uint8")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def fit_stain_reference(paths: Sequence[str | os.PathLike], config: PreprocessConfig) -> PreprocessConfig:
    """Fit stain parameters (``_native.fit_stain``) on the reference images found under ``paths``
    and return ``config`` with ``stain.params`` set. Unreadable reference images are an error."""
    if config.stain.method == "none":
        raise ValueError("--stain-reference needs a stain method (macenko or reinhard), not 'none'")
    native = _native()
    records = discover(paths)
    if not records:
        raise ValueError(f"no reference images found in {', '.join(map(str, paths))}")
    images = []
    for r in records:
        try:
            images.append(native.decode(str(r.path), config.max_pixels))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"stain reference {r.path}: {exc}") from exc
    stain_cfg = config.replace(stain=dataclasses.replace(config.stain, params=None))
    params = json.loads(native.fit_stain(images, stain_cfg.to_native_json()))
    return config.replace(stain=dataclasses.replace(config.stain, params=params))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
@dataclass
class PreprocessSummary:
    out_dir: Path
    n_total: int = 0
    n_ok: int = 0
    n_failed: int = 0
    n_reused: int = 0
    n_computed: int = 0
    n_resumed: int = 0  # rows finished by an earlier run that was killed (taken from OUT/.tmp)
    n_stain_fallback: int = 0
    n_rejected: int = 0  # frames the cell quality gate rejected (not in the training rows; listed in failures)
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> {"ok", "failed"}
    splits: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    pixel_hash: str = ""
    synthetic: bool = False
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir)
        d["failures"] = [{"path": p, "error": e} for p, e in self.failures]
        return d


def _old_rows(out_dir: Path, cfg: PreprocessConfig) -> tuple[Cache | None, dict[str, int]]:
    """An existing complete cache in ``out_dir`` with the same pixel settings, and sha256 -> row."""
    if not (out_dir / "cache.json").is_file():
        return None, {}
    try:
        old = load_cache(out_dir)
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring the existing cache in {out_dir}: {exc}", stacklevel=3)
        return None, {}
    if old.config.pixel_hash() != cfg.pixel_hash():
        return None, {}
    rows = {r["sha256"]: i for i, r in enumerate(old.manifest) if r["status"] == "ok" and r["sha256"]}
    return old, rows


PARTIAL_FILE = "partial.json"
PROGRESS_FILE = "progress.jsonl"


def _partial_key(cfg: PreprocessConfig, records: Sequence[Record]) -> str:
    """Identity of one run's work: pixel settings, size and every (path, sha256) in order."""
    h = hashlib.sha256(f"{CACHE_VERSION}\n{cfg.pixel_hash()}\n{cfg.size}\n".encode())
    for r in records:
        h.update(os.fsencode(r.path.resolve()) + f"\t{r.sha256}\n".encode())
    return h.hexdigest()


def _resume_partial(tmp: Path, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray | None, dict[int, dict[str, Any]]]:
    """The half-written ``images.npy`` and finished rows of a killed run in ``tmp``, if it did exactly
    this work (same files, contents and settings); else ``(None, {})``."""
    try:
        meta = json.loads((tmp / PARTIAL_FILE).read_text())
        if meta.get("key") != key:
            return None, {}
        images = np.load(tmp / "images.npy", mmap_mode="r+")
    except (OSError, ValueError):
        return None, {}
    if images.shape != shape or images.dtype != np.uint8:
        return None, {}
    done: dict[int, dict[str, Any]] = {}
    try:
        with open(tmp / PROGRESS_FILE) as f:
            for line in f:
                try:
                    d = json.loads(line)
                    i = int(d["i"])
                except (ValueError, KeyError, TypeError):
                    break  # a line cut by the kill: everything after it is redone
                if 0 <= i < shape[0]:
                    done[i] = {"ok": bool(d.get("ok")), "error": d.get("error"), "stain_fallback": bool(d.get("stain_fallback")),
                               "rejected": d.get("rejected")}
    except OSError:
        pass
    return images, done


def _check_free_space(out: Path, nbytes: int) -> None:
    """Refuse to start when ``images.npy`` cannot fit: a memory-mapped file on a full disk fails with
    SIGBUS halfway through, not with an error message."""
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return
    if nbytes > free:
        raise ValueError(f"{out}: not enough free disk space for the cache: images.npy needs {nbytes / 1e9:.2f} GB, "
                         f"{free / 1e9:.2f} GB free")


def _synthetic_flags(records: Sequence[Record]) -> int:
    by_dir: dict[Path, bool] = {}
    n = 0
    for r in records:
        d = r.path.parent
        if d not in by_dir:
            by_dir[d] = is_synthetic(d)
        n += by_dir[d]
    return n


def run_preprocess(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PreprocessConfig | None = None,
    threads: int = 0,
    *,
    batch_size: int = 64,
    split_by: str = "auto",
    val_fold: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    reuse: bool = True,
    progress: bool = True,
    reporter: Reporter | None = None,
) -> PreprocessSummary:
    """Preprocess every image found under ``sources`` into a dataset cache in ``out_dir``.

    Files are found with :func:`leukedge.data.discover` and split with
    :func:`leukedge.data.assign_splits` (``split_by``: auto|fold|subject|image|none). Work runs in
    chunks of ``batch_size`` through ``leukedge._native.Pipeline.run`` writing straight into
    the ``images.npy`` memmap. Rows of an existing cache in ``out_dir`` with the same pixel hash and
    the same file sha256 are copied instead of recomputed. Everything is written to
    ``out_dir/.tmp`` first and moved into place at the end, ``cache.json`` last. Per-file failures
    never stop the run: they are zero rows with ``status=error`` and listed in the summary.
    ``progress``: report the images done to ``reporter`` (the CLI passes one with a progress bar).
    """
    t0 = time.perf_counter()
    native = _native()
    cfg = cache_config(config)
    out = Path(out_dir)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    records = discover(sources)
    if not records:
        raise ValueError(f"no images found in {', '.join(map(str, sources))}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    max_bytes = native.max_file_bytes(cfg.max_pixels) if hasattr(native, "max_file_bytes") else None
    read_errors = _hash_files(records, max_bytes)
    splits = assign_splits(records, strategy=split_by, val_fold=val_fold, val_fraction=val_fraction, seed=seed)

    out.mkdir(parents=True, exist_ok=True)
    old, old_rows = _old_rows(out, cfg) if reuse else (None, {})
    work = _Work.open(out / TMP_DIR, cfg, records, read_errors, reuse)
    rep = reporter if progress and reporter is not None else NULL_REPORTER
    _fill(work, native, cfg, batch_size, old, old_rows, threads, rep)
    del old  # release the old memmap before replacing its file

    n_syn = _synthetic_flags(records)
    manifest, summary = _manifest_and_summary(out, cfg, records, work, splits, n_syn > 0)
    split = {"by": split_by, "val_fold": val_fold, "val_fraction": val_fraction, "seed": seed}
    _commit_cache(out, work.tmp, manifest, cfg, _cache_meta(cfg, sources, len(records), summary.n_ok, n_syn, split))
    summary.elapsed_s = time.perf_counter() - t0
    return summary


def _fill(work: _Work, native: Any, cfg: PreprocessConfig, batch_size: int, old: Cache | None, old_rows: dict[str, int],
          threads: int, rep: Reporter) -> None:
    """Every row of ``work`` through the Rust pipeline, in chunks of ``batch_size``."""
    n = len(work.records)
    try:
        pipe = native.Pipeline(cfg.to_native_json())  # parsed, validated, tables built: once
        with rep.progress("preprocess", total=n) as task:
            for start in range(0, n, batch_size):
                end = min(n, start + batch_size)
                work.run_chunk(native, pipe, start, end, old, old_rows, threads)
                task.advance(end - start)
    except BaseException:
        # Interrupted or failed: never leave anything that could pass for a cache. The previous
        # complete cache in OUT (if any) is untouched. (Only a kill -9 leaves OUT/.tmp, which the next
        # run with the same files and settings resumes.)
        work.abandon()
        raise
    work.finish()


def _cache_meta(cfg: PreprocessConfig, sources: Sequence[str | os.PathLike], n_images: int, n_ok: int, n_syn: int,
                split: dict[str, Any]) -> dict[str, Any]:
    """``cache.json``: format version, pixel hash, synthetic flags, sources, counts, split settings, version."""
    return {
        "version": CACHE_VERSION, "pixel_hash": cfg.pixel_hash(), "synthetic": n_syn > 0, "synthetic_files": n_syn,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": [str(Path(s).resolve()) if not any(c in str(s) for c in "*?[") else str(s) for s in sources],
        "n_images": n_images, "n_ok": n_ok, "split": split, "leukedge_version": __version__,
    }


def _hash_files(records: Sequence[Record], max_bytes: int | None) -> dict[int, str]:
    """Fill ``records[i].sha256`` (8 threads); returns ``{i: reason}`` for the files that cannot be read."""
    read_errors: dict[int, str] = {}

    def sha(i: int) -> str | None:
        try:  # special files (FIFO, /dev/zero) and oversized files are refused unread
            return file_sha256(records[i].path, max_bytes=max_bytes)
        except OSError as exc:
            read_errors[i] = f"cannot read file: {exc.strerror or exc}"
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, h in enumerate(pool.map(sha, range(len(records)))):
            records[i].sha256 = h
    return read_errors


@dataclass
class _Work:
    """The cache being written in ``OUT/.tmp``: the ``images.npy`` memmap, each row's status and the
    progress log that makes a killed run resumable."""

    tmp: Path
    cfg: PreprocessConfig
    records: Sequence[Record]
    read_errors: dict[int, str]
    images: Any
    status: list[dict[str, Any]]
    resumed: dict[int, dict[str, Any]]
    log: Any = None
    n_reused: int = 0

    @classmethod
    def open(cls, tmp: Path, cfg: PreprocessConfig, records: Sequence[Record], read_errors: dict[int, str],
             reuse: bool) -> _Work:
        """Resume the half-written cache of a killed run doing exactly this work, else start a fresh one."""
        n, S = len(records), cfg.size
        status: list[dict[str, Any]] = [{"ok": False, "error": None, "stain_fallback": False} for _ in range(n)]
        key = _partial_key(cfg, records)
        images, resumed = _resume_partial(tmp, key, (n, S, S, 3)) if reuse else (None, {})
        if images is None:
            if tmp.exists():
                shutil.rmtree(tmp)
            _check_free_space(tmp.parent, n * S * S * 3)
            tmp.mkdir()
            images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, S, S, 3))
            (tmp / PARTIAL_FILE).write_text(json.dumps({"key": key, "n": n, "size": S}) + "\n")
        for i, st in resumed.items():
            status[i] = st
        work = cls(tmp, cfg, records, read_errors, images, status, resumed)
        work.log = open(tmp / PROGRESS_FILE, "a")
        return work

    def _reuse_or_todo(self, start: int, end: int, old: Cache | None, old_rows: dict[str, int]) -> list[int]:
        """Rows of ``[start, end)`` still to compute; resumed, unreadable and reusable rows are settled here."""
        todo: list[int] = []
        for i in range(start, end):
            if i in self.resumed:  # finished by an earlier, killed run (rows flushed before logged)
                continue
            if i in self.read_errors:
                self.status[i]["error"] = self.read_errors[i]
                self.images[i] = 0
                continue
            j = old_rows.get(self.records[i].sha256 or "")
            if old is not None and j is not None:
                self.images[i] = old.images[j]
                self.status[i] = {"ok": True, "error": None, "stain_fallback": old.manifest[j]["stain_fallback"]}
                self.n_reused += 1
            else:
                todo.append(i)
        return todo

    def run_chunk(self, native: Any, pipe: Any, start: int, end: int, old: Cache | None, old_rows: dict[str, int],
                  threads: int) -> None:
        """Rows ``[start, end)`` through ``pipe`` (a ``leukedge._native.Pipeline``) into the memmap, then logged."""
        todo = self._reuse_or_todo(start, end, old, old_rows)
        if todo:
            S = self.cfg.size
            contiguous = todo == list(range(start, end))
            target = self.images[start:end] if contiguous else np.zeros((len(todo), S, S, 3), np.uint8)
            items = [str(self.records[i].path) for i in todo]
            try:
                _, st = pipe.run(items, out=target, threads=threads)
            except Exception as exc:  # a settings problem (ConfigError) fails every file
                if isinstance(exc, getattr(native, "ConfigError", ())):
                    raise ValueError(f"the preprocessing settings were refused: {exc}") from exc
                raise ValueError(f"preprocessing failed for the whole batch starting at {items[0]}: {exc}") from exc
            if not contiguous:
                self.images[todo] = target
            for k, i in enumerate(todo):
                s = st[k]
                self.status[i] = {"ok": bool(s.get("ok")), "error": s.get("error"), "stain_fallback": bool(s.get("stain_fallback")),
                                  "rejected": s.get("rejected")}
                if not self.status[i]["ok"] and not self.status[i]["error"]:
                    self.status[i]["error"] = "failed (no reason given)"
        # Resumable after kill -9: the rows reach the disk first, then the log says they are done.
        done_rows = [i for i in range(start, end) if i not in self.resumed and i not in self.read_errors]
        if done_rows:
            self.images.flush()
            self.log.write("".join(json.dumps({"i": i, **self.status[i]}) + "\n" for i in done_rows))
            self.log.flush()
            os.fsync(self.log.fileno())

    def abandon(self) -> None:
        self.log.close()
        self.images = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self) -> None:
        self.log.close()
        self.images.flush()
        self.images = None


def _manifest_and_summary(out: Path, cfg: PreprocessConfig, records: Sequence[Record], work: _Work,
                          splits: Sequence[str | None], synthetic: bool) -> tuple[list[dict[str, Any]], PreprocessSummary]:
    n = len(records)
    manifest = []
    summary = PreprocessSummary(out_dir=out, n_total=n, n_reused=work.n_reused, pixel_hash=cfg.pixel_hash(),
                                synthetic=synthetic)
    for i, (r, s, sp) in enumerate(zip(records, work.status, splits)):
        # a frame the cell quality gate rejected is never trained on (status "rejected", the reason as error)
        rejected = bool(s["ok"] and s.get("rejected"))
        manifest.append({
            "index": i, "path": str(r.path.resolve()), "label": r.label, "class_name": r.class_name, "subject": r.subject,
            "fold": r.fold, "split": sp, "status": "rejected" if rejected else ("ok" if s["ok"] else "error"),
            "error": s.get("rejected") if rejected else s["error"],
            "sha256": r.sha256, "stain_fallback": bool(s["stain_fallback"]),
        })
        pc = summary.per_class.setdefault(r.class_name, {"ok": 0, "failed": 0})
        if rejected:
            summary.n_rejected += 1
            pc["failed"] += 1
            summary.failures.append((str(r.path), f"rejected: {s.get('rejected')}"))
        elif s["ok"]:
            summary.n_ok += 1
            pc["ok"] += 1
            summary.n_stain_fallback += bool(s["stain_fallback"])
        else:
            summary.n_failed += 1
            pc["failed"] += 1
            summary.failures.append((str(r.path), s["error"] or "failed"))
        summary.splits[sp or "-"] = summary.splits.get(sp or "-", 0) + 1
    summary.n_computed = n - work.n_reused - len(work.read_errors) - len(work.resumed)
    summary.n_resumed = len(work.resumed)
    return manifest, summary


def _commit_cache(out: Path, tmp: Path, manifest: list[dict[str, Any]], cfg: PreprocessConfig, meta: dict[str, Any]) -> None:
    """Write the small files into ``tmp``, then move everything into ``out``: first drop the completeness
    marker, then move the data files, then the marker (``cache.json`` last)."""
    for name in (PARTIAL_FILE, PROGRESS_FILE):
        (tmp / name).unlink(missing_ok=True)
    write_manifest(tmp / "manifest.csv", manifest)
    cfg.save(tmp / "config.json")
    (tmp / "cache.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "cache.json").unlink(missing_ok=True)
    for name in ("images.npy", "manifest.csv", "config.json"):
        os.replace(tmp / name, out / name)
    os.replace(tmp / "cache.json", out / "cache.json")
    shutil.rmtree(tmp, ignore_errors=True)
