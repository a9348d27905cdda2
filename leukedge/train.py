"""Train a classifier on a preprocessed dataset cache.

Recipe: subject-disjoint validation (official folds when the cache has several, otherwise a
subject-grouped, class-stratified split), on-the-fly augmentation in torch (flips, 90° and small
free rotations, brightness / colour / saturation jitter, Gaussian noise on the cell only),
class-weighted cross-entropy, AdamW with linear warm-up and cosine decay, AMP on CUDA, early
stopping on validation weighted F1, last + best checkpoints (safetensors) and ``--resume``.

Inputs are normalised exactly like the Rust core (``(u8/255 - mean)/std``, see
:func:`leukedge.config.normalize_uint8`), so the trained model sees the same numbers at inference.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import distributed as _ddp  # [ddp] torchrun / DistributedDataParallel hooks (no-ops in one process)
from ._util import NULL_REPORTER, PlainReporter, Reporter, atomic_write_text, callable_module, format_duration
from ._util import as_int as _as_int
from ._util import atomic_write_json as _write_json
from .config import PreprocessConfig
from .data.splits import make_split as make_split
from .data.splits import usable_rows as usable_rows
from .training.recipe import (  # re-exported until the module is split up
    AUGMENT_MODES as AUGMENT_MODES,
)
from .training.recipe import (
    RECIPE_FIELDS,
    TEST_TIME_FIELDS,
    TrainConfig,
    recipe_of,
)
from .training.recipe import RECIPES_DIR as RECIPES_DIR
from .training.recipe import load_recipe as load_recipe
from .training.recipe import resolve_recipe as resolve_recipe
from .training.recipe import shipped_recipes as shipped_recipes

SPLIT_FILE = "split.json"
#: Indices into the 8 dihedral views (:func:`leukedge.models.dihedral_views` with "d4") used by each TTA mode.
TTA_VIEW_INDEX = {"none": (0,), "flip": (0, 4), "d4": tuple(range(8))}
CKPT_DIR = "checkpoints"


@dataclass
class TrainResult:
    out_dir: Path
    bundle_path: Path
    best_epoch: int
    best_val_f1: float
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    split: dict[str, Any]
    val_indices: list[int] = field(default_factory=list)
    val_prob: np.ndarray | None = None  # P(all) of the kept model (its test-time computation) per validation row


# ----------------------------------------------------------------------------------------
# augmentation / normalisation (torch, on whole batches)
# ----------------------------------------------------------------------------------------
def to_float01(x_u8: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """uint8 NHWC -> float32 NCHW in [0, 1] (``u8 / 255`` exactly like the Rust core)."""
    import torch

    return x_u8.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def normalize01(x: "torch.Tensor", cfg: PreprocessConfig) -> "torch.Tensor":  # noqa: F821
    import torch

    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_batch(x: "torch.Tensor", g: "torch.Generator", black_threshold: int = 10,  # noqa: F821
                  dihedral_only: bool = False) -> "torch.Tensor":  # noqa: F821
    """Random flips, 90° rotations, small free rotation/scale, brightness / colour / saturation jitter
    and Gaussian noise for a float NCHW batch in [0, 1].  Photometric changes are multiplicative so
    the black background stays black, and noise is only added to the cell (non-black pixels).
    ``dihedral_only``: just the flips and 90° rotations (the 8 symmetries of the square)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    if n == 0:
        return x
    x = x.clone()
    flip_h = torch.rand(n, generator=g) < 0.5
    x[flip_h] = x[flip_h].flip(-1)
    flip_v = torch.rand(n, generator=g) < 0.5
    x[flip_v] = x[flip_v].flip(-2)
    if x.shape[-1] == x.shape[-2]:
        k = torch.randint(0, 4, (n,), generator=g)
        for r in (1, 2, 3):
            m = k == r
            if m.any():
                x[m] = torch.rot90(x[m], r, (-2, -1))
    if dihedral_only:
        return x
    # Free rotation (+-45°) and scale (0.9-1.1) for half of the batch; zero (black) padding.
    free = torch.rand(n, generator=g) < 0.5
    if free.any():
        m = int(free.sum())
        ang = (torch.rand(m, generator=g) * 2 - 1) * (math.pi / 4)
        scale = 0.9 + 0.2 * torch.rand(m, generator=g)
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.zeros(m, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        theta = theta.to(x.device)
        grid = F.affine_grid(theta, [m, x.shape[1], x.shape[2], x.shape[3]], align_corners=False)
        x[free] = F.grid_sample(x[free], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    dev = x.device
    bright = (0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)).to(dev)
    gain = (0.93 + 0.14 * torch.rand(n, 3, 1, 1, generator=g)).to(dev)
    sat = (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)).to(dev)
    gray = x.mean(dim=1, keepdim=True)
    x = gray + sat * (x - gray)
    x = x * bright * gain
    fg = x.amax(dim=1, keepdim=True) > (black_threshold / 255.0)
    sigma = (0.03 * torch.rand(n, 1, 1, 1, generator=g)).to(dev)
    noise = torch.randn(x.shape, generator=g).to(dev) * sigma
    x = torch.where(fg, x + noise, x)
    return x.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
#: the estimated time per epoch is printed after this many training batches of the run's first epoch
ESTIMATE_AFTER_BATCHES = 5

