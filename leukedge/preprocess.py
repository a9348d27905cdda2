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

import csv
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

import click
import numpy as np

from . import __version__
from .config import CROP_MODES, FILTERS, SQUARE_MODES, STAIN_METHODS, PreprocessConfig, StainConfig
from .data import SPLIT_STRATEGIES, Record, assign_splits, discover, file_sha256, is_synthetic

CACHE_VERSION = 1
MANIFEST_FIELDS = ("index", "path", "label", "class_name", "subject", "fold", "split", "status", "error", "sha256", "stain_fallback")
TMP_DIR = ".tmp"


def _native() -> Any:
    try:
        from . import _native as native  # type: ignore[attr-defined]
    except ImportError as exc:
        raise RuntimeError(
            "the Rust core leukedge._native is not built; install the package with `pip install -e .` "
            f"(needs a Rust toolchain and maturin): {exc}"
        ) from exc
    return native


def cache_config(config: PreprocessConfig | None) -> PreprocessConfig:
    """The config a dataset cache is written with: the given pixel settings, NHWC uint8."""
    return (config or PreprocessConfig()).replace(layout="nhwc", dtype="uint8")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _opt_int(v: str) -> int | None:
    v = (v or "").strip()
    return int(v) if v not in ("", "None") else None


def _opt_str(v: str) -> str | None:
    v = v if v is not None else ""
    return v if v not in ("", "None") else None


def _typed_row(row: dict[str, str]) -> dict[str, Any]:
    return {
        "index": int(row["index"]),
        "path": row["path"],
        "label": int(row["label"]),
        "class_name": row["class_name"],
        "subject": _opt_str(row["subject"]),
        "fold": _opt_int(row["fold"]),
        "split": _opt_str(row["split"]),
        "status": row["status"],
        "error": _opt_str(row["error"]),
        "sha256": _opt_str(row["sha256"]),
        "stain_fallback": str(row["stain_fallback"]).strip().lower() in ("1", "true", "yes"),
    }


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``manifest.csv`` into typed dicts (label/index int, fold int|None, stain_fallback bool)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(MANIFEST_FIELDS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks column(s) {', '.join(sorted(missing))}")
        return [_typed_row(r) for r in reader]


def write_manifest(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(MANIFEST_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in MANIFEST_FIELDS})


@dataclass
class Cache:
    """A loaded dataset cache. ``images`` is a read-only memmap ``(N, S, S, 3)`` uint8."""

    path: Path
    images: np.ndarray
    manifest: list[dict[str, Any]]
    config: PreprocessConfig
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def labels(self) -> np.ndarray:
        """int64 labels per row (1 = all, 0 = hem, -1 unknown)."""
        return np.array([r["label"] for r in self.manifest], dtype=np.int64)

    @property
    def subjects(self) -> list[str | None]:
        return [r["subject"] for r in self.manifest]

    @property
    def splits(self) -> list[str | None]:
        return [r["split"] for r in self.manifest]

    @property
    def folds(self) -> list[int | None]:
        return [r["fold"] for r in self.manifest]

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self.manifest]

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic", False))

    @property
    def pixel_hash(self) -> str:
        return self.config.pixel_hash()

    def ok_indices(self) -> np.ndarray:
        """Indices of rows that were processed successfully."""
        return np.array([i for i, r in enumerate(self.manifest) if r["status"] == "ok"], dtype=np.int64)

    def indices(self, split: str | None = None, *, ok: bool = True, labelled: bool = False) -> np.ndarray:
        """Row indices filtered by split ("train"/"val"/"test"; None = any), status ok, label known."""
        out = []
        for i, r in enumerate(self.manifest):
            if split is not None and r["split"] != split:
                continue
            if ok and r["status"] != "ok":
                continue
            if labelled and r["label"] not in (0, 1):
                continue
            out.append(i)
        return np.array(out, dtype=np.int64)


