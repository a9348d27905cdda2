"""One training run (:func:`train`): load the cache, split it, build the model and optimiser, restore a checkpoint,
cache frozen features, run the epochs, write the bundle.

Recipe: subject-disjoint validation (official folds when the cache has several, otherwise a subject-grouped,
class-stratified split; :func:`leukedge.data.make_split`), on-the-fly augmentation in torch (:mod:`.augment`),
class-weighted cross-entropy, AdamW with linear warm-up and cosine decay, AMP on CUDA, early stopping on
validation weighted F1, last + best checkpoints (safetensors) and ``resume``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import distributed as _ddp  # [ddp] torchrun / DistributedDataParallel hooks (no-ops in one process)
from .. import plots
from .._util import NULL_REPORTER, PlainReporter, Reporter, as_int, atomic_write_json, format_duration
from ..archs import default_arch_kwargs
from ..artifacts import load_cache
from ..config import PreprocessConfig
from ..data.splits import make_split
from ..evaluate import compute_metrics
from ..models import TestTimeModel, build_model, freeze_stem, save_bundle, top_forward
from .augment import add_cell_noise, augment_batch, mixup_batch, normalize01, to_float01
from .features import (
    TTA_VIEW_INDEX,
    check_assembled,
    feature_batches,
    feature_view_probs,
    predict_features,
    prefix_features,
    tta_logits,
)
from .loop import iterate_batches, predict_rows, resolve_device, seed_everything, val_metrics, warmup_cosine
from .recipe import RECIPE_FIELDS, TEST_TIME_FIELDS, TrainConfig, recipe_of
from .records import RESULTS_CSV, TENSORBOARD_DIR, EpochLogger, load_weights, save_weights, state_dict_cpu, write_results_csv

SPLIT_FILE = "split.json"
CKPT_DIR = "checkpoints"
#: the estimated time per epoch is printed after this many training batches of the run's first epoch
ESTIMATE_AFTER_BATCHES = 5


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, the bundle, the kept epoch and its validation scores."""

    out_dir: Path
    bundle_path: Path
    best_epoch: int
    best_val_f1: float
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    split: dict[str, Any]
    val_indices: list[int] = field(default_factory=list)
    val_prob: np.ndarray | None = None  # P(all) of the kept model (its test-time computation) per validation row


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
        self.train_feats: np.ndarray | None = None  # the noisy training views (cfg.noise), else None
        self.t_start = time.time()
        self.epoch_logger = EpochLogger(out / TENSORBOARD_DIR, enabled=self.dctx.is_main)  # [ddp] rank 0 writes

    # -- phases ---------------------------------------------------------------------------
    def load_inputs(self, cache_path: Any) -> None:
        if isinstance(cache_path, (str, Path)):
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
                atomic_write_json(split_path, split)
        split = self.dctx.broadcast(split)  # [ddp]
        self.split_info = split
        self.train_rows = np.asarray(split["train_indices"], dtype=np.int64)
        self.val_rows = np.asarray(split["val_indices"], dtype=np.int64)
        self.labels_all = np.array([max(as_int(r.get("label")), 0) for r in manifest], dtype=np.int64)
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
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
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
        self.model.load_state_dict(load_weights(weights))
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
            if cfg.noise > 0:
                with self.dctx.local_main_first(), self.rep.progress(
                        f"frozen-block features of the noisy training views (noise {cfg.noise:g})", total=len(inp.images),
                        transient=True) as ft:  # [ddp]
                    self.train_feats = prefix_features(
                        self.model, inp.images, inp.pcfg, cfg.freeze_blocks, device=self.device, noise=cfg.noise,
                        seed=cfg.seed, store=(inp.cache_dir / "features") if inp.cache_dir is not None else None,
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
            feats = self.train_feats if self.train_feats is not None else self.feats
            return feature_batches(feats, self.labels_all, batches, g, 8 if self.cfg.augment == "dihedral" else 1)
        return iterate_batches(self.inp.images, self.labels_all, batches, self.cfg.workers)

    def _inputs_on_device(self, xb: Any, g: Any) -> Any:
        """A batch as the network takes it: cached features as they are; images as float, augmented, normalised."""
        cfg, pcfg = self.cfg, self.inp.pcfg
        if self.feats is not None:
            return xb.to(self.device, non_blocking=True).contiguous(memory_format=self.mem_format)
        x = to_float01(xb.to(self.device, non_blocking=True))
        if cfg.augment != "none":
            x = augment_batch(x, g, pcfg.stain.black_threshold, dihedral_only=cfg.augment == "dihedral")
        if cfg.noise > 0:
            x = add_cell_noise(x, g, cfg.noise / 255.0, pcfg.stain.black_threshold).clamp_(0.0, 1.0)
        return normalize01(x, pcfg).contiguous(memory_format=self.mem_format)

    def run_epoch(self, epoch: int) -> tuple[dict[str, Any], bool]:
        """One pass over the training rows, then validation; returns the history record and whether it improved."""
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
                x, y_mix, lam = mixup_batch(x, yb, self.cfg.mixup, g, (self.cfg.seed, epoch, i))
                with torch.autocast("cuda", enabled=self.use_amp):
                    logits = self.train_forward(x)  # [ddp]
                    loss = self.criterion(logits.float(), yb)
                    if y_mix is not None:
                        loss = lam * loss + (1.0 - lam) * self.criterion(logits.float(), y_mix)
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
        loss_sum, n_correct, n_seen = (float(v) for v in self.dctx.sum(loss_sum, correct, seen))  # [ddp] over all ranks
        if len(self.val_rows):
            vm = val_metrics(self.dctx.sharded_predict(lambda r: self.predict_val(self.use_amp, r), self.val_rows,  # [ddp]
                                                        self.model), self.y_val)
        else:
            vm = {"val_loss": None, "val_f1": None, "val_acc": None, "val_auc": None}
        rec = {"epoch": epoch, "train_loss": loss_sum / max(n_seen, 1), "train_acc": n_correct / max(n_seen, 1), **vm,
               "lr": float(self.optimizer.param_groups[0]["lr"]), "seconds": round(time.time() - t0, 2)}
        # Without validation the "best" model is simply the latest one; under select="last" the latest is kept
        # whatever its score, but only an epoch that beats every earlier one is called "(best)".
        earlier = [float(h["val_f1"]) for h in self.history if h.get("val_f1") is not None]
        rec["best_so_far"] = vm["val_f1"] is not None and all(vm["val_f1"] > f + 1e-9 for f in earlier)
        self.history.append(rec)
        improved = cfg.select == "last" or vm["val_f1"] is None or vm["val_f1"] > self.best_f1 + 1e-9
        if improved:
            self.best_f1, self.best_epoch, self.bad_epochs = (vm["val_f1"] if vm["val_f1"] is not None else -1.0), epoch, 0
            if self.dctx.is_main:  # [ddp] checkpoints on rank 0 only
                save_weights(state_dict_cpu(self.model), self.ckpt / "best.safetensors")
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

        # One consistent checkpoint whenever the process dies: this epoch's weights and optimiser go to
        # new files first, then state.json (written atomically) names them, and only then are the previous
        # epoch's files removed. A kill at any point leaves state.json naming a complete, matching pair.
        ckpt = self.ckpt
        weights, optim = f"last-{epoch:04d}.safetensors", f"optim-{epoch:04d}.pt"
        save_weights(state_dict_cpu(self.model), ckpt / weights)
        tmp = ckpt / f"{optim}.tmp"
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict()}, tmp)
        os.replace(tmp, ckpt / optim)
        atomic_write_json(self.state_file, {"epoch": epoch, "arch": self.cfg.arch, "preprocess_hash": self.inp.pcfg.pixel_hash(),
                                      "best_f1": self.best_f1, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                                      "history": self.history, "train_config": self.cfg.to_dict(),
                                      "weights": weights, "optim": optim})
        for old in [*ckpt.glob("last-*.safetensors"), *ckpt.glob("optim-*.pt"), ckpt / "last.safetensors", ckpt / "optim.pt"]:
            if old.name not in (weights, optim):
                old.unlink(missing_ok=True)
        atomic_write_json(self.out / "history.json", {"history": self.history, "best_epoch": self.best_epoch})
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
        if not len(self.val_rows):
            return None, None
        cfg = self.cfg
        vp = feature_view_probs(self.model, self.feats, self.val_rows, cfg.freeze_blocks) if self.feats is not None else None
        logits_val = tta_logits(vp, cfg.tta, cfg.threshold) if vp is not None else self.predict_val(amp=False)
        prob_val = torch.softmax(torch.from_numpy(logits_val), 1)[:, 1].numpy()
        val_full = compute_metrics(self.y_val, prob_val, subjects=[self.inp.manifest[i].get("subject") for i in self.val_rows])
        if vp is not None:
            val_full["by_tta"] = {
                mode: {k: v for k, v in val_metrics(tta_logits(vp, mode, cfg.threshold), self.y_val).items()
                       if k in ("val_f1", "val_auc")} for mode in TTA_VIEW_INDEX}
        return val_full, prob_val

    def write_bundle(self) -> TrainResult:
        """Load the best weights, validate them, and write ``bundle/``, ``metrics.json`` and the curves."""
        cfg, inp, out, split = self.cfg, self.inp, self.out, self.split_info
        if not self.dctx.is_main:  # [ddp] rank 0 scores the kept model and writes the bundle; the others get its result
            return self.dctx.result(None)
        self.dctx.finish(self.model)  # [ddp] SyncBatchNorm -> BatchNorm
        self.model.load_state_dict(load_weights(self.ckpt / "best.safetensors"))
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
            check_assembled(self.model, self.feats, inp.images, inp.pcfg, cfg.freeze_blocks)
        shipped = TestTimeModel(self.model, cfg.tta, cfg.threshold)
        training = {k: cfg.to_dict()[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "seed", "pretrained",
                                                  "augment", "class_weighting", "freeze_blocks")}
        save_bundle(bundle_dir, shipped if not shipped.trivial else self.model, arch=cfg.arch, arch_kwargs=self.arch_kwargs,
                    config=inp.pcfg, input_size=inp.size, metrics=bundle_metrics, synthetic=inp.synthetic,
                    half=cfg.half_weights, extra={"training": training, "recipe": recipe_of(cfg), **self.dctx.record(cfg.batch_size)})  # [ddp]
        atomic_write_json(bundle_dir / "history.json", {"history": self.history, "best_epoch": self.best_epoch})
        atomic_write_json(out / "metrics.json", metrics)
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
