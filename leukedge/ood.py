"""Out-of-distribution score of a model: the energy of its logits, and its calibrated threshold.

The score of an image is its energy ``E = -logsumexp(logits)`` (Liu et al., 2020, "Energy-based
out-of-distribution detection"): low for inputs like the training cells, on which the network's logits
are large, higher for anything else. Unlike the softmax probability it does not saturate: a junk frame
that the model calls ``all`` with p = 0.8 can still have a high energy.

The threshold is a high quantile (default 99.5 %) of the energies of the model's own training cells (a
dataset cache), stored in the bundle's ``bundle.json`` under ``"ood"`` so that it travels with the
weights. ``infer`` and the station reject a cell whose energy lies above it (status ``rejected``, reason
"out of distribution"): it is counted apart and never enters a blast fraction. Rejecting rather than
flagging was chosen because the harm to avoid is a silent wrong count; at the 99.5 % quantile about
0.5 % of cells like the training ones are set aside, which is shown in every summary.

A bundle without ``"ood"`` runs as before (no OOD rejection; the score is still reported).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_QUANTILE = 0.995
SCORE = "energy"


def energy_score(logits: np.ndarray) -> np.ndarray:
    """``-logsumexp(logits, axis=1)`` in float64 (stable for large logits); NaN rows stay NaN."""
    z = np.asarray(logits, np.float64)
    m = z.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        return -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))


@dataclass(frozen=True)
class OodThreshold:
    """A calibrated energy threshold (as stored in ``bundle.json["ood"]``)."""

    threshold: float
    quantile: float
    n_cells: int
    score: str = SCORE
    cache_pixel_hash: str = ""
    cache: str = ""

    def reason(self, value: float) -> str:
        return (f"out of distribution: energy {value:.3f} is above the model's threshold {self.threshold:.3f} "
                f"(the {100 * self.quantile:g} % quantile of its {self.n_cells:,} training cells): "
                "not like the cells it was trained on")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "ood") -> "OodThreshold":
        """Validate ``bundle.json["ood"]`` (a ValueError names the field)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: must be a JSON object")
        if d.get("score", SCORE) != SCORE:
            raise ValueError(f"{where}: score={d.get('score')!r} is not supported (only {SCORE!r})")
        t, q, n = d.get("threshold"), d.get("quantile"), d.get("n_cells")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"{where}: threshold={t!r} must be a finite number")
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.5 <= q <= 1.0:
            raise ValueError(f"{where}: quantile={q!r} must be in [0.5, 1]")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{where}: n_cells={n!r} must be a positive integer")
        return cls(float(t), float(q), int(n), SCORE, str(d.get("cache_pixel_hash", "")), str(d.get("cache", "")))


def ood_threshold_of(spec: Any) -> OodThreshold | None:
    """The OOD threshold that travels with a model: ``bundle.json["ood"]`` of its bundle (also when the
    model was named by its export folder or engine and the bundle is known), else None."""
    meta = getattr(spec, "meta", None) or {}
    where = f"{getattr(spec, 'path', '')}/bundle.json: ood"
    if "ood" not in meta and getattr(spec, "bundle", None) is not None and getattr(spec, "kind", "") != "bundle":
        from .formats.bundle import META_FILE, read_bundle_object

        meta = read_bundle_object(spec.bundle)
        if meta is None:
            return None
        where = f"{Path(spec.bundle) / META_FILE}: ood"
    d = meta.get("ood") if isinstance(meta, dict) else None
    return None if d is None else OodThreshold.from_dict(d, where)


def calibrate(scores: np.ndarray, quantile: float = DEFAULT_QUANTILE, **info: Any) -> OodThreshold:
    """The threshold at ``quantile`` of the finite ``scores`` of the training cells."""
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite scores to calibrate the OOD threshold on")
    if not 0.5 <= quantile <= 1.0:
        raise ValueError(f"quantile={quantile} must be in [0.5, 1]")
    return OodThreshold(float(np.quantile(s, quantile)), float(quantile), int(s.size), **info)


def cache_scores(predict_logits: Callable[[np.ndarray], np.ndarray], images: np.ndarray, rows: np.ndarray,
                 batch: int = 64, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Energies of ``images[rows]`` (uint8 NHWC cache rows) through ``predict_logits`` (a normalised batch
    -> logits), in batches."""
    out = np.empty(len(rows), np.float64)
    for i in range(0, len(rows), batch):
        idx = rows[i:i + batch]
        out[i:i + len(idx)] = energy_score(predict_logits(np.asarray(images[idx])))
        if progress is not None:
            progress(len(idx))
    return out


def calibrate_bundle(bundle: str | os.PathLike, cache: str | os.PathLike, *, quantile: float = DEFAULT_QUANTILE,
                     split: str | None = "train", backend: str = "auto", batch: int = 64, limit: int | None = None,
                     progress: Callable[[int], None] | None = None) -> OodThreshold:
    """Calibrate the OOD threshold of an existing model ``bundle`` on a dataset ``cache`` of its training
    cells (rows with ``split`` when the cache has splits, else every ok row; the cache's preprocessing must
    be the model's) and store it in ``bundle.json["ood"]``. Returns the threshold."""
    from .config import normalize_uint8
    from .engines import get_backend, resolve_model
    from .formats.bundle import read_bundle_meta, write_bundle_meta
    from .formats.cache import load_cache

    bundle = Path(bundle)
    meta = read_bundle_meta(bundle)
    c = load_cache(cache)
    spec = resolve_model(bundle)
    c.config.require_same_pixels(spec.config, what="cache", against=f"model {bundle}")
    rows = c.indices(split) if split is not None and any(s == split for s in c.splits) else c.ok_indices()
    if limit is not None:
        rows = rows[:limit]
    if len(rows) == 0:
        raise ValueError(f"{cache}: no usable rows to calibrate on")
    with get_backend(backend, spec) as be:

        def logits(x: np.ndarray) -> np.ndarray:
            return np.asarray(be.infer(normalize_uint8(x, c.config, "nchw", be.input_dtype)), np.float64)

        scores = cache_scores(logits, c.images, rows, batch=batch, progress=progress)
    th = calibrate(scores, quantile, cache_pixel_hash=c.pixel_hash, cache=str(Path(cache).resolve()))
    meta["ood"] = th.to_dict()
    write_bundle_meta(bundle, meta)
    return th
