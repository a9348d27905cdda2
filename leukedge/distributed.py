"""Data-parallel training under ``torchrun`` (PyTorch DistributedDataParallel).

``leukedge train`` / ``leukedge cv`` started by ``torchrun --nproc-per-node N [--nnodes M ...]`` find the
launcher's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) and:

* join one process group: NCCL when training on CUDA (one GPU per process, ``LOCAL_RANK``), gloo on CPUs;
* give every rank a disjoint shard of each epoch: the permutation of the training rows is the one a
  single process would draw from ``--seed`` and the epoch; rank ``r`` of ``W`` takes every ``W``-th row
  from position ``r`` (the last ``len % W`` rows of the permutation sit the epoch out, so every rank runs
  the same number of steps); ``--batch-size`` is per rank, the effective batch ``W x batch-size``;
* all-reduce gradients (DDP), convert the trainable BatchNorm layers to SyncBatchNorm on GPUs (per-GPU
  batches are small; frozen layers keep their ImageNet statistics; ``LEUKEDGE_SYNC_BN=0`` switches it off);
  CPU ranks use local BatchNorm statistics with DDP's broadcast of rank 0's buffers;
* predict the validation rows sharded over the ranks and gather them, so metrics cover every row;
* write checkpoints, the bundle and the report on rank 0 only; ``--resume`` reads them on rank 0 and
  broadcasts weights, optimiser state and history to the other ranks (no shared file system needed).

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) :func:`context` returns a single-process context whose
hooks are the identity: a plain run takes exactly the code path it took before.

The library knows nothing of Click; messages go through the caller's ``log``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Name of the per-epoch shard log rank 0 writes into the run directory under torchrun.
SHARD_LOG = "shards.jsonl"
#: Process-group timeout: rank 0 alone scores the kept model and writes the bundle while the others wait.
TIMEOUT_ENV = "LEUKEDGE_DIST_TIMEOUT_MIN"
SYNC_BN_ENV = "LEUKEDGE_SYNC_BN"


def env_world() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment (``(0, 0, 1)`` without it)."""

    def _int(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError as exc:
            raise ValueError(f"environment variable {name}={os.environ.get(name)!r} is not an integer") from exc

    world = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local = _int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, local, world


def is_main() -> bool:
    """Whether this process is rank 0 (always true outside torchrun)."""
    return env_world()[0] == 0


def batches(rows: np.ndarray, batch_size: int, g: Any | None, drop_last: bool) -> list[np.ndarray]:
    """One process's batches of ``rows`` (shuffled by ``g`` unless None); with ``drop_last`` a last batch
    smaller than a quarter of ``batch_size`` is left out. ``leukedge.training`` batches with this rule too."""
    import torch

    if g is not None:
        rows = rows[torch.randperm(len(rows), generator=g).numpy()]
    out = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if drop_last and len(out) > 1 and len(out[-1]) < max(2, batch_size // 4):
        out = out[:-1]  # a tiny last batch destabilises BatchNorm
    return out


@dataclass
class DistContext:
    """What a training run needs to know about the process group (``world == 1``: no group at all)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    backend: str | None = None
    device: str = "cpu"
    sync_bn: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- collectives ------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, *values: float) -> tuple[float, ...]:
        """Element-wise sums of ``values`` over the ranks (float64)."""
        if not self.active:
            return tuple(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._object_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return tuple(float(v) for v in t.cpu().tolist())

    def _object_device(self) -> Any:
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The first process of every node runs the block before the others do (a cache one of them fills)."""
        if not self.active:
            yield
            return
        if self.local_rank != 0:
            self.barrier()
        try:
            yield
        finally:
            if self.local_rank == 0:
                self.barrier()

    # -- training hooks -------------------------------------------------------------------------
    def epoch_batches(self, rows: np.ndarray, batch_size: int, g: Any | None, *, seed: int = 0, epoch: int = 0,
                      batches_fn: Callable[..., list[np.ndarray]] | None = None,
                      log_dir: Path | None = None, log: Callable[[str], None] | None = None) -> list[np.ndarray]:
        """This rank's batches of ``rows`` for one epoch (``g`` is the epoch's generator, None = unshuffled).

        Single process: exactly ``batches_fn(rows, batch_size, g, drop_last=True)``. Under torchrun the
        permutation is drawn from ``g`` just as a single process draws it, then sharded (see the module
        docstring); afterwards ``g`` and torch's global RNG are re-seeded per rank so that augmentation and
        dropout differ between ranks while staying a function of (seed, epoch, rank). With ``log_dir`` rank 0
        appends the rows every rank received to ``log_dir/shards.jsonl`` and checks they are disjoint."""
        if batches_fn is None:
            batches_fn = batches
        if not self.active:
            return batches_fn(rows, batch_size, g, drop_last=True)
        import torch

        perm = rows[torch.randperm(len(rows), generator=g).numpy()] if g is not None else rows
        usable = len(perm) - len(perm) % self.world
        mine = perm[self.rank:usable:self.world]
        if g is not None:
            mixed = (int(seed) * 100_003 + int(epoch)) * 1_000_003 + 7919 * (self.rank + 1)
            g.manual_seed(mixed % (2**63))
            torch.manual_seed((int(seed) * 1000 + int(epoch)) * 1_000_003 + 104_729 * (self.rank + 1))
        mine_batches = batches_fn(mine, batch_size, None, drop_last=True)
        if log_dir is not None:
            self._log_shards(log_dir, epoch, mine, len(perm) - usable, log)
        return mine_batches

    def _log_shards(self, log_dir: Path, epoch: int, mine: np.ndarray, left_out: int,
                    log: Callable[[str], None] | None) -> None:
        shards = self.all_gather([int(i) for i in mine])
        if not self.is_main:
            return
        sets = [set(s) for s in shards]
        union: set[int] = set().union(*sets)
        disjoint = len(union) == sum(len(s) for s in sets)
        rec = {"epoch": int(epoch), "world_size": self.world, "disjoint": disjoint, "left_out": int(left_out),
               "ranks": [{"rank": r, "n": len(s), "sha256": hashlib.sha256(np.asarray(sorted(s), np.int64).tobytes()).hexdigest(),
                          "rows": sorted(s)} for r, s in enumerate(shards)]}
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / SHARD_LOG).open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if log is not None:
            log(f"epoch {epoch}: {self.world} ranks x {len(shards[0])} training rows, "
                + ("disjoint" if disjoint else "[bold red]OVERLAPPING[/]")
                + (f", {left_out} row(s) sit this epoch out" if left_out else ""))
        if not disjoint:
            raise RuntimeError(f"internal error: the ranks' shards of epoch {epoch} overlap")

    def wrap(self, model: Any, forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """The training forward pass: ``forward`` itself in one process; under torchrun ``forward`` run
        through a DistributedDataParallel wrapper of ``model`` (so its gradients are all-reduced), after
        converting the trainable BatchNorm layers to SyncBatchNorm on GPUs."""
        if not self.active:
            return forward
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.sync_bn:
            convert_trainable_bn(model)
        holder = _forward_module(model, forward)
        kwargs: dict[str, Any] = {}  # buffers (BatchNorm statistics) follow rank 0 at every forward: the default
        if self.backend == "nccl":
            kwargs["device_ids"] = [torch.cuda.current_device()]
        return DDP(holder, **kwargs)

    def sync_buffers(self, model: Any) -> None:
        """Rank 0's BatchNorm statistics on every rank (before a sharded evaluation)."""
        if not self.active:
            return
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b.data, src=0)

    def sharded_predict(self, predict: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, model: Any) -> np.ndarray:
        """``predict(rows)`` computed on ``rows[rank::world]`` by every rank and gathered in ``rows``' order."""
        if not self.active or len(rows) < self.world:
            return predict(rows)
        self.sync_buffers(model)
        part = predict(rows[self.rank::self.world])
        parts = self.all_gather(np.asarray(part))
        out = np.empty((len(rows), *parts[0].shape[1:]), dtype=parts[0].dtype)
        for r, p in enumerate(parts):
            out[r::self.world] = p
        return out

    def share_resume(self, resuming: bool, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
                     progress: tuple[Any, ...]) -> tuple[Any, ...]:
        """After rank 0 restored a checkpoint: its weights, optimiser / schedule / scaler state and
        ``progress`` (history, best F1, ...) on every rank. Returns ``progress`` (rank 0's)."""
        if not self.active or not resuming:
            return progress
        payload = None
        if self.is_main:
            payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                       "optimizer": _to_device(optimizer.state_dict(), "cpu"), "scheduler": scheduler.state_dict(),
                       "scaler": scaler.state_dict(), "progress": progress}
        payload = self.broadcast(payload)
        if not self.is_main:
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(_to_device(payload["optimizer"], next(model.parameters()).device))
            scheduler.load_state_dict(payload["scheduler"])
            scaler.load_state_dict(payload["scaler"])
        return tuple(payload["progress"])

    def finish(self, model: Any) -> None:
        """Undo :meth:`wrap`'s SyncBatchNorm conversion (the bundle holds a plain model)."""
        if self.active and self.sync_bn:
            revert_sync_bn(model)

    def result(self, res: Any) -> Any:
        """Rank 0's training result on every rank (the others skip scoring and writing the bundle)."""
        return self.broadcast(res) if self.active else res

    def record(self, batch_size: int) -> dict[str, Any]:
        """``{"distributed": {...}}`` for the bundle and metrics under torchrun; ``{}`` in one process
        (whose files stay exactly as before)."""
        return {"distributed": self.info(batch_size)} if self.active else {}

    def info(self, batch_size: int) -> dict[str, Any]:
        """World size, per-rank and effective batch, backend and SyncBatchNorm of this run."""
        return {"world_size": self.world, "batch_per_rank": int(batch_size), "effective_batch": int(batch_size) * self.world,
                "backend": self.backend, "sync_batchnorm": self.sync_bn,
                "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", self.world) or self.world)}


