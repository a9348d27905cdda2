"""Fuzz target for the Rust core: ``leukedge._native.decode`` and ``preprocess_batch`` (atheris / libFuzzer).

Each input is ``<4 setting bytes><image bytes>``: the setting bytes pick the preprocessing
(square pad/crop, crop bbox/none, stain method, filter, output size, dtype and layout, a
white threshold), the rest is decoded as an image file. For every input

* ``decode(bytes)`` must return an ``(H, W, 3)`` uint8 array or raise ``DecodeError``;
* ``preprocess_batch([bytes, decoded array])`` must never raise: a bad item is a per-item
  status with an error message that names the item, and an ok item's output is finite;

anything else (another exception, a Rust panic surfacing as ``PanicException``, an abort, a hang
past ``-timeout``, RSS over ``-rss_limit_mb``) is reported by libFuzzer as a crash. The pixel
limit is ``MAX_PIXELS`` (4 M), so memory must stay far below 1 GB whatever a header claims.

Run (see fuzz/run_ci.py for the bounded CI run)::

    python fuzz/fuzz_native.py -max_total_time=60 -rss_limit_mb=1024 -timeout=10 NEW_DIR fuzz/corpus

Coverage: atheris instruments Python only; the harness therefore turns the *outcome* of each call
(file magic, error kind and message, decoded size class, ok/fallback per setting) into one of 1024
Python branches (:func:`signal`), so that libFuzzer keeps inputs that reach new behaviour of the
Rust code even without coverage counters inside it.
"""

from __future__ import annotations

import json
import sys
import zlib

import atheris
import numpy as np

from leukedge import _native

MAX_PIXELS = 4_000_000
SQUARE = ("pad", "crop")
CROP = ("bbox", "none")
STAIN = ("macenko", "reinhard", "none")
FILTERS = ("bilinear", "lanczos3", "box", "nearest", "catmullrom")
SIZES = (8, 16, 31, 64)
DTYPES = (("float32", "nchw"), ("float16", "nhwc"), ("uint8", "nhwc"), ("uint8", "nchw"))


def config_for(b: bytes) -> dict:
    b = (b + b"\0\0\0\0")[:4]
    dtype, layout = DTYPES[b[2] >> 4 & 3]
    white = None if b[3] < 128 else 11 + b[3] % 245
    return {
        "max_pixels": MAX_PIXELS, "square": SQUARE[b[0] & 1], "crop": CROP[b[0] >> 1 & 1],
        "stain": {"method": STAIN[(b[0] >> 2) % 3], "white_threshold": white, "min_foreground": b[1] % 64},
        "filter": FILTERS[b[1] % 5], "size": SIZES[b[2] & 3], "dtype": dtype, "layout": layout,
        "crop_margin": b[3] & 15,
    }


N_BUCKETS = 1024


def _make_branches(n: int):
    """A function with one distinct branch (coverage edge) per bucket: a binary tree of ``if``s."""
    lines = ["def branches(b):"]

    def emit(lo: int, hi: int, depth: int) -> None:
        pad = "    " * depth
        if hi - lo == 1:
            lines.append(f"{pad}return {lo}")
            return
        mid = (lo + hi) // 2
        lines.append(f"{pad}if b < {mid}:")
        emit(lo, mid, depth + 1)
        lines.append(f"{pad}else:")
        emit(mid, hi, depth + 1)

    emit(0, n, 1)
    ns: dict = {}
    exec(compile("\n".join(lines), "<fuzz-branches>", "exec"), ns)  # noqa: S102 - generated, constant code
    return atheris.instrument_func(ns["branches"])


_branches = _make_branches(N_BUCKETS)


def signal(*parts: object) -> None:
    """Turn an outcome into coverage: atheris instruments Python only, so each distinct outcome of the
    Rust calls (error kind and message shape, decoded size class, status) takes its own branch, and
    libFuzzer keeps the inputs that reach new behaviour of the decoders and the pipeline."""
    text = "|".join(str(p) for p in parts)
    text = "".join("#" if c.isdigit() else c for c in text)  # "64x48" and "65x48" are the same outcome
    _branches(zlib.crc32(text.encode()) % N_BUCKETS)


def size_class(shape: tuple[int, ...]) -> str:
    h, w = shape[:2]
    return f"{min(h.bit_length(), 24)}x{min(w.bit_length(), 24)}"


@atheris.instrument_func
def TestOneInput(data: bytes) -> None:
    cfg = config_for(data[:4])
    img_bytes = data[4:]
    items: list = [img_bytes]
    try:
        img = _native.decode(img_bytes, max_pixels=MAX_PIXELS)
    except _native.DecodeError as exc:
        msg = str(exc)
        assert msg.startswith("<bytes>: "), msg
        signal("decode-error", img_bytes[:2], msg[:80])
    else:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0, img.shape
        assert img.shape[0] * img.shape[1] <= MAX_PIXELS
        signal("decoded", img_bytes[:2], size_class(img.shape))
        items.append(img)
    x, st = _native.preprocess_batch(items, json.dumps(cfg), threads=1)
    assert len(st) == len(items)
    for i, s in enumerate(st):
        if s["ok"]:
            assert np.isfinite(x[i].astype(np.float32)).all()
            signal("ok", i, cfg["square"], cfg["crop"], cfg["stain"]["method"], s["stain_fallback"])
        else:
            assert s["error"] and f"#{i}" in s["error"], s
            signal("item-error", i, s["error"][:80])
            assert not x[i].any(), "a failed item's output must be zero"
    if len(items) == 2:  # the same image as bytes and as pixels gives the same result
        assert st[0]["ok"] == st[1]["ok"], st
        if st[0]["ok"]:
            assert np.array_equal(x[0], x[1])


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
