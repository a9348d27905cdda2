"""Write the fuzz seed corpus: small generated images, valid and broken (deterministic).

``python fuzz/make_corpus.py fuzz/corpus`` regenerates the committed seeds (a few KB each).
``python fuzz/make_corpus.py DIR --real SAMPLE_DIR`` also turns real C-NMC cells from SAMPLE_DIR
into small seeds (cropped, re-encoded, truncated) in DIR at run time; real cells are never
committed.

Every seed starts with the 4 setting bytes read by ``fuzz_native.config_for``.
"""

from __future__ import annotations

import argparse
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SETTINGS = (b"\x00\x00\x00\x00", b"\x01\x01\x11\x90", b"\x06\x02\x22\x05", b"\x0b\x03\x33\xff")


def cell(h: int, w: int, seed: int) -> np.ndarray:
    """A stained blob on black (so bbox crop, stain fit and padding all do something)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - h / 2) / max(h, 1), (xx - w / 2) / max(w, 1))
    img = np.zeros((h, w, 3), np.uint8)
    base = np.array([170, 90, 190]) + rng.integers(-30, 30, (h, w, 3))
    img[r < 0.4] = np.clip(base[r < 0.4], 0, 255)
    img[r < 0.2] = (img[r < 0.2] * 0.5).astype(np.uint8)
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h pixels, with one tiny IDAT."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def png_iccp_bomb(inflated: int) -> bytes:
    """A valid small PNG whose colour profile (iCCP) inflates to ``inflated`` bytes (zlib at 1:1000: 60 MB
    of profile in about 60 KB, within libFuzzer's -max_len). The Rust core stops inflating at 16 MiB."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    prof = b"".join(z.compress(b"\0" * (1 << 20)) for _ in range(inflated >> 20)) + z.flush()
    raw = b"".join(b"\0" + bytes(range(24)) for _ in range(8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
            + chunk(b"iCCP", b"icc\0\0" + prof) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def jpeg_short_scan(jpg: bytes) -> bytes:
    """A JPEG with 70 % of its scan data cut out but its end marker kept (decoders fill the rest grey)."""
    sos = jpg.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(jpg[sos + 2:sos + 4], "big")
    keep = scan_start + (len(jpg) - 2 - scan_start) * 3 // 10
    return jpg[:keep] + b"\xff\xd9"


def jpeg_huffman_overflow(jpg: bytes) -> bytes:
    """A JPEG whose first Huffman table claims 3 codes of length 1 (2 exist), its symbol total kept so that
    the segment still parses: the CI fuzzer found this shape panicking the scan check (jpeg_scan.rs)."""
    counts = jpg.index(b"\xff\xc4") + 5
    out = bytearray(jpg)
    donor = next(j for j in range(counts + 1, counts + 16) if out[j] >= 3)
    out[donor] -= 3
    out[counts] += 3
    return bytes(out)


def bmp_header(w: int, h: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0, 0, 0)
            + b"\0" * 16)


def generated() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    rgb = Image.fromarray(cell(40, 56, 0))
    out["rgb.bmp"] = encode(rgb, "BMP")
    out["rgb.png"] = encode(rgb, "PNG")
    out["rgb.jpg"] = encode(rgb, "JPEG", quality=80)
    out["progressive.jpg"] = encode(rgb, "JPEG", quality=70, progressive=True)
    out["grey.jpg"] = encode(rgb.convert("L"), "JPEG")
    out["rgb.tif"] = encode(rgb, "TIFF")
    out["lzw.tif"] = encode(rgb, "TIFF", compression="tiff_lzw")
    out["rgba.png"] = encode(rgb.convert("RGBA"), "PNG")
    out["palette.png"] = encode(rgb.convert("P"), "PNG")
    out["palette.bmp"] = encode(rgb.convert("P"), "BMP")
    out["grey.png"] = encode(rgb.convert("L"), "PNG")
    out["grey16.png"] = encode(Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)), "PNG")
    out["tall.png"] = encode(Image.fromarray(cell(3000, 2, 1)), "PNG")
    out["wide.png"] = encode(Image.fromarray(cell(1, 2500, 2)), "PNG")
    out["one.bmp"] = encode(Image.fromarray(cell(1, 1, 3)), "BMP")
    out["black.png"] = encode(Image.new("RGB", (30, 20)), "PNG")
    for name in ("rgb.bmp", "rgb.png", "rgb.jpg", "progressive.jpg", "rgb.tif"):
        data = out[name]
        out["half-" + name] = data[: len(data) // 2]
        out["cut-" + name] = data[:-3]
    out["bomb.png"] = png_bomb_header(60_000, 60_000)
    out["bomb-within.png"] = png_bomb_header(2000, 2000)
    out["bomb.bmp"] = bmp_header(100_000, 100_000)
    out["negative.bmp"] = bmp_header(16, -16)
    out["iccp-bomb.png"] = png_iccp_bomb(60 << 20)
    out["short-scan.jpg"] = jpeg_short_scan(out["rgb.jpg"])
    out["huffman-overflow.jpg"] = jpeg_huffman_overflow(out["rgb.jpg"])
    first = Image.new("RGB", (56, 40))
    buf = io.BytesIO()
    first.save(buf, "TIFF", save_all=True, append_images=[rgb, rgb])
    out["multipage.tif"] = buf.getvalue()
    for name in ("rgb.png", "rgb.jpg"):
        data = out[name]
        out["paused-" + name] = data[: len(data) // 2] + bytes(len(data) - len(data) // 2)
    webp = encode(rgb, "WEBP", lossless=True)
    out["paused-rgb.webp"] = webp[: len(webp) // 2] + bytes(len(webp) - len(webp) // 2)
    out["bigtiff.tif"] = b"II\x2b\x00\x08\x00\x00\x00" + bytes(64)
    bf = bytearray(out["rgb.bmp"])
    bf[30:34] = struct.pack("<I", 3)
    out["bitfields24.bmp"] = bytes(bf)
    out["empty"] = b""
    out["text"] = b"hello, I am not an image"
    out["gif"] = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
    return out


def from_real(sample_dir: Path, n: int = 6) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for k, p in enumerate(sorted(sample_dir.rglob("*.bmp"))[:n]):
        im = Image.open(p).convert("RGB")
        w, h = im.size
        small = im.crop((w // 4, h // 4, w // 4 + 96, h // 4 + 72))
        for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp")):
            data = encode(small, fmt)
            out[f"real{k}.{ext}"] = data
            out[f"real{k}-half.{ext}"] = data[: len(data) // 2]
    return out


def write(seeds: dict[str, bytes], dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    for i, (name, data) in enumerate(sorted(seeds.items())):
        (dest / name).write_bytes(SETTINGS[i % len(SETTINGS)] + data)
    return len(seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--real", type=Path, default=None, help="also (only) write seeds made from real cells here")
    a = ap.parse_args()
    n = write(from_real(a.real) if a.real else generated(), a.dest)
    print(f"wrote {n} seeds to {a.dest}")


if __name__ == "__main__":
    main()