#: one row per epoch, as Ultralytics and Lightning users expect (rewritten whole after every epoch)
RESULTS_CSV = "results.csv"
RESULTS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_f1", "val_acc", "val_auc", "lr", "seconds",
                   "best_so_far")
#: TensorBoard event files (``tensorboard --logdir RUN/tensorboard``), written when tensorboard is installed
TENSORBOARD_DIR = "tensorboard"


def write_results_csv(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """``results.csv``: the epoch history, one row per epoch (empty cells where there was no validation)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RESULTS_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for rec in history:
        w.writerow({k: "" if rec.get(k) is None else rec.get(k) for k in RESULTS_COLUMNS})
    atomic_write_text(path, buf.getvalue())


class EpochLogger:
    """Per-epoch scalars as TensorBoard event files in ``RUN/tensorboard/`` (``train/loss``, ``val/f1`` ...),
    when the ``tensorboard`` package is installed; otherwise nothing (``results.csv`` is always written)."""

    def __init__(self, log_dir: Path, enabled: bool = True) -> None:
        self.log_dir, self.enabled = log_dir, enabled
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None and self.enabled:
            try:
                import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.enabled = False
                return None
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def write(self, rec: dict[str, Any]) -> None:
        w = self._open()
        if w is None:
            return
        epoch = int(rec["epoch"])
        for key, tag in (("train_loss", "train/loss"), ("train_acc", "train/accuracy"), ("val_loss", "val/loss"),
                         ("val_f1", "val/weighted_f1"), ("val_acc", "val/accuracy"), ("val_auc", "val/roc_auc"),
                         ("lr", "lr"), ("seconds", "epoch_seconds")):
            if rec.get(key) is not None:
                w.add_scalar(tag, float(rec[key]), epoch)
        w.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 2 % at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} must be auto, cpu or cuda")
    return name


def seed_everything(seed: int, device: str) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _state_dict_cpu(model: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def _save_weights(state: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _load_weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


class _BatchSet:
    """Indexable batches of (uint8 NHWC images, labels) read from the (memory-mapped) cache."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batches: list[np.ndarray]) -> None:
        self.images, self.labels, self.batches = images, labels, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import torch

        idx = np.sort(self.batches[i])
        return torch.from_numpy(np.ascontiguousarray(self.images[idx])), torch.from_numpy(self.labels[idx])


def _iterate(images: np.ndarray, labels: np.ndarray, batches: list[np.ndarray], workers: int) -> Any:
    if workers <= 0:
        ds = _BatchSet(images, labels, batches)
        return (ds[i] for i in range(len(ds)))
    import torch
    from torch.utils.data import DataLoader

    # An own generator keeps the DataLoader from drawing on the global RNG (dropout), so results
    # do not depend on the number of workers.
    return iter(DataLoader(_BatchSet(images, labels, batches), batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=False, generator=torch.Generator().manual_seed(0)))


def _prefix_digest(model: Any, n_blocks: int) -> str:
    """sha256 of the weights and buffers of the stem and the first ``n_blocks`` blocks only."""
    import hashlib

    h = hashlib.sha256()
    keep = ("_conv_stem.", "_bn0.", *(f"_blocks.{i}." for i in range(n_blocks)))
    for k, v in model.state_dict().items():
        if not k.startswith(keep) or k.endswith("num_batches_tracked"):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def prefix_features(model: Any, images: np.ndarray, cfg: PreprocessConfig, n_blocks: int, *,
                    store: Path | None = None, batch_size: int = 64, device: str = "cpu",
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Outputs of the frozen stem + first ``n_blocks`` blocks of an EfficientNet-Lite0 for the 8
    dihedral views (order of :func:`leukedge.models.dihedral_views`) of every cache image, as float16
    ``(8, N, C, H, W)``.

    With ``store`` (a folder) the array is kept there as ``.npy`` under a name made of the frozen
    weights' sha256, the preprocessing hash and the image count, and reused by later runs (folds of a
    cross-validation, ``--resume``); it is written to a temporary file and renamed, so an interrupted
    run never leaves a partial one behind.
    """
    import torch

    from .models import FrozenPrefix, dihedral_views

    prefix = FrozenPrefix(model, n_blocks).eval().to(device)
    key = f"prefix_k{n_blocks}_{_prefix_digest(model, n_blocks)[:16]}_{cfg.pixel_hash()[:12]}_n{len(images)}"
    path = store / f"{key}.npy" if store is not None else None
    if path is not None and path.is_file():
        try:
            feats = np.load(path, mmap_mode="r")
            if feats.shape[:2] == (8, len(images)):
                return np.ascontiguousarray(feats)
        except (OSError, ValueError):
            pass
    with torch.inference_mode():
        probe = prefix(torch.zeros(1, 3, cfg.size, cfg.size, device=device))
    out = np.empty((8, len(images), *probe.shape[1:]), dtype=np.float16)
    run = _onnx_runner(prefix, cfg.size) if device == "cpu" else None
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
            xs = torch.cat(dihedral_views(normalize01(to_float01(x), cfg), "d4"), 0)
            if run is not None:
                h = run(xs.numpy())
            else:
                h = prefix(xs.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
            out[:, start : start + len(x)] = h.reshape(8, len(x), *h.shape[1:])
            if progress is not None:
                progress(min(start + batch_size, len(images)), len(images))
    if path is not None:
        try:
            store.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")  # [ddp] unique: ranks may write at once
            np.save(tmp, out)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache folder: the features are simply not kept
    return out


def _onnx_runner(module: Any, size: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """``module`` as an ONNX Runtime CPU session (4-6x faster than eager PyTorch for these
    depthwise-convolution blocks on a CPU), or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prefix.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, torch.zeros(1, 3, size, size), str(path), input_names=["input"],
                              output_names=["features"], dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
                              dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


def _feature_batches(feats: np.ndarray, labels: np.ndarray, batches: list[np.ndarray], g: Any,
                     n_views: int) -> Any:
    """Batches of (cached frozen-block outputs in a random one of ``n_views`` views, labels)."""
    import torch

    for b in batches:
        idx = np.sort(b)
        var = torch.randint(0, n_views, (len(idx),), generator=g).numpy()
        yield torch.from_numpy(feats[var, idx].astype(np.float32)), torch.from_numpy(labels[idx])


def feature_view_probs(model: Any, feats: np.ndarray, rows: np.ndarray, n_blocks: int,
                       views: Sequence[int] = tuple(range(8)), batch_size: int = 256) -> dict[int, np.ndarray]:
    """Class probabilities of the trainable top on the cached features of each dihedral view in ``views``."""
    import torch

    from .models import top_forward

    model.eval()
    out = {}
    with torch.inference_mode():
        for v in views:
            prob = np.zeros((len(rows), 2), np.float64)
            for i in range(0, len(rows), batch_size):
                x = torch.from_numpy(feats[v, rows[i : i + batch_size]].astype(np.float32)).contiguous(
                    memory_format=torch.channels_last)
                prob[i : i + len(x)] = torch.softmax(top_forward(model, x, n_blocks).float(), 1).numpy()
            out[v] = prob
    return out


def tta_logits(view_probs: dict[int, np.ndarray], tta: str, threshold: float) -> np.ndarray:
    """The test-time computation of :class:`leukedge.models.TestTimeModel` on per-view probabilities:
    log of the mean over the TTA views, ``all`` logit shifted for the threshold."""
    from .models import logit_bias

    prob = np.mean([view_probs[v] for v in TTA_VIEW_INDEX[tta]], axis=0)
    logits = np.log(np.clip(prob, 1e-6, None))
    logits[:, 1] += logit_bias(threshold)
    return logits.astype(np.float32)


def predict_features(model: Any, feats: np.ndarray, rows: np.ndarray, n_blocks: int, tta: str = "none",
                     threshold: float = 0.5, batch_size: int = 256) -> np.ndarray:
    """Logits of the trainable top on cached features, with the test-time computation of
    :class:`leukedge.models.TestTimeModel` (mean probability over the TTA views, threshold shift)."""
    return tta_logits(feature_view_probs(model, feats, rows, n_blocks, TTA_VIEW_INDEX[tta], batch_size), tta, threshold)


def predict_rows(model: Any, images: np.ndarray, rows: np.ndarray, cfg: PreprocessConfig, device: str,
                 batch_size: int = 128, amp: bool = False, channels_last: bool = False) -> np.ndarray:
    """Logits (float32 numpy, N x 2) of ``model`` for the cache rows, in the order of ``rows``."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[rows[i : i + batch_size]]))
            x = normalize01(to_float01(x.to(device)), cfg)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", enabled=(amp and device == "cuda")):
                out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


def _val_metrics(logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    import torch
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    lt = torch.from_numpy(logits)
    loss = float(torch.nn.functional.cross_entropy(lt, torch.from_numpy(y)).item())
    prob = torch.softmax(lt, 1)[:, 1].numpy()
    pred = (prob >= 0.5).astype(np.int64)
    return {
        "val_loss": loss,
        "val_f1": float(f1_score(y, pred, labels=[0, 1], average="weighted", zero_division=0)),
        "val_acc": float(accuracy_score(y, pred)),
        "val_auc": float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else None,
    }


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------
def train(cache_path: str | Path | Any, out_dir: str | Path, config: TrainConfig | None = None, *,
          on_epoch_end: Callable[[dict[str, Any]], bool | None] | None = None, reporter: Reporter | None = None,
          **overrides: Any) -> TrainResult:
    """Train on the dataset cache at ``cache_path`` (a folder or a loaded cache) and write the run into ``out_dir``.

    ``on_epoch_end(record)`` is called after each epoch's checkpoint with that epoch's history
    record; returning ``False`` stops training there (the run can be continued with ``resume``).

    ``reporter``: where messages and progress go (default: plain lines on stderr unless ``quiet``; the CLI
    passes one that draws Rich progress bars when ``progress``).

    ``out_dir`` receives ``bundle/`` (best weights), ``history.json``, ``results.csv`` (one row per epoch),
    ``tensorboard/`` (event files, when tensorboard is installed), ``metrics.json``,
    ``split.json``, ``training_curves.png`` and ``checkpoints/`` (last + best, for ``resume``).
    """
    import torch

    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        return _train(cache_path, out_dir, cfg, on_epoch_end, reporter)
    finally:
        torch.set_num_threads(old_threads)


def _train(cache_path: Any, out_dir: str | Path, cfg: TrainConfig,
           on_epoch_end: Callable[[dict[str, Any]], bool | None] | None, reporter: Reporter | None) -> TrainResult:
    if cfg.epochs < 1:
        raise ValueError("epochs must be >= 1")
    if cfg.batch_size < 2:
        raise ValueError("batch_size must be >= 2 (BatchNorm)")
    run = _Trainer(cfg, Path(out_dir), reporter if reporter is not None else PlainReporter(quiet=cfg.quiet))
    run.load_inputs(cache_path)
    run.split()
    run.build_optimiser()
    run.restore()
    run.feature_cache()
    try:
        run.epochs(on_epoch_end)
    finally:
        run.epoch_logger.close()
    return run.write_bundle()


@dataclass
class _Inputs:
    """The dataset cache a run trains on."""

    images: np.ndarray
    manifest: list[dict[str, Any]]
    pcfg: PreprocessConfig
    cache_dir: Path | None
    synthetic: bool
    size: int


class _Trainer:
    """One training run in named phases (``_train`` calls them in order): load inputs, split, build the
    model and optimiser, restore a checkpoint, cache frozen features, run the epochs, write the bundle."""

    def __init__(self, cfg: TrainConfig, out: Path, rep: Reporter) -> None:
        self.device = resolve_device(cfg.device)
        self.dctx = _ddp.context(self.device)  # [ddp] torchrun: join the process group; one process: no-op hooks
        rep = rep if self.dctx.is_main else NULL_REPORTER  # [ddp] rank 0 reports
        self.cfg, self.out, self.rep, self.log = cfg, out, rep, rep.log
        self.ckpt = out / CKPT_DIR
        self.state_file = self.ckpt / "state.json"
        self.history: list[dict[str, Any]] = []
        self.best_f1, self.best_epoch, self.bad_epochs, self.start_epoch = -1.0, 0, 0, 1
        self.feats: np.ndarray | None = None
        self.t_start = time.time()
        self.epoch_logger = EpochLogger(out / TENSORBOARD_DIR, enabled=self.dctx.is_main)  # [ddp] rank 0 writes

    # -- phases ---------------------------------------------------------------------------
    def load_inputs(self, cache_path: Any) -> None:
        if isinstance(cache_path, (str, Path)):
            from .artifacts import load_cache

            cache = load_cache(cache_path)
            cache_dir: Path | None = Path(cache_path)
        else:
            cache, cache_dir = cache_path, getattr(cache_path, "path", None)
        pcfg: PreprocessConfig = cache.config
        images = cache.images
        meta = dict(getattr(cache, "meta", {}) or {})
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"cache {cache_dir}: expected uint8 NHWC images, got {images.dtype} {images.shape}")
        size = int(images.shape[1])
        if size != pcfg.size:
            raise ValueError(f"cache {cache_dir}: images are {size}px but its config says size={pcfg.size}")
        self.inp = _Inputs(images, list(cache.manifest), pcfg, cache_dir, bool(meta.get("synthetic", False)), size)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.resuming = self.dctx.broadcast(self.cfg.resume and self.state_file.is_file())  # [ddp] rank 0's checkpoint decides
        if self.cfg.resume and not self.resuming:
            self.log(f"[yellow]--resume: no checkpoint in {self.ckpt}, starting from scratch[/]")

    def split(self) -> None:
        """The train/validation split (reused verbatim on resume), and its summary in the log."""
        cfg, manifest, log = self.cfg, self.inp.manifest, self.log
        split_path = self.out / SPLIT_FILE
        if self.resuming and split_path.is_file():
            split = json.loads(split_path.read_text())
        else:
            split = make_split(manifest, cfg, log)
            if self.dctx.is_main:  # [ddp]
                _write_json(split_path, split)
        split = self.dctx.broadcast(split)  # [ddp]
        self.split_info = split
        self.train_rows = np.asarray(split["train_indices"], dtype=np.int64)
        self.val_rows = np.asarray(split["val_indices"], dtype=np.int64)
        self.labels_all = np.array([max(_as_int(r.get("label")), 0) for r in manifest], dtype=np.int64)
        self.y_train, self.y_val = self.labels_all[self.train_rows], self.labels_all[self.val_rows]
        for name, yy in (("training", self.y_train), ("validation", self.y_val)):
            if len(yy) and len(np.unique(yy)) < 2:
                log(f"[yellow]warning: the {name} split holds only one class ({len(yy)} images)[/]")
        if split.get("subject_warning"):
            log(f"[bold yellow]warning: {split['subject_warning']}[/]")
        log(f"[bold]split[/] {split['strategy']}: train {len(self.train_rows)} {split['train_counts']} from "
            f"{len(split['train_subjects'])} subjects, val {len(self.val_rows)} {split['val_counts']} from "
            f"{len(split['val_subjects'])} subjects" + ("" if split["patient_disjoint"] else " [red](NOT patient-disjoint)[/]"))
        if self.inp.synthetic:
            log("[magenta]SYNTHETIC cache: the resulting model is marked synthetic[/]")

    def build_optimiser(self) -> None:
        """Model (stem frozen as configured), class-weighted loss, AdamW with warm-up + cosine schedule."""
        import torch

        from .models import build_model, default_arch_kwargs, freeze_stem

        cfg, device = self.cfg, self.device
        seed_everything(cfg.seed, device)
        self.arch_kwargs = {**default_arch_kwargs(cfg.arch), **cfg.arch_kwargs}
        model = build_model(cfg.arch, input_size=self.inp.size, pretrained=cfg.pretrained and not self.resuming,
                            **self.arch_kwargs).to(device)
        self.mem_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.mem_format)
        self.frozen = freeze_stem(self.model, cfg.arch, cfg.freeze_blocks)
        counts = np.bincount(self.y_train, minlength=2).astype(np.float64)
        self.weights = counts.sum() / (2.0 * counts) if cfg.class_weighting and counts.min() > 0 else np.ones(2)
        self.criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor(self.weights, dtype=torch.float32, device=device),
                                                   label_smoothing=cfg.label_smoothing)
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        steps_per_epoch = len(self.dctx.epoch_batches(self.train_rows, cfg.batch_size, None))  # [ddp] this rank's steps
        total_steps = max(1, steps_per_epoch * cfg.epochs)
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch)) if cfg.epochs > 1 else 0
        warmup = min(warmup, total_steps - 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda step: warmup_cosine(step, warmup, total_steps))
        self.use_amp = bool(cfg.amp and device == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def restore(self) -> None:
        """On resume: check the checkpoint was made with the same settings, then load weights and optimiser
        (under torchrun rank 0 reads the checkpoint and hands it on to the other ranks)."""
        if self.resuming and self.dctx.is_main:  # [ddp]
            self._restore_checkpoint()
        (self.history, self.best_f1, self.best_epoch, self.bad_epochs, self.start_epoch) = self.dctx.share_resume(  # [ddp]
            self.resuming, self.model, self.optimizer, self.scheduler, self.scaler,
            (self.history, self.best_f1, self.best_epoch, self.bad_epochs, self.start_epoch))

    def _restore_checkpoint(self) -> None:
        import torch

        cfg, pcfg, state_file = self.cfg, self.inp.pcfg, self.state_file
        st = json.loads(state_file.read_text())
        if st.get("arch") != cfg.arch or st.get("preprocess_hash") != pcfg.pixel_hash():
            raise ValueError(f"{state_file}: the checkpoint was made with arch {st.get('arch')!r} / preprocessing "
                             f"{str(st.get('preprocess_hash'))[:12]}, not {cfg.arch!r} / {pcfg.pixel_hash()[:12]}")
        old_cfg = st.get("train_config") or {}
        changed = [k for k in RECIPE_FIELDS if k not in TEST_TIME_FIELDS and k in old_cfg
                   and json.dumps(old_cfg[k]) != json.dumps(getattr(cfg, k))]
        if changed:
            raise ValueError(f"{state_file}: the checkpoint was trained with other settings ("
                             + ", ".join(f"{k} {old_cfg[k]!r}, now {getattr(cfg, k)!r}" for k in changed)
                             + "); use a new run directory or the same settings")
        # the files state.json names (runs checkpointed before they were named: last.safetensors / optim.pt)
        weights, optim = self.ckpt / str(st.get("weights", "last.safetensors")), self.ckpt / str(st.get("optim", "optim.pt"))
        for f in (weights, optim):
            if f.parent != self.ckpt or not f.is_file():
                raise ValueError(f"{state_file}: names checkpoint file {f.name!r}, which is missing; use a new run directory")
        self.model.load_state_dict(_load_weights(weights))
        opt_state = torch.load(optim, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(opt_state["optimizer"])
        self.scheduler.load_state_dict(opt_state["scheduler"])
        self.scaler.load_state_dict(opt_state["scaler"])
        self.history, self.best_f1, self.best_epoch = st["history"], st["best_f1"], st["best_epoch"]
        self.bad_epochs, self.start_epoch = st["bad_epochs"], st["epoch"] + 1
        self.log(f"resuming after epoch {st['epoch']} (best val F1 {self.best_f1:.4f} at epoch {self.best_epoch})")

    def feature_cache(self) -> None:
        """With a frozen stem, its outputs for all 8 views are computed once (after a resume's restore, so
        they are those of the frozen weights actually used) and only the top is trained on them."""
        cfg, inp = self.cfg, self.inp
        if cfg.uses_feature_cache():
            t_fc = time.time()
            with self.dctx.local_main_first(), \
                    self.rep.progress("frozen-block features (8 views)", total=len(inp.images), transient=True) as ft:  # [ddp]
                self.feats = prefix_features(self.model, inp.images, inp.pcfg, cfg.freeze_blocks, device=self.device,
                                             store=(inp.cache_dir / "features") if inp.cache_dir is not None else None,
                                             progress=lambda done, tot: ft.update(completed=done))
            self.log(f"frozen stem + blocks 0-{cfg.freeze_blocks - 1}: features of {len(inp.images)} cells x 8 views "
                     f"{tuple(self.feats.shape[2:])} ready in {time.time() - t_fc:.0f}s; training the top on them")
        params = sum(p.numel() for p in self.model.parameters())
        self.log(f"[bold]model[/] {cfg.arch} ({params / 1e6:.2f} M parameters, "
                 f"{'ImageNet init' if cfg.pretrained else 'random init'}), {inp.size}px, device {self.device}"
                 f"{', AMP' if self.use_amp else ''}; class weights hem {self.weights[0]:.2f} / all {self.weights[1]:.2f}")

    def predict_val(self, amp: bool, rows: np.ndarray | None = None) -> np.ndarray:
        """Validation logits (of ``rows``, default all validation rows) of the model as it will be shipped
        (test-time views, threshold shift)."""
        from .models import TestTimeModel

        cfg = self.cfg
        rows = self.val_rows if rows is None else rows
        if self.feats is not None:
            return predict_features(self.model, self.feats, rows, cfg.freeze_blocks, cfg.tta, cfg.threshold)
        return predict_rows(TestTimeModel(self.model, cfg.tta, cfg.threshold), self.inp.images, rows,
                            self.inp.pcfg, self.device, amp=amp, channels_last=cfg.channels_last)

    def _stop_early(self) -> bool:
        cfg = self.cfg
        return bool(cfg.patience and cfg.select == "best" and len(self.val_rows) and self.bad_epochs >= cfg.patience)

    def epochs(self, on_epoch_end: Callable[[dict[str, Any]], bool | None] | None) -> None:
        from .models import top_forward

        cfg, model = self.cfg, self.model
        # [ddp] the training forward pass: through DistributedDataParallel under torchrun
        self.train_forward = self.dctx.wrap(
            model, (lambda x: top_forward(model, x, cfg.freeze_blocks)) if self.feats is not None else model)
        self.t_start = time.time()
        with self.rep.progress("epochs", total=cfg.epochs, completed=self.start_epoch - 1) as total_task:
            for epoch in range(self.start_epoch, cfg.epochs + 1):
                if self._stop_early():
                    break
                rec, improved = self.run_epoch(epoch)
                self.checkpoint(epoch)
                self._report_epoch(epoch, rec, improved, total_task)
                if on_epoch_end is not None and on_epoch_end(rec) is False:
                    self.log(f"stopped after epoch {epoch} by the caller")
                    break
        self.stopped_early = self._stop_early() and len(self.history) < cfg.epochs
        if self.stopped_early:
            self.log(f"early stop: no better validation F1 for {cfg.patience} epochs")

    def _batches_of(self, batches: list[np.ndarray], g: Any) -> Any:
        if self.feats is not None:
            return _feature_batches(self.feats, self.labels_all, batches, g, 8 if self.cfg.augment == "dihedral" else 1)
        return _iterate(self.inp.images, self.labels_all, batches, self.cfg.workers)

    def _inputs_on_device(self, xb: Any, g: Any) -> Any:
        """A batch as the network takes it: cached features as they are; images as float, augmented, normalised."""
        cfg, pcfg = self.cfg, self.inp.pcfg
        if self.feats is not None:
            return xb.to(self.device, non_blocking=True).contiguous(memory_format=self.mem_format)
        x = to_float01(xb.to(self.device, non_blocking=True))
        if cfg.augment != "none":
            x = augment_batch(x, g, pcfg.stain.black_threshold, dihedral_only=cfg.augment == "dihedral")
        return normalize01(x, pcfg).contiguous(memory_format=self.mem_format)

    def run_epoch(self, epoch: int) -> tuple[dict[str, Any], bool]:
        """One pass over the training rows, then validation; returns the history record and whether it improved."""
        import torch

        cfg = self.cfg
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout / drop-connect, reproducible across resume
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        batches = self.dctx.epoch_batches(self.train_rows, cfg.batch_size, g, seed=cfg.seed, epoch=epoch, log_dir=self.out,
                                          log=self.log)  # [ddp] one process: _batches(...); torchrun: this rank's shard
        with self.rep.progress(f"epoch {epoch}/{cfg.epochs}", total=len(batches)) as task:
            self.model.train()
            for m in self.frozen:
                m.eval()
            loss_sum, correct, seen = 0.0, 0, 0
            for i, (xb, yb) in enumerate(self._batches_of(batches, g), start=1):
                x = self._inputs_on_device(xb, g)
                yb = yb.to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", enabled=self.use_amp):
                    logits = self.train_forward(x)  # [ddp]
                    loss = self.criterion(logits.float(), yb)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"epoch {epoch}: loss became {loss.item()} (try a lower --lr)")
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                loss_sum += float(loss.item()) * len(yb)
                correct += int((logits.argmax(1) == yb).sum().item())
                seen += len(yb)
                task.advance(1, stats=f"loss {loss_sum / seen:.4f}  acc {correct / seen:.3f}")
                if epoch == self.start_epoch and i == min(ESTIMATE_AFTER_BATCHES, len(batches)):
                    self._estimate_epoch_time(time.time() - t0, i, len(batches), epoch)
        loss_sum, correct, seen = self.dctx.sum(loss_sum, correct, seen)  # [ddp] over all ranks
        if len(self.val_rows):
            vm = _val_metrics(self.dctx.sharded_predict(lambda r: self.predict_val(self.use_amp, r), self.val_rows,  # [ddp]
                                                        self.model), self.y_val)
        else:
            vm = {"val_loss": None, "val_f1": None, "val_acc": None, "val_auc": None}
        rec = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), **vm,
               "lr": float(self.optimizer.param_groups[0]["lr"]), "seconds": round(time.time() - t0, 2)}
        # Without validation the "best" model is simply the latest one; under select="last" the latest is kept
        # whatever its score, but only an epoch that beats every earlier one is called "(best)".
        rec["best_so_far"] = vm["val_f1"] is not None and all(
            vm["val_f1"] > (h.get("val_f1") if h.get("val_f1") is not None else -1.0) + 1e-9 for h in self.history)
        self.history.append(rec)
        improved = cfg.select == "last" or vm["val_f1"] is None or vm["val_f1"] > self.best_f1 + 1e-9
        if improved:
            self.best_f1, self.best_epoch, self.bad_epochs = (vm["val_f1"] if vm["val_f1"] is not None else -1.0), epoch, 0
            if self.dctx.is_main:  # [ddp] checkpoints on rank 0 only
                _save_weights(_state_dict_cpu(self.model), self.ckpt / "best.safetensors")
        else:
            self.bad_epochs += 1
        return rec, improved

    def _estimate_epoch_time(self, seconds: float, done: int, n_batches: int, epoch: int) -> None:
        """Say early how long an epoch (and the run) will take, from the first batches' time."""
        per_epoch = seconds / max(done, 1) * n_batches
        left = self.cfg.epochs - epoch + 1
        self.log(f"estimated time per epoch: about {format_duration(per_epoch)} ({n_batches} batches of {self.cfg.batch_size}, "
                 f"measured on the first {done}; validation not included)"
                 + (f"; {left} epochs about {format_duration(per_epoch * left)}" if left > 1 else ""))

    def checkpoint(self, epoch: int) -> None:
        """Everything ``resume`` needs after ``epoch``: last weights, optimiser state, run state, history
        (written by rank 0 only under torchrun)."""
        if not self.dctx.is_main:  # [ddp]
            return
        import torch

        # One consistent checkpoint whenever the process dies: this epoch's weights and optimiser go to
        # new files first, then state.json (written atomically) names them, and only then are the previous
        # epoch's files removed. A kill at any point leaves state.json naming a complete, matching pair.
        ckpt = self.ckpt
        weights, optim = f"last-{epoch:04d}.safetensors", f"optim-{epoch:04d}.pt"
        _save_weights(_state_dict_cpu(self.model), ckpt / weights)
        tmp = ckpt / f"{optim}.tmp"
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict()}, tmp)
        os.replace(tmp, ckpt / optim)
        _write_json(self.state_file, {"epoch": epoch, "arch": self.cfg.arch, "preprocess_hash": self.inp.pcfg.pixel_hash(),
                                      "best_f1": self.best_f1, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                                      "history": self.history, "train_config": self.cfg.to_dict(),
                                      "weights": weights, "optim": optim})
        for old in [*ckpt.glob("last-*.safetensors"), *ckpt.glob("optim-*.pt"), ckpt / "last.safetensors", ckpt / "optim.pt"]:
            if old.name not in (weights, optim):
                old.unlink(missing_ok=True)
        _write_json(self.out / "history.json", {"history": self.history, "best_epoch": self.best_epoch})
        write_results_csv(self.out / RESULTS_CSV, self.history)
        self.epoch_logger.write(self.history[-1])

    def _report_epoch(self, epoch: int, rec: dict[str, Any], improved: bool, total_task: Any) -> None:
        auc = rec["val_auc"]
        if rec["val_f1"] is None:
            total_task.advance(1, stats=f"train loss {rec['train_loss']:.4f}")
            self.log(f"epoch {epoch:3d}  train loss {rec['train_loss']:.4f}  acc {rec['train_acc']:.3f} | no validation  "
                     f"lr {rec['lr']:.2e}  {rec['seconds']:.0f}s")
        else:
            total_task.advance(1, stats=f"val F1 {rec['val_f1']:.4f}" + (" *" if rec.get("best_so_far") else ""))
            best = bool(rec.get("best_so_far"))
            self.log(f"epoch {epoch:3d}  train loss {rec['train_loss']:.4f}  acc {rec['train_acc']:.3f} | val loss "
                     f"{rec['val_loss']:.4f}  F1 {rec['val_f1']:.4f}  acc {rec['val_acc']:.3f}  AUC "
                     f"{'n/a' if auc is None else f'{auc:.4f}'}  lr {rec['lr']:.2e}  {rec['seconds']:.0f}s"
                     + ("  (best)" if best else ""))

    def final_validation(self) -> tuple[dict[str, Any] | None, np.ndarray | None]:
        """Metrics of the kept model on the validation rows (on cached features all 8 views are computed
        once: the kept model's logits and what each test-time augmentation would have given come from them)."""
        import torch

        from .evaluate import compute_metrics

        if not len(self.val_rows):
            return None, None
        cfg = self.cfg
        vp = feature_view_probs(self.model, self.feats, self.val_rows, cfg.freeze_blocks) if self.feats is not None else None
        logits_val = tta_logits(vp, cfg.tta, cfg.threshold) if vp is not None else self.predict_val(amp=False)
        prob_val = torch.softmax(torch.from_numpy(logits_val), 1)[:, 1].numpy()
        val_full = compute_metrics(self.y_val, prob_val, subjects=[self.inp.manifest[i].get("subject") for i in self.val_rows])
        if vp is not None:
            val_full["by_tta"] = {
                mode: {k: v for k, v in _val_metrics(tta_logits(vp, mode, cfg.threshold), self.y_val).items()
                       if k in ("val_f1", "val_auc")} for mode in TTA_VIEW_INDEX}
        return val_full, prob_val

    def write_bundle(self) -> TrainResult:
        """Load the best weights, validate them, and write ``bundle/``, ``metrics.json`` and the curves."""
        from . import plots
        from .models import TestTimeModel, save_bundle

        cfg, inp, out, split = self.cfg, self.inp, self.out, self.split_info
        if not self.dctx.is_main:  # [ddp] rank 0 scores the kept model and writes the bundle; the others get its result
            return self.dctx.result(None)
        self.dctx.finish(self.model)  # [ddp] SyncBatchNorm -> BatchNorm
        self.model.load_state_dict(_load_weights(self.ckpt / "best.safetensors"))
        self.model.to(self.device)
        val_full, prob_val = self.final_validation()
        elapsed = time.time() - self.t_start
        split_summary = {k: v for k, v in split.items() if k not in ("train_indices", "val_indices")}
        metrics = {
            "best_epoch": self.best_epoch, "epochs_run": len(self.history), "stopped_early": self.stopped_early,
            "val": val_full, "split": split_summary, "train_config": cfg.to_dict(),
            "cache": str(inp.cache_dir) if inp.cache_dir else None, "preprocess_hash": inp.pcfg.pixel_hash(),
            "synthetic": inp.synthetic, "device": self.device, "train_seconds": round(elapsed, 1),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **self.dctx.record(cfg.batch_size),  # [ddp] {"distributed": world size, effective batch ...} under torchrun
        }
        bundle_dir = out / "bundle"
        if bundle_dir.exists():
            shutil.rmtree(bundle_dir)
        bundle_metrics: dict[str, Any] = {"best_epoch": self.best_epoch, "epochs_run": len(self.history),
                                          "split_strategy": split["strategy"], "patient_disjoint": split["patient_disjoint"],
                                          "train_n": len(self.train_rows)}
        if val_full is not None:
            bundle_metrics.update({"val_weighted_f1": val_full["weighted_f1"], "val_accuracy": val_full["accuracy"],
                                   "val_roc_auc": val_full["roc_auc"], "val_n": val_full["n"]})
        self.model.cpu().eval()
        if self.feats is not None:
            _check_assembled(self.model, self.feats, inp.images, inp.pcfg, cfg.freeze_blocks)
        shipped = TestTimeModel(self.model, cfg.tta, cfg.threshold)
        training = {k: cfg.to_dict()[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "seed", "pretrained",
                                                  "augment", "class_weighting", "freeze_blocks")}
        save_bundle(bundle_dir, shipped if not shipped.trivial else self.model, arch=cfg.arch, arch_kwargs=self.arch_kwargs,
                    config=inp.pcfg, input_size=inp.size, metrics=bundle_metrics, synthetic=inp.synthetic,
                    half=cfg.half_weights, extra={"training": training, "recipe": recipe_of(cfg), **self.dctx.record(cfg.batch_size)})  # [ddp]
        _write_json(bundle_dir / "history.json", {"history": self.history, "best_epoch": self.best_epoch})
        _write_json(out / "metrics.json", metrics)
        plots.plot_training_curves(self.history, out / "training_curves.png", title=f"{cfg.arch} training",
                                   synthetic=inp.synthetic, best_epoch=self.best_epoch)
        if val_full is not None:
            self.log(f"[bold green]best val weighted F1 {self.best_f1:.4f}[/] at epoch {self.best_epoch}; bundle in "
                     f"{bundle_dir} ({elapsed / 60:.1f} min)")
        else:
            self.log(f"[bold green]trained {len(self.history)} epochs without validation[/]; bundle in {bundle_dir} "
                     f"({elapsed / 60:.1f} min)")
        return self.dctx.result(TrainResult(  # [ddp] dctx.result: to every rank
            out_dir=out, bundle_path=bundle_dir, best_epoch=self.best_epoch, best_val_f1=self.best_f1, history=self.history,
            metrics=metrics, split=split_summary, val_indices=[int(i) for i in self.val_rows], val_prob=prob_val))


def _check_assembled(model: Any, feats: np.ndarray, images: np.ndarray, cfg: PreprocessConfig, n_blocks: int) -> None:
    """The shipped full model must reproduce the cached-feature path it was trained on."""
    import torch

    from .models import top_forward

    rows = np.arange(min(8, len(images)))
    with torch.inference_mode():
        x = normalize01(to_float01(torch.from_numpy(np.ascontiguousarray(images[rows]))), cfg)
        full = torch.softmax(model(x), 1)[:, 1]
        part = torch.softmax(top_forward(model, torch.from_numpy(feats[0, rows].astype(np.float32)), n_blocks), 1)[:, 1]
    diff = float((full - part).abs().max()) if len(rows) else 0.0
    if diff > 0.02:
        raise RuntimeError(f"the assembled model disagrees with the cached-feature path it was trained on (max |dP| {diff:.3f})")


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
# Options shared by `leukedge train` and `leukedge cv` (the recipe options), in --help order.
# How a run is executed (not part of a recipe).


callable_module(__name__, train)
