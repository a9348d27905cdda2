"""Deadline batcher (the dynamic batcher of Triton Inference Server, in miniature).

A batch is released when it holds ``max_batch`` items (reason ``full``) or when its oldest item
has waited ``max_wait_s`` seconds (reason ``deadline``).  ``flush=True`` releases whatever is
waiting at once (reason ``flush``: ``--once`` runs, shutdown).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Generic, Sequence, TypeVar

T = TypeVar("T")


class DeadlineBatcher(Generic[T]):
    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError("batch size must be >= 1")
        if max_wait_s < 0:
            raise ValueError("max wait must be >= 0")
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self._q: collections.deque[tuple[float, T]] = collections.deque()
        self._cond = threading.Condition()

    def put(self, items: Sequence[T], enqueued_mono: float | None = None) -> None:
        if not items:
            return
        t = time.monotonic() if enqueued_mono is None else enqueued_mono
        with self._cond:
            for it in items:
                self._q.append((getattr(it, "ready_mono", t), it))
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._q)

    def oldest_wait_s(self) -> float:
        with self._cond:
            return time.monotonic() - self._q[0][0] if self._q else 0.0

    def take(self, timeout: float, flush: bool = False) -> tuple[list[T], str | None]:
        """Wait up to ``timeout`` s for a batch; returns ``(items, reason)`` or ``([], None)``."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if len(self._q) >= self.max_batch:
                    return self._pop(self.max_batch), "full"
                if self._q:
                    if flush:
                        return self._pop(len(self._q)), "flush"
                    due = self._q[0][0] + self.max_wait_s
                    if now >= due:
                        return self._pop(len(self._q)), "deadline"
                    wake = min(due, end)
                else:
                    wake = end
                if now >= end:
                    return [], None
                self._cond.wait(max(wake - now, 0.0005))

    def _pop(self, n: int) -> list[T]:
        return [self._q.popleft()[1] for _ in range(min(n, len(self._q)))]

    def drain(self) -> list[T]:
        with self._cond:
            return self._pop(len(self._q))