def load_cache(path: str | os.PathLike) -> Cache:
    """Load a dataset cache folder (or its ``cache.json``) written by ``leukedge preprocess``.

    Raises ``FileNotFoundError`` for a folder without ``cache.json`` (not a cache, or an interrupted
    run) and ``ValueError`` when the files disagree with each other.
    """
    p = Path(path)
    if p.is_file() and p.name == "cache.json":
        p = p.parent
    meta_file = p / "cache.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{p}: not a complete dataset cache (no cache.json); run `leukedge preprocess ... -o {p}`")
    meta = json.loads(meta_file.read_text())
    config = PreprocessConfig.load(p / "config.json")
    manifest = read_manifest(p / "manifest.csv")
    images = np.load(p / "images.npy", mmap_mode="r")
    if images.ndim != 4 or images.shape[0] != len(manifest) or images.shape[1:] != (config.size, config.size, 3) or images.dtype != np.uint8:
        raise ValueError(
            f"{p}: images.npy {images.shape} {images.dtype} does not match manifest ({len(manifest)} rows) "
            f"and config size {config.size}"
        )
    if meta.get("pixel_hash") != config.pixel_hash():
        raise ValueError(f"{p}: cache.json pixel_hash does not match config.json; the cache was modified by hand")
    return Cache(path=p, images=images, manifest=manifest, config=config, meta=meta)