def _forward_module(model: Any, forward: Callable[[Any], Any]) -> Any:
    import torch

    class ForwardModule(torch.nn.Module):
        """``model`` as a submodule, with ``forward`` (e.g. the top of a partly frozen network) as its forward."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self._fn = forward

        def forward(self, x: Any) -> Any:
            return self._fn(x)

    return ForwardModule()


def _to_device(obj: Any, device: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def convert_trainable_bn(module: Any) -> int:
    """Replace, in place, every BatchNorm layer of ``module`` that trains (its weight requires grad) by a
    SyncBatchNorm sharing its parameters and statistics; frozen layers stay as they are. Returns the count."""
    import torch

    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, torch.nn.SyncBatchNorm):
            w = getattr(child, "weight", None)
            if w is not None and w.requires_grad:
                setattr(module, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
                n += 1
        else:
            n += convert_trainable_bn(child)
    return n


def revert_sync_bn(module: Any) -> int:
    """Replace every SyncBatchNorm of ``module`` by a BatchNorm2d sharing its parameters and statistics."""
    import torch

    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.SyncBatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            if child.affine:
                bn.weight, bn.bias = child.weight, child.bias
            if child.track_running_stats:
                bn.running_mean, bn.running_var = child.running_mean, child.running_var
                bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
            n += 1
        else:
            n += revert_sync_bn(child)
    return n


_CURRENT: DistContext | None = None


def context(device: str = "cpu") -> DistContext:
    """The process group of this run, joined on first use (``torchrun``'s env:// rendezvous).

    ``device`` is the resolved training device ("cpu" or "cuda"): NCCL with one GPU per local rank on
    CUDA, gloo otherwise. Outside torchrun (``WORLD_SIZE`` 1 or unset) a context with no group."""
    global _CURRENT
    _, local, world = env_world()
    if world == 1:
        return DistContext(device=device)
    if _CURRENT is not None and _CURRENT.world == world:
        if _CURRENT.device != device:
            raise ValueError(f"this torchrun process already trains on {_CURRENT.device}, not {device}")
        return _CURRENT
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise ValueError(f"LOCAL_RANK {local} but this node has {n} GPU(s): use --nproc-per-node {n} or fewer")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        minutes = float(os.environ.get(TIMEOUT_ENV, "60"))
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=minutes))
        import atexit

        atexit.register(_destroy)
    sync = device == "cuda" and os.environ.get(SYNC_BN_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    _CURRENT = DistContext(rank=dist.get_rank(), local_rank=local, world=dist.get_world_size(), backend=backend,
                           device=device, sync_bn=sync)
    return _CURRENT


def _destroy() -> None:
    """Leave the process group at interpreter exit, after every rank got here.

    Without the barrier a rank could tear its gloo connections down while a peer is still inside its
    last collective (rank 0's final broadcast), and the peer's gloo thread then aborts the process
    ("terminate called without an active exception"). gloo's monitored barrier gives up after 30 s
    instead of waiting forever for a rank that died."""
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=_dt.timedelta(seconds=30))
            else:
                dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: still leave the group
            pass
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at interpreter exit
        pass
