"""How the CPU cores are shared between Rust preprocessing (rayon pool) and a backend's intra-op threads.

:func:`plan_threads` applies the rule :data:`THREAD_RULE` (printed by ``leukedge infer --help``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

# Expected share of the per-image CPU cost taken by the Rust preprocessing when the network also runs on the
# CPU (benchmarks/results/infer.json: decode + stain + resize of a 450x450 cell is ~3-5x cheaper than even the
# "tiny" CNN on ONNX Runtime; real models are heavier still). Used only to split cores automatically.
EXPECTED_PREPROCESS_SHARE = 0.25


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    """How the cores are shared between Rust preprocessing (rayon pool) and the backend (intra-op threads).

    ``backend`` = 0 means "the runtime's own default" (GPU backends, where the CPU side is negligible).
    ``partitioned``: the two stages run at the same time on disjoint core counts (pipelined CPU backend).
    """

    preprocess: int
    backend: int
    cores: int
    backend_on_cpu: bool
    pipeline: bool
    partitioned: bool
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return {"preprocess": self.preprocess, "backend": self.backend, "cores": self.cores,
                "backend_on_cpu": self.backend_on_cpu, "pipeline": self.pipeline, "partitioned": self.partitioned,
                "rule": self.rule}

    def __str__(self) -> str:
        be = "runtime default" if self.backend == 0 else str(self.backend)
        return (f"{self.cores} cores: preprocess {self.preprocess}, backend {be}"
                f" ({'partitioned' if self.partitioned else 'not partitioned'})")


THREAD_RULE = (
    "GPU backend: preprocessing gets every core. CPU backend, pipelined: the cores are split so the two "
    "stages never compete - preprocessing gets round(cores x {share}) clamped to [1, cores-1] (its expected "
    "share of the per-image cost), the backend the rest; a stage given explicitly keeps its count and the other "
    "gets the remaining cores (at least 1). When that share is under one core (fewer than {few} cores), reserving a "
    "core for preprocessing would idle it most of the time, so both stages use every core, still pipelined. "
    "CPU backend, sequential (--no-pipeline): the stages take turns, so each gets every core. One core: both stages "
    "get 1 thread."
).format(share=EXPECTED_PREPROCESS_SHARE, few=math.ceil(1 / EXPECTED_PREPROCESS_SHARE))


def plan_threads(*, backend_on_cpu: bool, pipeline: bool = True, preprocess: int = 0, backend: int = 0,
                 cores: int | None = None, preprocess_share: float = EXPECTED_PREPROCESS_SHARE) -> ThreadPlan:
    """Thread counts for both stages (0 = automatic); the rule is :data:`THREAD_RULE`."""
    n = int(cores or usable_cores())
    if preprocess < 0 or backend < 0:
        raise ValueError("thread counts must be >= 0 (0 = automatic)")
    if not backend_on_cpu:
        return ThreadPlan(preprocess or n, backend, n, False, pipeline, False,
                          "GPU backend: preprocessing uses every core" if not preprocess else "given")
    if not pipeline:
        return ThreadPlan(preprocess or n, backend or n, n, True, False, False,
                          "sequential: each stage uses every core in turn")
    if n == 1:
        return ThreadPlan(preprocess or 1, backend or 1, n, True, True, False, "one core: nothing to partition")
    if preprocess and backend:
        rule = "given"
    elif preprocess:
        backend, rule = max(1, n - preprocess), "backend gets the cores preprocessing leaves"
    elif backend:
        preprocess, rule = max(1, n - backend), "preprocessing gets the cores the backend leaves"
    elif n * preprocess_share < 1:
        # Measured on 2 cores (benchmarks/results/infer.json): ONNX Runtime FP32 on 1 core + preprocessing on
        # the other gave ~270 img/s; both on both cores, pipelined, ~450-500 img/s.
        return ThreadPlan(n, n, n, True, True, False,
                          f"few cores: preprocessing's share ({n} x {preprocess_share:g}) is under one core, "
                          "so both stages use every core, pipelined")
    else:
        preprocess = min(n - 1, max(1, round(n * preprocess_share)))
        backend = n - preprocess
        rule = f"auto split: preprocessing round({n} x {preprocess_share:g}) in [1, {n - 1}], backend the rest"
    return ThreadPlan(preprocess, backend, n, True, True, preprocess + backend <= n, rule)
