"""Rust core of leukedge (PyO3 extension ``leukedge._native``).

All pixel work runs with the GIL released. Images are ``uint8`` arrays; colour images are
RGB in ``(H, W, 3)`` layout. Functions that take an image also accept ``(H, W)`` /
``(H, W, 1)`` greyscale (replicated to RGB) and ``(H, W, 4)`` RGBA (alpha dropped). Arrays of
any other dtype are refused with ``ValueError``.

Background masking (used by stain normalisation and bbox cropping): a pixel is background when
``max(R, G, B) <= black_threshold`` or, if ``white_threshold`` is set, when
``min(R, G, B) >= white_threshold``. Background is excluded from every stain fit and is written
as pure black ``(0, 0, 0)`` by the stain normalisers.

Stain normalisation
-------------------
* **Macenko** follows torchstain's NumPy backend step by step (``Io``, ``alpha``, ``beta``;
  NumPy "linear" percentiles; torchstain's H/E ordering; least squares concentrations;
  ``maxC`` = 99th percentile) but fits on foreground pixels only. Output is
  ``Io*exp(-HERef @ C*(maxCRef/maxC))``, values above 255 set to 255, truncated to uint8
  (like torchstain's ``astype(np.uint8)``). ``params=None`` uses torchstain's reference
  ``HERef=[[0.5626,0.2159],[0.7201,0.8012],[0.4062,0.5581]]``, ``maxCRef=[1.9705,1.0308]``;
  fitted params are used as ``HERef``/``maxCRef`` (torchstain's ``fit(target)`` semantics).
* **Reinhard** matches per-channel mean/std in **CIE L*a*b*** (sRGB, D65 white; the formulas of
  torchstain's / skimage's ``rgb2lab``/``lab2rgb``), chosen over Ruderman's lαβ or OpenCV's 8-bit
  LAB because it is the space of the reference implementation (torchstain) we test against, is
  device independent and not quantised. Output is ``clip(rgb, 0, 1)*255`` truncated to uint8.
* **Fallback**: with fewer than ``min_foreground`` foreground pixels, or a degenerate fit (too
  few pixels with OD >= beta, zero variance, collinear stain vectors, non-finite values), the
  image is returned unchanged apart from background set to black, and the fallback flag is
  set. NaN never reaches the output.

Decoding
--------
BMP, PNG, JPEG and TIFF, detected from content. Pixel-exact with
``np.asarray(PIL.Image.open(p).convert("RGB"))`` for 8-bit images and for 16-bit RGB/RGBA
(16-bit samples keep their high byte, ``v >> 8``, as Pillow does). 16-bit greyscale also maps
with ``v >> 8`` (Pillow clips it to 255 instead). Alpha is dropped, not composited. EXIF
orientation is not applied. Images with more than ``max_pixels`` pixels are refused from the
header, before any pixel buffer is allocated (decompression-bomb guard). Only regular files are
read (a FIFO, device or folder is a ``DecodeError``), and only up to :func:`max_file_bytes`. A JPEG
without its end-of-image marker (cut off, half written) is refused as truncated, as Pillow does; so is
a PNG that does not reach its IEND chunk, and a PNG, JPEG or WebP that ends in 64 or more zero bytes
(pre-allocated, not yet fully written: the message says it looks incompletely written). BigTIFF is
not supported.
"""

import os
from typing import Protocol, Sequence, TypedDict, Union, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DecodeError",
    "StainError",
    "ConfigError",
    "DEFAULT_MAX_PIXELS",
    "__version__",
    "decode",
    "fit_stain",
    "normalize_stain",
    "reference_params",
    "resize",
    "foreground_mask",
    "foreground_bbox",
    "preprocess_batch",
    "Pipeline",
    "default_threads",
    "max_file_bytes",
    "cpu_paths",
]

__version__: str
DEFAULT_MAX_PIXELS: int
"""Default pixel-count limit of the decoder (64_000_000)."""

class DecodeError(ValueError):
    """An image could not be decoded: zero-byte, truncated/corrupt, not an image, too large
    (``max_pixels``) or unsupported. The message starts with the file name."""

class StainError(ValueError):
    """Stain parameters could not be fitted (e.g. no usable foreground in the reference images)."""

class ConfigError(ValueError):
    """The preprocessing configuration JSON is invalid (unknown field, value out of range,
    stain ``params`` that do not match ``stain.method``)."""

_ImageArray = npt.NDArray[np.uint8]
_PathLike = Union[str, "os.PathLike[str]"]

