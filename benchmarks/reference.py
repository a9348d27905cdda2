"""Vectorised NumPy reference implementations of the Rust core's stain normalisation.

These follow torchstain's NumPy backend (``NumpyMacenkoNormalizer``, ``NumpyReinhardNormalizer``)
line by line, with one difference that the Rust core also makes: **black background is masked
out** (a pixel is background when ``max(R,G,B) <= black_threshold`` or, if set,
``min(R,G,B) >= white_threshold``). Background pixels are excluded from fitting and written as
``(0, 0, 0)``; with too little foreground or a degenerate fit the image is returned unchanged
except for a blackened background, and ``fallback`` is True.

Used by ``tests/test_native_stain.py`` (the Rust core must agree with it) and as baseline (b) of
``benchmarks/bench_preprocess.py``. Pure NumPy; no torchstain needed.
"""

from __future__ import annotations

import numpy as np

HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAXC_REF = np.array([1.9705, 1.0308])
MIN_OD_PIXELS = 16  # same constant as the Rust core


def foreground_mask(img: np.ndarray, black_threshold: int = 10, white_threshold: int | None = None) -> np.ndarray:
    """``(H, W)`` bool, True for foreground."""
    bg = img.max(axis=-1) <= black_threshold
    if white_threshold is not None:
        bg |= img.min(axis=-1) >= white_threshold
    return ~bg


def _fallback(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, bool]:
    out = img.copy()
    out[~mask] = 0
    return out, True


# -- Macenko -----------------------------------------------------------------------------------
def macenko_fit_pixels(px: np.ndarray, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15):
    """Fit on an ``(N, 3)`` uint8 array of foreground pixels. Returns ``(HE, maxC)`` or ``None``
    when degenerate (torchstain's ``__compute_matrices``)."""
    od = -np.log((px.astype(np.float64) + 1) / io)
    odhat = od[~np.any(od < beta, axis=1)]
    if len(odhat) < MIN_OD_PIXELS:
        return None
    cov = np.cov(odhat.T)
    if not np.all(np.isfinite(cov)):
        return None
    vals, eigvecs = np.linalg.eigh(cov)
    if not vals[2] > 0:
        return None
    that = odhat.dot(eigvecs[:, 1:3])
    phi = np.arctan2(that[:, 1], that[:, 0])
    min_phi = np.percentile(phi, alpha)
    max_phi = np.percentile(phi, 100 - alpha)
    v_min = eigvecs[:, 1:3].dot(np.array([(np.cos(min_phi), np.sin(min_phi))]).T)
    v_max = eigvecs[:, 1:3].dot(np.array([(np.cos(max_phi), np.sin(max_phi))]).T)
    if v_min[0] > v_max[0]:
        he = np.array((v_min[:, 0], v_max[:, 0])).T
    else:
        he = np.array((v_max[:, 0], v_min[:, 0])).T
    g = he.T @ he
    det = np.linalg.det(g)
    if not (np.isfinite(det) and det > 1e-10 * g[0, 0] * g[1, 1]):
        return None
    c = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.array([np.percentile(c[0, :], 99), np.percentile(c[1, :], 99)])
    if not (np.all(np.isfinite(max_c)) and np.all(max_c > 1e-6)):
        return None
    return he, max_c, c


