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

import click
import numpy as np

from . import distributed as _ddp  # [ddp] torchrun / DistributedDataParallel hooks (no-ops in one process)
from .config import PreprocessConfig

SPLIT_FILE = "split.json"
AUGMENT_MODES = ("full", "dihedral", "none")
#: Indices into the 8 dihedral views (:func:`leukedge.models.dihedral_views` with "d4") used by each TTA mode.
TTA_VIEW_INDEX = {"none": (0,), "flip": (0, 4), "d4": tuple(range(8))}
CKPT_DIR = "checkpoints"


@dataclass
class TrainConfig:
    arch: str = "tiny"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    seed: int = 0
    pretrained: bool = False
    patience: int = 5  # epochs without a better val F1 before stopping; 0 = never stop early
    workers: int = 0
    resume: bool = False
    device: str = "auto"
    limit: int | None = None
    val_fold: int | None = None
    val_fraction: float = 0.2
    image_level_split: bool = False
    resplit: bool = False  # ignore the cache's train/val split and make a new one
    no_validation: bool = False  # train on every usable row for a fixed number of epochs; keep the last
    augment: str = "full"  # "full" (geometric + photometric), "dihedral" (the 8 symmetries only) or "none"
    class_weighting: bool = True
    label_smoothing: float = 0.0
    amp: bool = True
    threads: int | None = None
    half_weights: bool = False  # store the bundle weights as float16
    channels_last: bool = True  # faster convolutions on CPU (and tensor cores)
    freeze_blocks: int = 0  # efficientnet_lite0: freeze the stem and this many early blocks
    # With frozen blocks and dihedral (or no) augmentation, the frozen part's output for the 8 symmetries
    # of every cell is computed once and cached: the same training, several times faster.
    feature_cache: bool = True
    tta: str = "none"  # test-time augmentation stored in the bundle: "none", "flip" or "d4" (8 symmetries)
    threshold: float = 0.5  # decision threshold on P(all), stored in the bundle as a logit shift
    select: str = "best"  # keep the "best" validation epoch, or the "last" one (fixed budget, as in `cv`)
    recipe: str | None = None  # the recipe file these settings came from (recorded in the bundle)
    progress: bool = True  # rich progress bar
    quiet: bool = False  # no per-epoch log lines either
    # Explicit cache rows (cross-validation); when given they replace the automatic split.
    train_indices: list[int] | None = None
    val_indices: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # older callers: True = full, False = none
            self.augment = "full" if self.augment else "none"
        if self.augment not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, not {self.augment!r}")
        if self.tta not in ("none", "flip", "d4"):
            raise ValueError(f"tta must be none, flip or d4, not {self.tta!r}")
        if self.select not in ("best", "last"):
            raise ValueError(f"select must be 'best' or 'last', not {self.select!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, not {self.threshold}")

    def uses_feature_cache(self) -> bool:
        """Whether training runs on cached outputs of the frozen blocks (see ``feature_cache``)."""
        return bool(self.feature_cache and self.freeze_blocks > 0 and self.arch == "efficientnet_lite0"
                    and self.augment in ("dihedral", "none"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("train_indices", "val_indices"):
            if d[k] is not None:
                d[k] = f"<{len(d[k])} rows>"
        return d


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
# split
# ----------------------------------------------------------------------------------------
def _as_int(v: Any, default: int = -1) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def usable_rows(manifest: Sequence[dict[str, Any]]) -> list[int]:
    """Rows that decoded and carry a label (0 hem / 1 all)."""
    return [i for i, r in enumerate(manifest) if str(r.get("status", "ok")) == "ok" and _as_int(r.get("label")) in (0, 1)]


def _subjects_of(manifest: Sequence[dict[str, Any]], rows: Sequence[int]) -> set[str]:
    return {str(manifest[i].get("subject")) for i in rows if manifest[i].get("subject") not in (None, "")}


def _source_split(row: dict[str, Any]) -> str | None:
    """The partition a file came from in the C-NMC layout (ignoring splits assigned by preprocess):
    "val" for the labelled preliminary test set, "test" for the unlabelled final test set, else None."""
    p = str(row.get("path") or "").replace("\\", "/").lower()
    if "test_prelim_phase" in p:
        return "val"
    if "test_final_phase" in p or "/testing_data/" in p:
        return "test"
    return None


def make_split(manifest: Sequence[dict[str, Any]], cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Choose training and validation rows of a cache; returns a JSON-serialisable description.

    Order of precedence: explicit ``train_indices``/``val_indices``; ``no_validation`` (every usable
    row trains); the cache's own train/val split (written by ``leukedge preprocess``) unless
    ``resplit``, ``val_fold`` or ``image_level_split`` ask for a new one; otherwise a new split by
    :func:`leukedge.data.assign_splits` (official folds when there are several, else by subject).
    """
    from .data import LeakageWarning, assign_splits

    rows = usable_rows(manifest)
    if cfg.train_indices is not None or cfg.val_indices is not None:
        if cfg.train_indices is None or cfg.val_indices is None:
            raise ValueError("train_indices and val_indices must be given together")
        ok = set(rows)
        train = sorted(int(i) for i in cfg.train_indices)
        val = sorted(int(i) for i in cfg.val_indices)
        bad = [i for i in train + val if i not in ok]
        if bad:
            raise ValueError(f"explicit split uses {len(bad)} row(s) that failed or have no label, e.g. {bad[:5]}")
        strategy = "explicit"
    else:
        rows = [i for i in rows if str(manifest[i].get("split") or "") != "test"]
        if cfg.limit is not None and cfg.limit < len(rows):
            rng = np.random.default_rng(cfg.seed)
            rows = sorted(int(i) for i in rng.choice(rows, size=cfg.limit, replace=False))
        cache_splits = {str(manifest[i].get("split") or "") for i in rows}
        if cfg.no_validation:
            strategy, train, val = "none", list(rows), []
        elif (not cfg.resplit and cfg.val_fold is None and not cfg.image_level_split
              and {"train", "val"} <= cache_splits):
            strategy = "cache"
            train = [i for i in rows if manifest[i].get("split") == "train"]
            val = [i for i in rows if manifest[i].get("split") == "val"]
        else:
            items = [{**manifest[i], "split": _source_split(manifest[i])} for i in rows]
            strategy = "image" if cfg.image_level_split else "auto"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", LeakageWarning)
                splits = assign_splits(items, strategy=strategy, val_fold=cfg.val_fold, val_fraction=cfg.val_fraction,
                                       seed=cfg.seed)
            for w in caught:
                if issubclass(w.category, LeakageWarning):
                    log(f"[bold red]WARNING: {w.message}[/]")
            folds = sorted({_as_int(it.get("fold")) for it in items if _as_int(it.get("fold")) >= 0})
            if strategy == "auto":
                strategy = "fold" if (len(folds) >= 2 or cfg.val_fold is not None) else "subject"
            train = [r for r, s in zip(rows, splits) if s == "train"]
            val = [r for r, s in zip(rows, splits) if s == "val"]
    if not train or (not val and not cfg.no_validation):
        raise ValueError(f"split {strategy!r} left {len(train)} training and {len(val)} validation images; need both "
                         "(use more subjects, a different --val-fold, or --no-validation)")
    leaked = sorted(_subjects_of(manifest, train) & _subjects_of(manifest, val))
    if leaked and strategy != "image":
        msg = f"subjects on both sides of the {strategy} split: {', '.join(leaked[:10])}"
        if strategy in ("subject", "explicit"):
            raise RuntimeError(f"internal error: {msg}")
        log(f"[bold red]WARNING: {msg} (validation scores will be inflated)[/]")
    if strategy == "image":
        log("[bold red]WARNING: image-level split: cells of one patient are in both train and validation; "
            "validation scores are inflated and NOT comparable with patient-disjoint results.[/]")

    def counts(rows: Sequence[int]) -> dict[str, int]:
        labs = [_as_int(manifest[i].get("label")) for i in rows]
        return {"hem": labs.count(0), "all": labs.count(1)}

    return {
        "strategy": strategy,
        "val_fold": cfg.val_fold,
        "patient_disjoint": not leaked,
        "leaked_subjects": leaked,
        "train_indices": train,
        "val_indices": val,
        "train_counts": counts(train),
        "val_counts": counts(val),
        "train_subjects": sorted(_subjects_of(manifest, train)),
        "val_subjects": sorted(_subjects_of(manifest, val)),
    }


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


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _make_console(progress: bool) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=not progress)


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


def _batches(rows: np.ndarray, batch_size: int, g: Any | None, drop_last: bool) -> list[np.ndarray]:
    import torch

    if g is not None:
        rows = rows[torch.randperm(len(rows), generator=g).numpy()]
    out = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if drop_last and len(out) > 1 and len(out[-1]) < max(2, batch_size // 4):
        out = out[:-1]  # a tiny last batch destabilises BatchNorm
    return out


def _iterate(images: np.ndarray, labels: np.ndarray, batches: list[np.ndarray], workers: int) -> Any:
    if workers <= 0:
        ds = _BatchSet(images, labels, batches)
        return (ds[i] for i in range(len(ds)))
    from torch.utils.data import DataLoader

    import torch

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
          on_epoch_end: Callable[[dict[str, Any]], bool | None] | None = None, **overrides: Any) -> TrainResult:
    """Train on the dataset cache at ``cache_path`` (a folder or a loaded cache) and write the run into ``out_dir``.

    ``on_epoch_end(record)`` is called after each epoch's checkpoint with that epoch's history
    record; returning ``False`` stops training there (the run can be continued with ``resume``).

    ``out_dir`` receives ``bundle/`` (best weights), ``history.json``, ``metrics.json``,
    ``split.json``, ``training_curves.png`` and ``checkpoints/`` (last + best, for ``resume``).
    """
    import torch

    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        return _train(cache_path, out_dir, cfg, on_epoch_end)
    finally:
        torch.set_num_threads(old_threads)


def _train(cache_path: Any, out_dir: str | Path, cfg: TrainConfig,
           on_epoch_end: Callable[[dict[str, Any]], bool | None] | None) -> TrainResult:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from . import plots
    from .evaluate import compute_metrics
    from .models import TestTimeModel, build_model, default_arch_kwargs, freeze_stem, save_bundle, top_forward

    console = _make_console(not cfg.quiet)
    log = console.print
    if cfg.epochs < 1:
        raise ValueError("epochs must be >= 1")
    if cfg.batch_size < 2:
        raise ValueError("batch_size must be >= 2 (BatchNorm)")
    device = resolve_device(cfg.device)
    dctx = _ddp.context(device)  # [ddp] torchrun: join the process group; one process: no-op hooks
    console.quiet = console.quiet or not dctx.is_main  # [ddp] rank 0 logs

    if isinstance(cache_path, (str, Path)):
        from .preprocess import load_cache

        cache = load_cache(cache_path)
        cache_dir: Path | None = Path(cache_path)
    else:
        cache, cache_dir = cache_path, getattr(cache_path, "path", None)
    pcfg: PreprocessConfig = cache.config
    images = cache.images
    manifest = list(cache.manifest)
    meta = dict(getattr(cache, "meta", {}) or {})
    synthetic = bool(meta.get("synthetic", False))
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"cache {cache_dir}: expected uint8 NHWC images, got {images.dtype} {images.shape}")
    size = int(images.shape[1])
    if size != pcfg.size:
        raise ValueError(f"cache {cache_dir}: images are {size}px but its config says size={pcfg.size}")

    out = Path(out_dir)
    ckpt = out / CKPT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    state_file = ckpt / "state.json"
    resuming = dctx.broadcast(cfg.resume and state_file.is_file())  # [ddp] rank 0's checkpoint decides
    if cfg.resume and not resuming:
        log(f"[yellow]--resume: no checkpoint in {ckpt}, starting from scratch[/]")

    # -- split (reused verbatim on resume) ---------------------------------------------------
    split_path = out / SPLIT_FILE
    if resuming and split_path.is_file():
        split = json.loads(split_path.read_text())
    else:
        split = make_split(manifest, cfg, log)
        if dctx.is_main:  # [ddp]
            _write_json(split_path, split)
    split = dctx.broadcast(split)  # [ddp]
    train_rows = np.asarray(split["train_indices"], dtype=np.int64)
    val_rows = np.asarray(split["val_indices"], dtype=np.int64)
    labels_all = np.array([max(_as_int(r.get("label")), 0) for r in manifest], dtype=np.int64)
    y_train, y_val = labels_all[train_rows], labels_all[val_rows]
    for name, yy in (("training", y_train), ("validation", y_val)):
        if len(yy) and len(np.unique(yy)) < 2:
            log(f"[yellow]warning: the {name} split holds only one class ({len(yy)} images)[/]")
    log(f"[bold]split[/] {split['strategy']}: train {len(train_rows)} {split['train_counts']} from "
        f"{len(split['train_subjects'])} subjects, val {len(val_rows)} {split['val_counts']} from "
        f"{len(split['val_subjects'])} subjects" + ("" if split["patient_disjoint"] else " [red](NOT patient-disjoint)[/]"))
    if synthetic:
        log("[magenta]SYNTHETIC cache: the resulting model is marked synthetic[/]")

    # -- model / optimiser ---------------------------------------------------------------
    seed_everything(cfg.seed, device)
    arch_kwargs = {**default_arch_kwargs(cfg.arch), **cfg.arch_kwargs}
    model = build_model(cfg.arch, input_size=size, pretrained=cfg.pretrained and not resuming, **arch_kwargs).to(device)
    mem_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=mem_format)
    frozen = freeze_stem(model, cfg.arch, cfg.freeze_blocks)
    counts = np.bincount(y_train, minlength=2).astype(np.float64)
    if cfg.class_weighting and counts.min() > 0:
        weights = counts.sum() / (2.0 * counts)
    else:
        weights = np.ones(2)
    criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device),
                                          label_smoothing=cfg.label_smoothing)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = len(dctx.epoch_batches(train_rows, cfg.batch_size, None))  # [ddp] this rank's steps
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch)) if cfg.epochs > 1 else 0
    warmup = min(warmup, total_steps - 1)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total_steps))
    use_amp = bool(cfg.amp and device == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[dict[str, Any]] = []
    best_f1, best_epoch, bad_epochs, start_epoch = -1.0, 0, 0, 1
    if resuming and dctx.is_main:  # [ddp] rank 0 reads the checkpoint, share_resume hands it on
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
        model.load_state_dict(_load_weights(ckpt / "last.safetensors"))
        opt_state = torch.load(ckpt / "optim.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        scaler.load_state_dict(opt_state["scaler"])
        history, best_f1, best_epoch = st["history"], st["best_f1"], st["best_epoch"]
        bad_epochs, start_epoch = st["bad_epochs"], st["epoch"] + 1
        log(f"resuming after epoch {st['epoch']} (best val F1 {best_f1:.4f} at epoch {best_epoch})")
    history, best_f1, best_epoch, bad_epochs, start_epoch = dctx.share_resume(  # [ddp]
        resuming, model, optimizer, scheduler, scaler, (history, best_f1, best_epoch, bad_epochs, start_epoch))
    # After a resume's checkpoint restore: the features are those of the frozen weights actually used.
    use_fc = cfg.uses_feature_cache()
    feats: np.ndarray | None = None
    if use_fc:
        t_fc = time.time()
        from rich.progress import Progress as _P

        with dctx.local_main_first(), _P(console=console, disable=not cfg.progress, transient=True) as fp:  # [ddp]
            ft = fp.add_task("frozen-block features (8 views)", total=len(images))
            feats = prefix_features(model, images, pcfg, cfg.freeze_blocks, device=device,
                                    store=(cache_dir / "features") if cache_dir is not None else None,
                                    progress=lambda done, tot: fp.update(ft, completed=done))
        log(f"frozen stem + blocks 0-{cfg.freeze_blocks - 1}: features of {len(images)} cells x 8 views "
            f"{tuple(feats.shape[2:])} ready in {time.time() - t_fc:.0f}s; training the top on them")

    def predict_val(amp: bool, rows: np.ndarray = val_rows) -> np.ndarray:
        """Validation logits of the model as it will be shipped (test-time views, threshold shift)."""
        if feats is not None:
            return predict_features(model, feats, rows, cfg.freeze_blocks, cfg.tta, cfg.threshold)
        return predict_rows(TestTimeModel(model, cfg.tta, cfg.threshold), images, rows, pcfg, device, amp=amp,
                            channels_last=cfg.channels_last)

    # [ddp] the training forward pass: through DistributedDataParallel under torchrun
    train_forward = dctx.wrap(model, (lambda x: top_forward(model, x, cfg.freeze_blocks)) if feats is not None else model)

    params = sum(p.numel() for p in model.parameters())
    log(f"[bold]model[/] {cfg.arch} ({params / 1e6:.2f} M parameters, {'ImageNet init' if cfg.pretrained else 'random init'}), "
        f"{size}px, device {device}{', AMP' if use_amp else ''}; class weights hem {weights[0]:.2f} / all {weights[1]:.2f}")

    t_start = time.time()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[stats]}"))
    with Progress(*columns, console=console, disable=not cfg.progress) as prog:
        total_task = prog.add_task("epochs", total=cfg.epochs, completed=start_epoch - 1, stats="")
        for epoch in range(start_epoch, cfg.epochs + 1):
            if cfg.patience and cfg.select == "best" and len(val_rows) and bad_epochs >= cfg.patience:
                break
            t0 = time.time()
            torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout / drop-connect, reproducible across resume
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            batches = dctx.epoch_batches(train_rows, cfg.batch_size, g, seed=cfg.seed, epoch=epoch, log_dir=out,
                                         log=log)  # [ddp] one process: _batches(...); torchrun: this rank's shard
            task = prog.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(batches), stats="")
            model.train()
            for m in frozen:
                m.eval()
            loss_sum, correct, seen = 0.0, 0, 0
            if feats is not None:
                source = _feature_batches(feats, labels_all, batches, g, 8 if cfg.augment == "dihedral" else 1)
            else:
                source = _iterate(images, labels_all, batches, cfg.workers)
            for xb, yb in source:
                if feats is not None:
                    x = xb.to(device, non_blocking=True).contiguous(memory_format=mem_format)
                else:
                    x = to_float01(xb.to(device, non_blocking=True))
                    if cfg.augment != "none":
                        x = augment_batch(x, g, pcfg.stain.black_threshold, dihedral_only=cfg.augment == "dihedral")
                    x = normalize01(x, pcfg).contiguous(memory_format=mem_format)
                yb = yb.to(device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", enabled=use_amp):
                    logits = train_forward(x)  # [ddp]
                    loss = criterion(logits.float(), yb)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"epoch {epoch}: loss became {loss.item()} (try a lower --lr)")
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += float(loss.item()) * len(yb)
                correct += int((logits.argmax(1) == yb).sum().item())
                seen += len(yb)
                prog.update(task, advance=1, stats=f"loss {loss_sum / seen:.4f}  acc {correct / seen:.3f}")
            prog.remove_task(task)
            loss_sum, correct, seen = dctx.sum(loss_sum, correct, seen)  # [ddp] over all ranks
            if len(val_rows):
                vm = _val_metrics(dctx.sharded_predict(lambda r: predict_val(use_amp, r), val_rows, model), y_val)  # [ddp]
            else:
                vm = {"val_loss": None, "val_f1": None, "val_acc": None, "val_auc": None}
            rec = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), **vm,
                   "lr": float(optimizer.param_groups[0]["lr"]), "seconds": round(time.time() - t0, 2)}
            history.append(rec)
            # Without validation the "best" model is simply the latest one.
            improved = cfg.select == "last" or vm["val_f1"] is None or vm["val_f1"] > best_f1 + 1e-9
            if improved:
                best_f1, best_epoch, bad_epochs = (vm["val_f1"] if vm["val_f1"] is not None else -1.0), epoch, 0
            else:
                bad_epochs += 1
            if dctx.is_main:  # [ddp] checkpoints on rank 0 only
                if improved:
                    _save_weights(_state_dict_cpu(model), ckpt / "best.safetensors")
                _save_weights(_state_dict_cpu(model), ckpt / "last.safetensors")
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict()}, ckpt / "optim.pt")
                _write_json(state_file, {"epoch": epoch, "arch": cfg.arch, "preprocess_hash": pcfg.pixel_hash(),
                                         "best_f1": best_f1, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                                         "history": history, "train_config": cfg.to_dict()})
                _write_json(out / "history.json", {"history": history, "best_epoch": best_epoch})
            auc = vm["val_auc"]
            if vm["val_f1"] is None:
                prog.update(total_task, advance=1, stats=f"train loss {rec['train_loss']:.4f}")
                log(f"epoch {epoch:3d}  train loss {rec['train_loss']:.4f}  acc {rec['train_acc']:.3f} | no validation  "
                    f"lr {rec['lr']:.2e}  {rec['seconds']:.0f}s")
            else:
                prog.update(total_task, advance=1, stats=f"val F1 {vm['val_f1']:.4f}" + (" *" if improved else ""))
                log(f"epoch {epoch:3d}  train loss {rec['train_loss']:.4f}  acc {rec['train_acc']:.3f} | val loss "
                    f"{vm['val_loss']:.4f}  F1 {vm['val_f1']:.4f}  acc {vm['val_acc']:.3f}  AUC "
                    f"{'n/a' if auc is None else f'{auc:.4f}'}  lr {rec['lr']:.2e}  {rec['seconds']:.0f}s"
                    + ("  (best)" if improved else ""))
            if on_epoch_end is not None and on_epoch_end(rec) is False:
                log(f"stopped after epoch {epoch} by the caller")
                break
    stopped_early = bool(cfg.patience and cfg.select == "best" and len(val_rows) and bad_epochs >= cfg.patience and len(history) < cfg.epochs)
    if stopped_early:
        log(f"early stop: no better validation F1 for {cfg.patience} epochs")

    # -- best model -> bundle ----------------------------------------------------------------
    if not dctx.is_main:  # [ddp] rank 0 scores the kept model and writes the bundle; the others get its result
        return dctx.result(None)
    dctx.finish(model)  # [ddp] SyncBatchNorm -> BatchNorm
    model.load_state_dict(_load_weights(ckpt / "best.safetensors"))
    model.to(device)
    val_full: dict[str, Any] | None = None
    if len(val_rows):
        # On cached features all 8 views are computed once: the kept model's logits and what each
        # test-time augmentation would have given come from them.
        vp = feature_view_probs(model, feats, val_rows, cfg.freeze_blocks) if feats is not None else None
        logits_val = tta_logits(vp, cfg.tta, cfg.threshold) if vp is not None else predict_val(amp=False)
        prob_val = torch.softmax(torch.from_numpy(logits_val), 1)[:, 1].numpy()
        val_full = compute_metrics(y_val, prob_val, subjects=[manifest[i].get("subject") for i in val_rows])
        if vp is not None:
            val_full["by_tta"] = {
                mode: {k: v for k, v in _val_metrics(tta_logits(vp, mode, cfg.threshold), y_val).items()
                       if k in ("val_f1", "val_auc")} for mode in TTA_VIEW_INDEX}
    elapsed = time.time() - t_start
    split_summary = {k: v for k, v in split.items() if k not in ("train_indices", "val_indices")}
    metrics = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "val": val_full,
        "split": split_summary,
        "train_config": cfg.to_dict(),
        "cache": str(cache_dir) if cache_dir else None,
        "preprocess_hash": pcfg.pixel_hash(),
        "synthetic": synthetic,
        "device": device,
        "train_seconds": round(elapsed, 1),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **dctx.record(cfg.batch_size),  # [ddp] {"distributed": world size, effective batch ...} under torchrun
    }
    bundle_dir = out / "bundle"
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    bundle_metrics: dict[str, Any] = {"best_epoch": best_epoch, "epochs_run": len(history), "split_strategy": split["strategy"],
                                      "patient_disjoint": split["patient_disjoint"], "train_n": len(train_rows)}
    if val_full is not None:
        bundle_metrics.update({"val_weighted_f1": val_full["weighted_f1"], "val_accuracy": val_full["accuracy"],
                               "val_roc_auc": val_full["roc_auc"], "val_n": val_full["n"]})
    model.cpu().eval()
    if feats is not None:
        _check_assembled(model, feats, images, pcfg, cfg.freeze_blocks)
    shipped = TestTimeModel(model, cfg.tta, cfg.threshold)
    save_bundle(bundle_dir, shipped if not shipped.trivial else model, arch=cfg.arch, arch_kwargs=arch_kwargs,
                config=pcfg, input_size=size, metrics=bundle_metrics, synthetic=synthetic, half=cfg.half_weights,
                extra={"training": {k: cfg.to_dict()[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "seed",
                                                                   "pretrained", "augment", "class_weighting", "freeze_blocks")},
                       "recipe": recipe_of(cfg), **dctx.record(cfg.batch_size)})  # [ddp]
    _write_json(bundle_dir / "history.json", {"history": history, "best_epoch": best_epoch})
    _write_json(out / "metrics.json", metrics)
    plots.plot_training_curves(history, out / "training_curves.png", title=f"{cfg.arch} training", synthetic=synthetic,
                               best_epoch=best_epoch)
    if val_full is not None:
        log(f"[bold green]best val weighted F1 {best_f1:.4f}[/] at epoch {best_epoch}; bundle in {bundle_dir} "
            f"({elapsed / 60:.1f} min)")
    else:
        log(f"[bold green]trained {len(history)} epochs without validation[/]; bundle in {bundle_dir} ({elapsed / 60:.1f} min)")
    return dctx.result(TrainResult(out_dir=out, bundle_path=bundle_dir, best_epoch=best_epoch, best_val_f1=best_f1,
                       history=history, metrics=metrics, split=split_summary, val_indices=[int(i) for i in val_rows],
                       val_prob=prob_val if len(val_rows) else None))  # [ddp] dctx.result: to every rank


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


#: TrainConfig fields that define what is trained (a recipe); the others say how a run is executed.
RECIPE_FIELDS = ("arch", "arch_kwargs", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "pretrained",
                 "patience", "augment", "class_weighting", "label_smoothing", "half_weights", "freeze_blocks",
                 "feature_cache", "tta", "threshold", "select", "no_validation", "seed")


#: Recipe fields that only change what the kept model does at test time (and how it is stored): a finished
#: run resumed with other values re-scores and rewrites its bundle without training again.
TEST_TIME_FIELDS = ("tta", "threshold", "half_weights")


def recipe_of(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe part of a training configuration, as stored in the bundle (``bundle.json: recipe``)."""
    d = {k: getattr(cfg, k) for k in RECIPE_FIELDS}
    return {"file": cfg.recipe, "settings": d}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file (TOML): its keys are ``leukedge train`` options (``lr``, ``freeze-blocks`` ...),
    optionally under a ``[train]`` table. Unknown keys are refused, naming the file."""
    import tomllib

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ValueError(f"recipe {p}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"recipe {p}: not valid TOML: {exc}") from exc
    if isinstance(data.get("train"), dict):
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = {"fp16_weights": "half_weights"}.get(name, name)  # the CLI spelling of the option
        if name in ("description", "notes"):
            continue
        if name not in known or name in ("train_indices", "val_indices", "resume", "progress", "quiet"):
            raise ValueError(f"recipe {p}: unknown setting {key!r} (recipe keys are `leukedge train` options)")
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
# Options shared by `leukedge train` and `leukedge cv` (the recipe options), in --help order.
_RECIPE_OPTIONS = [
    click.option("--recipe", "recipe_file", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="TOML file of train options (e.g. recipes/default.toml); options given on the command line win."),
    click.option("--arch", type=click.Choice(["tiny", "efficientnet_lite0", "resnet18", "mobilenetv3_small_100", "efficientnet_b0"]),
                 default="efficientnet_lite0", show_default=True, help="Architecture (see the list above)."),
    click.option("--epochs", type=click.IntRange(1, 10_000), default=10, show_default=True),
    click.option("--batch-size", type=click.IntRange(2, 4096), default=32, show_default=True),
    click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True, help="Peak AdamW learning rate."),
    click.option("--weight-decay", type=click.FloatRange(0), default=0.01, show_default=True),
    click.option("--warmup-epochs", type=click.FloatRange(0), default=1.0, show_default=True,
                 help="Linear warm-up before the cosine decay."),
    click.option("--label-smoothing", type=click.FloatRange(0, 0.5), default=0.0, show_default=True),
    click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, initialisation, shuffling and augmentation."),
    click.option("--pretrained/--no-pretrained", default=True, show_default=True,
                 help="Start from ImageNet weights (efficientnet_lite0's ship with a pip package; timm's need the HF hub)."),
    click.option("--patience", type=click.IntRange(0), default=5, show_default=True,
                 help="Stop after this many epochs without a better validation weighted F1 (0 = never; ignored with --select last)."),
    click.option("--augment", type=click.Choice(AUGMENT_MODES), default="full", show_default=True,
                 help="full: flips, rotations, scale, colour jitter, noise; dihedral: the 8 symmetries of the square only."),
    click.option("--no-augment", is_flag=True, help="Same as --augment none."),
    click.option("--freeze-blocks", type=click.IntRange(0, 16), default=0, show_default=True,
                 help="efficientnet_lite0 only: keep the stem and this many early blocks at their ImageNet weights."),
    click.option("--feature-cache/--no-feature-cache", default=True, show_default=True,
                 help="With --freeze-blocks and --augment dihedral/none: compute the frozen blocks once per cell and view "
                      "(kept in CACHE/features) and train the rest on them; same model, several times faster."),
    click.option("--tta", type=click.Choice(["none", "flip", "d4"]), default="none", show_default=True,
                 help="Test-time augmentation built into the bundle and its ONNX graph: mean over the mirror (flip) "
                      "or the 8 symmetries (d4). Costs that many forward passes per cell."),
    click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True,
                 help="Decision threshold on P(all), e.g. the out-of-fold one `leukedge cv` reports; built into the model."),
    click.option("--select", type=click.Choice(["best", "last"]), default="best", show_default=True,
                 help="Keep the best validation epoch, or the last one (a fixed epoch budget; what `cv` uses)."),
    click.option("--fp16-weights", "half_weights", is_flag=True,
                 help="Store the bundle weights as float16 (half the size; loaded as float32)."),
]
# How a run is executed (not part of a recipe).
_RUN_OPTIONS = [
    click.option("--workers", type=click.IntRange(0, 64), default=0, show_default=True, help="Data-loading worker processes."),
    click.option("--threads", type=click.IntRange(0, 512), default=0, show_default=True, help="Torch CPU threads (0 = torch default)."),
    click.option("--resume", is_flag=True, help="Continue from the run's checkpoints (same split, optimiser and schedule)."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
    click.option("--limit", type=click.IntRange(2), default=None, help="Use at most this many images (quick experiments)."),
    click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines."),
]


def train_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Click command with the recipe and run options of `leukedge train`."""
    for opt in reversed(_RECIPE_OPTIONS + _RUN_OPTIONS):
        f = opt(f)
    return f


def config_from_cli(ctx: click.Context, params: dict[str, Any], defaults: dict[str, Any] | None = None,
                    **extra: Any) -> TrainConfig:
    """A TrainConfig from a recipe file (``--recipe``) overlaid with the options given on the command line.

    ``defaults`` replace the options' own defaults (a command's different default, e.g. ``cv``'s
    ``select="last"``) where neither the command line nor the recipe sets them."""
    from click.core import ParameterSource

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    recipe_file = params.pop("recipe_file", None)
    no_augment = params.pop("no_augment", False)
    explicit = {k for k in params if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    if no_augment:
        params["augment"] = "none"
        explicit.add("augment")
    for k, v in params.items():
        if k in known:
            values[k] = v
    for k, v in (defaults or {}).items():
        if k not in explicit:
            values[k] = v
    if recipe_file:
        try:
            recipe = load_recipe(recipe_file)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--recipe") from exc
        values.update({k: v for k, v in recipe.items() if k not in explicit})
        values["recipe"] = str(recipe_file)
    if values.get("arch") == "tiny":
        values["pretrained"] = False
    if values.get("threads") == 0:
        values["threads"] = None
    values["progress"] = not values.get("quiet", False)
    values.update(extra)
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(f"{recipe_file or 'options'}: {exc}") from exc


def _run_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigMismatchError

    return (ConfigMismatchError, ValueError, FileNotFoundError, FloatingPointError)


@click.command("train")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Run directory: bundle/, history.json, metrics.json, training_curves.png, checkpoints/.")
@train_options
@click.option("--val-fold", type=int, default=None, help="Official fold used for validation (default: the last one when the cache has several folds).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="Fraction of subjects held out when there are no official folds.")
@click.option("--image-level-split", is_flag=True,
              help="Split by image instead of by patient. LEAKS patients into validation: scores become inflated.")
@click.option("--resplit", is_flag=True, help="Ignore the train/val split stored in the cache by `leukedge preprocess` and make a new one.")
@click.option("--no-validation", is_flag=True, help="Train on every labelled image for exactly --epochs epochs and keep the last model.")
@click.pass_context
def train_cmd(ctx: click.Context, cache: str, out_dir: str, **params: Any) -> None:
    """Train a classifier on the preprocessed dataset CACHE (from `leukedge preprocess`).

    Validation is patient-disjoint. By default the cache's own train/val split is used (made by
    `leukedge preprocess`: the last official C-NMC fold when the data spans several folds, else a
    subject-grouped, class-stratified split); --val-fold, --val-fraction with --resplit, or
    --image-level-split (leaks patients, loudly) make a new one. The model with the best
    validation weighted F1 (or the last, with --select last) is saved as a bundle in OUT/bundle
    together with its preprocessing settings and its recipe, next to history.json, metrics.json and
    training_curves.png. A --recipe file (TOML, keys = these options) fixes a whole recipe;
    `leukedge cv` takes the same options.

    \b
    Architectures:
      tiny                   small CNN, trains in minutes on a CPU (demo, tests)
      efficientnet_lite0     EfficientNet-Lite0, ReLU6, ImageNet weights included (default)
      resnet18, mobilenetv3_small_100, efficientnet_b0   timm models (ImageNet weights need the HF hub)
    """
    from .models import PretrainedWeightsUnavailable

    cfg = config_from_cli(ctx, params)
    try:
        train(cache, out_dir, cfg)
    except PretrainedWeightsUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    except _run_errors() as exc:
        raise click.ClickException(f"{cache}: {exc}") from exc