class _ItemStatus(TypedDict):
    index: int
    """Position of the item in ``items``."""
    source: str
    """The path as given, or ``"<array #i>"`` / ``"<bytes #i>"`` for in-memory items."""
    ok: bool
    error: str | None
    """Why the item failed (names the file); ``None`` when ``ok``."""
    stain_fallback: bool
    """True when stain normalisation fell back to the unnormalised image (see module docs)."""
    stain_reason: str | None
    """Why the stain normalisation fell back (e.g. ``"only 120 foreground pixels
    (min_foreground=500)"``, ``"optical density has zero variance (uniform colour)"``); ``None``
    when it did not."""
    rejected: str | None
    """Why the cell quality gate (config ``gate``) rejected the frame: no cell, foreground area out of
    range, or the cell touches the frame border. ``ok`` stays true and the pixels are written, but the
    item must not be classified. ``None`` when it passed (or the gate is off)."""
    note: str | None
    """What the user should know about an item that was used: for a TIFF of several pages, ``"TIFF: page 1 of
    N used (only the first page is read)"``. ``None`` for most files (and for errors)."""

def decode(source: _PathLike | bytes, max_pixels: int = 64_000_000) -> _ImageArray:
    """Decode an image file (path) or encoded bytes into a ``(H, W, 3)`` uint8 RGB array.

    Raises:
        DecodeError: zero-byte, truncated or corrupt data, not an image, more than
            ``max_pixels`` pixels (checked from the header before allocating), unsupported
            format (only BMP, PNG, JPEG, TIFF, WebP), or the file cannot be read.
    """

def fit_stain(images: Sequence[_ImageArray] | _ImageArray, config_json: str) -> str:
    """Fit stain parameters for ``config.stain.method`` on the pooled foreground pixels of one
    or more reference images; returns a JSON object to store in ``StainConfig.params``.

    Macenko: ``{"method": "macenko", "he": [[h_r, e_r], [h_g, e_g], [h_b, e_b]], "max_c": [h, e],
    "n_images": k, "n_pixels": n}``. Reinhard: ``{"method": "reinhard", "mean": [L, a, b],
    "std": [L, a, b], ...}`` (CIE L*a*b*, L in 0..100).

    ``images`` may be a list of arrays, a single ``(H, W, C)`` array or an ``(N, H, W, C)`` stack.

    Raises:
        StainError: fewer than ``min_foreground`` foreground pixels in total or a degenerate fit.
        ConfigError: invalid ``config_json``.
    """

def normalize_stain(image: _ImageArray, config_json: str) -> tuple[_ImageArray, bool]:
    """Stain-normalise one image to the config's reference (``stain.params`` or the built-in
    reference). Returns ``(rgb_uint8 (H, W, 3), fallback)``; never raises for degenerate images
    (see "Fallback" in the module docs). ``method="none"`` returns the image unchanged."""

def reference_params(method: str) -> str:
    """The built-in reference parameters of ``method`` ("macenko", "reinhard", "none") as JSON."""

def resize(image: _ImageArray, width: int, height: int, filter: str = "bilinear") -> _ImageArray:
    """Resize a uint8 image (``(H, W)`` or ``(H, W, C)`` with C in 1..4; channels are kept and
    alpha is resized like any other channel) with fast_image_resize.

    ``filter``: ``"bilinear"``, ``"lanczos3"``, ``"box"`` (area average), ``"nearest"``,
    ``"catmullrom"`` (bicubic). The convolution filters use the same kernels and support as
    Pillow's ``Image.resize`` without ``reducing_gap``: bilinear and box agree with Pillow
    within +-1 level (box: except where a source pixel centre falls exactly on a box edge,
    which the two libraries assign differently), nearest is exact. For lanczos3 and catmullrom
    fast_image_resize runs the vertical pass first (Pillow the horizontal one) and both clip
    the uint8 intermediate, so at sharp edges values can differ by several levels; they agree
    within +-2 with Pillow applied in the same pass order.
    """

def foreground_mask(
    image: _ImageArray, black_threshold: int = 10, white_threshold: int | None = None
) -> npt.NDArray[np.bool_]:
    """Boolean ``(H, W)`` mask, True for foreground (see the background rule in the module docs)."""