def macenko_fit(images, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
                black_threshold: int = 10, white_threshold: int | None = None):
    """Fit reference parameters on the pooled foreground of one or more images -> ``(HE, maxC)``."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    px = np.concatenate([im[foreground_mask(im, black_threshold, white_threshold)] for im in images])
    res = macenko_fit_pixels(px, io, alpha, beta)
    if res is None:
        raise ValueError("degenerate Macenko fit")
    return res[0], res[1]


def macenko_normalize(img: np.ndarray, he_ref: np.ndarray = HE_REF, maxc_ref: np.ndarray = MAXC_REF,
                      io: float = 240.0, alpha: float = 1.0, beta: float = 0.15, black_threshold: int = 10,
                      white_threshold: int | None = None, min_foreground: int = 500) -> tuple[np.ndarray, bool]:
    """Masked torchstain Macenko. Returns ``(uint8 image, fallback)``."""
    mask = foreground_mask(img, black_threshold, white_threshold)
    px = img[mask]
    if len(px) < max(min_foreground, 1):
        return _fallback(img, mask)
    res = macenko_fit_pixels(px, io, alpha, beta)
    if res is None:
        return _fallback(img, mask)
    _, max_c, c = res
    c2 = c / (max_c / np.asarray(maxc_ref))[:, np.newaxis]
    inorm = io * np.exp(-np.asarray(he_ref).dot(c2))
    inorm[inorm > 255] = 255
    out = np.zeros_like(img)
    out[mask] = inorm.T.astype(np.uint8)
    return out, False


# -- Reinhard (CIE L*a*b*, torchstain / skimage formulas) ---------------------------------------
_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423],
                     [0.212671, 0.715160, 0.072169],
                     [0.019334, 0.119193, 0.950227]])
_XYZ2RGB = np.linalg.inv(_RGB2XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb2lab(px: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 sRGB -> float32 L*a*b* (L in 0..100)."""
    arr = px.astype(np.float32) / np.float32(255)
    mask = arr > 0.04045
    arr[mask] = np.power((arr[mask] + 0.055) / 1.055, 2.4)
    arr[~mask] /= 12.92
    xyz = np.dot(arr, _RGB2XYZ.T.astype(np.float32)) / _WHITE.astype(np.float32)
    m = xyz > 0.008856
    xyz[m] = np.cbrt(xyz[m])
    xyz[~m] = 7.787 * xyz[~m] + 16.0 / 116.0
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return np.stack([116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)], axis=-1).astype(np.float32)


def lab2rgb_u8(lab: np.ndarray) -> np.ndarray:
    """L*a*b* -> uint8 sRGB, ``clip(rgb, 0, 1) * 255`` truncated (torchstain)."""
    lab = lab.astype(np.float64)
    y = (lab[..., 0] + 16.0) / 116.0
    x = lab[..., 1] / 500.0 + y
    z = y - lab[..., 2] / 200.0
    xyz = np.stack([x, y, z], axis=-1)
    m = xyz > 0.2068966
    xyz[m] = np.power(xyz[m], 3.0)
    xyz[~m] = (xyz[~m] - 16.0 / 116.0) / 7.787
    xyz *= _WHITE
    rgb = xyz @ _XYZ2RGB.T
    m = rgb > 0.0031308
    rgb[m] = 1.055 * np.power(rgb[m], 1 / 2.4) - 0.055
    rgb[~m] *= 12.92
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def reinhard_fit(images, black_threshold: int = 10, white_threshold: int | None = None):
    """Per-channel L*a*b* mean and population std of the pooled foreground -> ``(mean, std)``."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    px = np.concatenate([im[foreground_mask(im, black_threshold, white_threshold)] for im in images])
    lab = rgb2lab(px).astype(np.float64)
    return lab.mean(axis=0), lab.std(axis=0)


def reinhard_normalize(img: np.ndarray, target_mean, target_std, black_threshold: int = 10,
                       white_threshold: int | None = None, min_foreground: int = 500) -> tuple[np.ndarray, bool]:
    """Masked Reinhard transfer in CIE L*a*b*. Returns ``(uint8 image, fallback)``."""
    mask = foreground_mask(img, black_threshold, white_threshold)
    px = img[mask]
    if len(px) < max(min_foreground, 1):
        return _fallback(img, mask)
    lab = rgb2lab(px).astype(np.float64)
    mu, sd = lab.mean(axis=0), lab.std(axis=0)
    if not (np.all(np.isfinite(sd)) and np.all(sd >= 1e-6)):
        return _fallback(img, mask)
    lab = (lab - mu) / sd * np.asarray(target_std) + np.asarray(target_mean)
    out = np.zeros_like(img)
    out[mask] = lab2rgb_u8(lab)
    return out, False
