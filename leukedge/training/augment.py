"""Augmentation and normalisation of training batches (torch, on whole batches).

Inputs are normalised exactly like the Rust core (``(u8/255 - mean)/std``, see
:func:`leukedge.config.normalize_uint8`), so the trained model sees the same numbers at inference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PreprocessConfig


def to_float01(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1] (``u8 / 255`` exactly like the Rust core)."""
    return x_u8.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def normalize01(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """``(x - mean) / std`` per channel with the preprocessing settings' mean and std."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_batch(x: torch.Tensor, g: torch.Generator, black_threshold: int = 10,
                  dihedral_only: bool = False) -> torch.Tensor:
    """Random flips, 90° rotations, small free rotation/scale, brightness / colour / saturation jitter
    and Gaussian noise for a float NCHW batch in [0, 1].  Photometric changes are multiplicative so
    the black background stays black, and noise is only added to the cell (non-black pixels).
    ``dihedral_only``: just the flips and 90° rotations (the 8 symmetries of the square)."""
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
        nf = int(free.sum())
        ang = (torch.rand(nf, generator=g) * 2 - 1) * (math.pi / 4)
        scale = 0.9 + 0.2 * torch.rand(nf, generator=g)
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.zeros(nf, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        theta = theta.to(x.device)
        grid = F.affine_grid(theta, [nf, x.shape[1], x.shape[2], x.shape[3]], align_corners=False)
        x[free] = F.grid_sample(x[free], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    dev = x.device
    bright = (0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)).to(dev)
    gain = (0.93 + 0.14 * torch.rand(n, 3, 1, 1, generator=g)).to(dev)
    sat = (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)).to(dev)
    gray = x.mean(dim=1, keepdim=True)
    x = gray + sat * (x - gray)
    x = x * bright * gain
    x = add_cell_noise(x, g, 0.03, black_threshold)
    return x.clamp_(0.0, 1.0)


def add_cell_noise(x: torch.Tensor, g: torch.Generator, sigma_max: float, black_threshold: int = 10) -> torch.Tensor:
    """Gaussian noise on the cell's pixels only (the black background stays black) of a float NCHW batch in
    [0, 1]; each image's sigma ~ U(0, ``sigma_max``) (in the [0, 1] scale: 1 grey level is 1/255). Not clamped."""
    n, dev = x.shape[0], x.device
    fg = x.amax(dim=1, keepdim=True) > (black_threshold / 255.0)
    sigma = (sigma_max * torch.rand(n, 1, 1, 1, generator=g)).to(dev)
    noise = torch.randn(x.shape, generator=g).to(dev) * sigma
    return torch.where(fg, x + noise, x)


def mixup_batch(x: torch.Tensor, y: torch.Tensor, alpha: float, g: torch.Generator,
                key: tuple[int, ...]) -> tuple[torch.Tensor, Any, float]:
    """mixup (Zhang et al. 2018) of one batch: ``(lam x + (1 - lam) x[perm], y[perm], lam)`` with lam ~ Beta(alpha,
    alpha) drawn from ``key`` (seed, epoch, batch: the same draw after ``--resume``) and ``perm`` from ``g``; the
    caller mixes the loss with the same lam. ``(x, None, 1.0)`` when ``alpha`` is 0 or the batch has one row."""
    if alpha <= 0 or len(y) < 2:
        return x, None, 1.0
    lam = float(np.random.default_rng(key).beta(alpha, alpha))
    perm = torch.randperm(len(y), generator=g).to(y.device)
    return lam * x + (1.0 - lam) * x[perm], y[perm], lam