def foreground_bbox(
    image: _ImageArray, black_threshold: int = 10, white_threshold: int | None = None
) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` (end-exclusive) of the foreground, or ``None``."""

def preprocess_batch(
    items: Sequence[_PathLike | bytes | _ImageArray],
    config_json: str,
    out: np.ndarray | None = None,
    threads: int = 0,
) -> tuple[np.ndarray, list[_ItemStatus]]:
    """Decode, crop, stain-normalise, square and resize a batch in parallel (one-shot form of
    ``Pipeline(config_json).run(items, out, threads)``: the config is parsed on every call).

    Per item: decode (paths / encoded bytes) or take the array -> crop to the foreground bounding
    box plus ``crop_margin`` (``crop="bbox"``; whole image when there is no foreground) -> stain
    normalisation -> make square (``square="pad"``: black padding, centred; ``"crop"``: centre
    crop) -> resize to ``size x size`` with ``filter`` -> write in ``layout``/``dtype``.

    Output: ``(N, 3, S, S)`` for ``layout="nchw"`` or ``(N, S, S, 3)`` for ``"nhwc"``, with
    dtype ``uint8`` (raw pixels), ``float32`` or ``float16``. Float values are
    ``(u8/255 - mean[c]) / std[c]`` computed in float32 from the resized uint8 image
    (identical to ``leukedge.config.normalize_uint8``); float16 is that float32 value rounded to
    nearest-even.

    ``out``: optional preallocated C-contiguous, writeable array with exactly that shape and
    dtype (``ValueError`` otherwise); it is filled and returned. ``threads``: worker threads
    (0 = all cores); pools are cached per thread count. Results do not depend on ``threads``.

    A failing item (unreadable, corrupt, too large, ...) does not raise: its output is
    zero-filled and its status has ``ok=False`` and an ``error`` naming the file. Other items are
    unaffected. Raises only for invalid arguments: ``ConfigError`` (config), ``TypeError``
    (an item that is not a path / bytes / array), ``ValueError`` (non-uint8 or non-image array,
    bad ``out``).
    """

class _NativeConfig(Protocol):
    def to_native_json(self) -> str: ...

@final
class Pipeline:
    """A preprocessing configuration parsed and validated once (every bound lives in the Rust
    core's ``config.rs``), with its stain parameters resolved and its output tables built once.

    ``config`` is the JSON of ``PreprocessConfig.to_native_json()`` or a ``PreprocessConfig``.
    ``leukedge.PreprocessConfig`` validates through this class and caches one per configuration
    (``PreprocessConfig.pipeline()``).

    Raises:
        ConfigError: unknown field, value out of range, or stain ``params`` that do not match
            ``stain.method``.
        TypeError: ``config`` is neither a str nor has ``to_native_json()``.
    """

    def __new__(cls, config: str | _NativeConfig) -> Pipeline: ...
    def run(
        self,
        items: Sequence[_PathLike | bytes | _ImageArray],
        out: np.ndarray | None = None,
        threads: int = 0,
    ) -> tuple[np.ndarray, list[_ItemStatus]]:
        """Decode, crop, stain-normalise, square and resize a batch in parallel; exactly
        :func:`preprocess_batch` with this pipeline's config (see there for the per-item steps, the
        output, ``out``, ``threads`` and errors). Each status also carries ``stain_reason``."""
    def output_shape(self, n: int) -> tuple[int, int, int, int]:
        """Shape of the output for ``n`` items: ``(n, 3, S, S)`` (nchw) or ``(n, S, S, 3)`` (nhwc)."""
    @property
    def config(self) -> str:
        """The validated configuration as JSON, every field explicit (defaults filled in)."""
    @property
    def size(self) -> int:
        """Output side length ``S`` in pixels."""
    @property
    def dtype(self) -> str:
        """Output dtype: ``"float32"``, ``"float16"`` or ``"uint8"``."""
    @property
    def layout(self) -> str:
        """Output layout: ``"nchw"`` or ``"nhwc"``."""
    @property
    def stain_method(self) -> str:
        """``"macenko"``, ``"reinhard"`` or ``"none"``."""

def default_threads() -> int:
    """Number of worker threads used for ``threads=0`` (available CPU cores)."""

def max_file_bytes(max_pixels: int = 64_000_000) -> int:
    """The largest file ``decode`` / ``preprocess_batch`` read for ``max_pixels`` (8 bytes per pixel
    plus 64 MiB); bigger files are refused before they are read."""

def cpu_paths() -> dict[str, bool]:
    """Which SIMD paths run in this process: ``portable`` (True when ``LEUKEDGE_PORTABLE`` forces the
    portable fallbacks; read once, when the first image is processed), ``avx2``, ``avx2_f16c``, ``ssse3``,
    ``resize_simd`` (fast_image_resize's own SIMD)."""