def load_config_source(path: str | os.PathLike) -> PreprocessConfig:
    """Read a PreprocessConfig from a ``config.json``, a ``bundle.json`` (its ``"preprocess"`` key),
    a model bundle folder or a dataset cache folder."""
    p = Path(path)
    if p.is_dir():
        for name in ("bundle.json", "config.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise ValueError(f"{path}: folder holds neither bundle.json nor config.json")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: cannot read a preprocessing config: {exc}") from exc
    if isinstance(d, dict) and isinstance(d.get("preprocess"), dict):
        d = d["preprocess"]
    try:
        return PreprocessConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{p}: not a valid preprocessing config: {exc}") from exc


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
        h.update(f"{r.path.resolve()}\t{r.sha256}\n".encode())
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
                    done[i] = {"ok": bool(d.get("ok")), "error": d.get("error"), "stain_fallback": bool(d.get("stain_fallback"))}
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
    console: Any = None,
) -> PreprocessSummary:
    """Preprocess every image found under ``sources`` into a dataset cache in ``out_dir``.

    Files are found with :func:`leukedge.data.discover` and split with
    :func:`leukedge.data.assign_splits` (``split_by``: auto|fold|subject|image|none). Work runs in
    chunks of ``batch_size`` through ``leukedge._native.Pipeline.run`` writing straight into
    the ``images.npy`` memmap. Rows of an existing cache in ``out_dir`` with the same pixel hash and
    the same file sha256 are copied instead of recomputed. Everything is written to
    ``out_dir/.tmp`` first and moved into place at the end, ``cache.json`` last. Per-file failures
    never stop the run: they are zero rows with ``status=error`` and listed in the summary.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
    console = console or Console(stderr=True)

    n = len(records)
    read_errors: dict[int, str] = {}

    max_bytes = native.max_file_bytes(cfg.max_pixels) if hasattr(native, "max_file_bytes") else None

    def sha(i: int) -> str | None:
        try:  # special files (FIFO, /dev/zero) and oversized files are refused unread
            return file_sha256(records[i].path, max_bytes=max_bytes)
        except OSError as exc:
            read_errors[i] = f"cannot read file: {exc.strerror or exc}"
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, h in enumerate(pool.map(sha, range(n))):
            records[i].sha256 = h
    splits = assign_splits(records, strategy=split_by, val_fold=val_fold, val_fraction=val_fraction, seed=seed)

    out.mkdir(parents=True, exist_ok=True)
    old, old_rows = _old_rows(out, cfg) if reuse else (None, {})
    tmp = out / TMP_DIR
    S = cfg.size
    status: list[dict[str, Any]] = [{"ok": False, "error": None, "stain_fallback": False} for _ in range(n)]
    key = _partial_key(cfg, records)
    images, resumed = _resume_partial(tmp, key, (n, S, S, 3)) if reuse else (None, {})
    if images is None:
        if tmp.exists():
            shutil.rmtree(tmp)
        _check_free_space(out, n * S * S * 3)
        tmp.mkdir()
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, S, S, 3))
        (tmp / PARTIAL_FILE).write_text(json.dumps({"key": key, "n": n, "size": S}) + "\n")
    for i, st in resumed.items():
        status[i] = st
    progress_log = open(tmp / PROGRESS_FILE, "a")
    n_reused = 0
    n_resumed = len(resumed)
    pipe = native.Pipeline(cfg.to_native_json())  # parsed, validated, tables built: once

    try:
        prog = Progress(TextColumn("[bold]preprocess"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=not progress)
        with prog:
            task = prog.add_task("images", total=n)
            for start in range(0, n, batch_size):
                end = min(n, start + batch_size)
                todo: list[int] = []
                for i in range(start, end):
                    if i in resumed:  # finished by an earlier, killed run (rows flushed before logged)
                        continue
                    if i in read_errors:
                        status[i]["error"] = read_errors[i]
                        images[i] = 0
                        continue
                    j = old_rows.get(records[i].sha256 or "")
                    if old is not None and j is not None:
                        images[i] = old.images[j]
                        status[i] = {"ok": True, "error": None, "stain_fallback": old.manifest[j]["stain_fallback"]}
                        n_reused += 1
                    else:
                        todo.append(i)
                if todo:
                    contiguous = todo == list(range(start, end))
                    target = images[start:end] if contiguous else np.zeros((len(todo), S, S, 3), np.uint8)
                    items = [str(records[i].path) for i in todo]
                    try:
                        _, st = pipe.run(items, out=target, threads=threads)
                    except Exception as exc:  # a settings problem (ConfigError) fails every file
                        if isinstance(exc, getattr(native, "ConfigError", ())):
                            raise ValueError(f"the preprocessing settings were refused: {exc}") from exc
                        raise ValueError(f"preprocessing failed for the whole batch starting at {items[0]}: {exc}") from exc
                    if not contiguous:
                        images[todo] = target
                    for k, i in enumerate(todo):
                        s = st[k]
                        status[i] = {"ok": bool(s.get("ok")), "error": s.get("error"), "stain_fallback": bool(s.get("stain_fallback"))}
                        if not status[i]["ok"] and not status[i]["error"]:
                            status[i]["error"] = "failed (no reason given)"
                # Resumable after kill -9: the rows reach the disk first, then the log says they are done.
                done_rows = [i for i in range(start, end) if i not in resumed and i not in read_errors]
                if done_rows:
                    images.flush()
                    progress_log.write("".join(json.dumps({"i": i, **status[i]}) + "\n" for i in done_rows))
                    progress_log.flush()
                    os.fsync(progress_log.fileno())
                prog.update(task, advance=end - start)
    except BaseException:
        # Interrupted or failed: never leave anything that could pass for a cache. The previous
        # complete cache in OUT (if any) is untouched. (Only a kill -9 leaves OUT/.tmp, which the next
        # run with the same files and settings resumes.)
        progress_log.close()
        del images
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress_log.close()
    images.flush()
    del images
    if old is not None:
        del old  # release the old memmap before replacing its file

    n_syn = _synthetic_flags(records)
    manifest = []
    summary = PreprocessSummary(out_dir=out, n_total=n, n_reused=n_reused, pixel_hash=cfg.pixel_hash(), synthetic=n_syn > 0)
    for i, (r, s, sp) in enumerate(zip(records, status, splits)):
        manifest.append({
            "index": i, "path": str(r.path.resolve()), "label": r.label, "class_name": r.class_name, "subject": r.subject,
            "fold": r.fold, "split": sp, "status": "ok" if s["ok"] else "error", "error": s["error"],
            "sha256": r.sha256, "stain_fallback": bool(s["stain_fallback"]),
        })
        pc = summary.per_class.setdefault(r.class_name, {"ok": 0, "failed": 0})
        if s["ok"]:
            summary.n_ok += 1
            pc["ok"] += 1
            summary.n_stain_fallback += bool(s["stain_fallback"])
        else:
            summary.n_failed += 1
            pc["failed"] += 1
            summary.failures.append((str(r.path), s["error"] or "failed"))
        summary.splits[sp or "-"] = summary.splits.get(sp or "-", 0) + 1
    summary.n_computed = n - n_reused - len(read_errors) - n_resumed
    summary.n_resumed = n_resumed

    for name in (PARTIAL_FILE, PROGRESS_FILE):
        (tmp / name).unlink(missing_ok=True)
    write_manifest(tmp / "manifest.csv", manifest)
    cfg.save(tmp / "config.json")
    meta = {
        "version": CACHE_VERSION,
        "pixel_hash": cfg.pixel_hash(),
        "synthetic": n_syn > 0,
        "synthetic_files": n_syn,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": [str(Path(s).resolve()) if not any(c in str(s) for c in "*?[") else str(s) for s in sources],
        "n_images": n,
        "n_ok": summary.n_ok,
        "split": {"by": split_by, "val_fold": val_fold, "val_fraction": val_fraction, "seed": seed},
        "leukedge_version": __version__,
    }
    (tmp / "cache.json").write_text(json.dumps(meta, indent=2) + "\n")

    # Commit: first drop the completeness marker, then move the data files, then the marker.
    (out / "cache.json").unlink(missing_ok=True)
    for name in ("images.npy", "manifest.csv", "config.json"):
        os.replace(tmp / name, out / name)
    os.replace(tmp / "cache.json", out / "cache.json")
    shutil.rmtree(tmp, ignore_errors=True)
    summary.elapsed_s = time.perf_counter() - t0
    return summary


def print_summary(summary: PreprocessSummary, console: Any) -> None:
    from rich.table import Table

    if summary.synthetic:
        console.print("[bold magenta]SYNTHETIC DATA[/] in this cache (generated cells, not real ones)")
    t = Table(title=f"Dataset cache {summary.out_dir}")
    t.add_column("")
    t.add_column("images", justify="right")
    t.add_row("total", str(summary.n_total))
    t.add_row("[green]ok[/]", str(summary.n_ok))
    t.add_row("[red]failed[/]" if summary.n_failed else "failed", str(summary.n_failed))
    t.add_row("reused from the previous run", str(summary.n_reused))
    if summary.n_resumed:
        t.add_row("resumed from an interrupted run", str(summary.n_resumed))
    t.add_row("computed", str(summary.n_computed))
    t.add_row("stain fallbacks (too little foreground / fit failed)", str(summary.n_stain_fallback))
    for cls, c in sorted(summary.per_class.items()):
        t.add_row(f"class {cls}", f"{c['ok']} ok" + (f", {c['failed']} failed" if c["failed"] else ""))
    for sp, c in sorted(summary.splits.items()):
        t.add_row(f"split {sp}", str(c))
    console.print(t)
    console.print(f"pixel hash {summary.pixel_hash[:12]}, {summary.elapsed_s:.1f} s")
    if summary.failures:
        # Plain lines, never wrapped, so a path can be copied (and grepped) whole.
        console.print(f"[red]{len(summary.failures)} file(s) failed:[/]")
        for p, e in summary.failures[:200]:
            console.print(f"  {p}: {e}", markup=False, highlight=False, soft_wrap=True)
        if len(summary.failures) > 200:
            console.print(f"  ... and {len(summary.failures) - 200} more (status=error in manifest.csv)")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
# option name -> how it maps into the config (all pixel settings; conflict with --config)
_PIXEL_OPTIONS = ("stain", "stain_io", "stain_alpha", "stain_beta", "black_threshold", "white_threshold", "min_foreground",
                  "stain_reference", "crop", "crop_margin", "square", "size", "filter", "mean", "std")


def _config_from_options(base: PreprocessConfig, o: dict[str, Any]) -> PreprocessConfig:
    stain = dataclasses.asdict(base.stain)
    for opt, key in (("stain", "method"), ("stain_io", "io"), ("stain_alpha", "alpha"), ("stain_beta", "beta"),
                     ("black_threshold", "black_threshold"), ("white_threshold", "white_threshold"),
                     ("min_foreground", "min_foreground")):
        if o.get(opt) is not None:
            stain[key] = o[opt]
    changes: dict[str, Any] = {"stain": StainConfig(**stain)}
    for opt in ("crop", "crop_margin", "square", "size", "filter", "max_pixels"):
        if o.get(opt) is not None:
            changes[opt] = o[opt]
    for opt in ("mean", "std"):
        if o.get(opt):
            changes[opt] = tuple(o[opt])
    return base.replace(**changes)


@click.command("preprocess")
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Output cache folder.")
@click.option("--config", "config_file", type=click.Path(exists=True),
              help="Use exactly this preprocessing: a config.json, a bundle.json / model bundle folder (its "
                   "\"preprocess\" settings) or a dataset cache folder. Cannot be combined with pixel options.")
@click.option("--stain", type=click.Choice(STAIN_METHODS), help="Stain normalisation [default: macenko].")
@click.option("--stain-reference", multiple=True, metavar="PATH", help="Fit stain parameters on these images (folders, files, globs; repeatable).")
@click.option("--stain-io", type=float, help="Transmitted light intensity Io [default: 240].")
@click.option("--stain-alpha", type=float, help="Macenko angle percentile alpha [default: 1].")
@click.option("--stain-beta", type=float, help="Macenko optical-density threshold beta [default: 0.15].")
@click.option("--black-threshold", type=click.IntRange(0, 254), help="Background if max(R,G,B) <= this [default: 10].")
@click.option("--white-threshold", type=click.IntRange(1, 255), help="Also background if min(R,G,B) >= this [default: off].")
@click.option("--min-foreground", type=click.IntRange(0), help="Fewer foreground pixels -> stain fallback [default: 500].")
@click.option("--crop", type=click.Choice(CROP_MODES), help="Crop to the foreground bounding box [default: bbox].")
@click.option("--crop-margin", type=click.IntRange(0), help="Margin around the bounding box in px [default: 8].")
@click.option("--square", type=click.Choice(SQUARE_MODES), help="Make non-square images square by padding or centre crop [default: pad].")
@click.option("--size", type=click.IntRange(8, 4096), help="Output width and height [default: 224].")
@click.option("--filter", "filter_", type=click.Choice(FILTERS), help="Resize filter [default: bilinear].")
@click.option("--mean", type=float, nargs=3, help="Normalisation mean R G B (stored for training) [default: ImageNet].")
@click.option("--std", type=float, nargs=3, help="Normalisation std R G B [default: ImageNet].")
@click.option("--max-pixels", type=click.IntRange(1), help="Refuse images with more pixels [default: 64000000].")
@click.option("--split-by", type=click.Choice(SPLIT_STRATEGIES), default="auto", show_default=True,
              help="auto: official folds when there are several, else by subject. image: image-level (leaks patients!).")
@click.option("--val-fold", type=int, help="Official fold used for validation with --split-by fold/auto [default: the last].")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.2, show_default=True,
              help="Share of subjects in validation with --split-by subject.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subject split.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="Worker threads (0 = all cores).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per native call.")
@click.option("--allow-errors", is_flag=True, help="Exit 0 even if some files failed (they are zero rows with status=error).")
@click.option("--no-reuse", is_flag=True, help="Recompute everything instead of reusing rows of an existing cache in OUT.")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="Also write the summary as JSON.")
@click.pass_context
def preprocess_cmd(ctx: click.Context, sources: tuple[str, ...], out: str, config_file: str | None, **opts: Any) -> None:
    """Decode, stain-normalise and resize images from SOURCES into a dataset cache OUT.

    SOURCES are folders (Kaggle / original C-NMC / generic <class>/ layouts), files, globs or list
    files. OUT gets images.npy (uint8 NHWC), manifest.csv, config.json and cache.json. Re-running
    into the same OUT reuses rows whose file and settings are unchanged.
    """
    from rich.console import Console

    opts["filter"] = opts.pop("filter_")
    console = Console()
    given = [k for k in _PIXEL_OPTIONS if ctx.get_parameter_source(k if k != "filter" else "filter_") == click.core.ParameterSource.COMMANDLINE]
    try:
        if config_file:
            if given:
                names = ", ".join("--" + k.replace("_", "-") for k in given)
                raise click.UsageError(f"{names} cannot be combined with --config {config_file}: the config is used exactly")
            cfg = load_config_source(config_file)
            if opts.get("max_pixels"):
                cfg = cfg.replace(max_pixels=opts["max_pixels"])
        else:
            cfg = _config_from_options(PreprocessConfig(), opts)
            if opts.get("stain_reference"):
                cfg = fit_stain_reference(list(opts["stain_reference"]), cfg)
                console.print(f"Fitted {cfg.stain.method} stain parameters on the reference images: {json.dumps(cfg.stain.params)}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = run_preprocess(
                list(sources), out, cfg, threads=opts["threads"], batch_size=opts["batch_size"], split_by=opts["split_by"],
                val_fold=opts["val_fold"], val_fraction=opts["val_fraction"], seed=opts["seed"], reuse=not opts["no_reuse"],
                console=Console(stderr=True),
            )
        for w in caught:
            console.print(f"[bold yellow]warning:[/] {w.message}")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # a full or read-only output disk
        raise click.ClickException(f"cannot write the cache in {out}: {exc.strerror or exc}"
                                   + (f" ({exc.filename})" if exc.filename else "")) from exc
    print_summary(summary, console)
    if opts.get("summary_json"):
        Path(opts["summary_json"]).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    if summary.n_failed and not opts["allow_errors"]:
        console.print(f"[red]{summary.n_failed} file(s) failed[/] (the cache was written with them as zero rows, "
                      "status=error); pass --allow-errors to accept this.")
        ctx.exit(1)
