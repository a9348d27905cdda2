"""leukedge._native.decode: pixel-exactness against Pillow and refusal of bad files."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cell
from PIL import Image

pytestmark = pytest.mark.timeout(120)


def _pil_rgb(src) -> np.ndarray:
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def bmp_header(width: int, height: int) -> bytes:
    """A 24-bit BMP header (no pixel data) claiming ``width x height`` pixels."""
    return (b"BM" + struct.pack("<IHHI", 70, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0) + b"\0" * 16)


def test_real_sample_bmps_pixel_exact_vs_pillow(native, sample_cells):
    assert len(sample_cells) >= 50
    for p in sample_cells:
        ours = native.decode(str(p))
        assert ours.dtype == np.uint8 and ours.shape == (450, 450, 3)
        np.testing.assert_array_equal(ours, _pil_rgb(p), err_msg=str(p))


def test_path_pathlike_and_bytes_agree(native, tmp_path):
    img = make_cell(40, 52, seed=2)
    p = tmp_path / "c.bmp"
    Image.fromarray(img).save(p)
    a = native.decode(str(p))
    b = native.decode(p)  # os.PathLike
    c = native.decode(p.read_bytes())
    np.testing.assert_array_equal(a, img)
    np.testing.assert_array_equal(b, img)
    np.testing.assert_array_equal(c, img)
    assert a.flags.c_contiguous and a.flags.writeable


def _variants():
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (23, 31, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (23, 31), dtype=np.uint8)
    la = Image.fromarray(rng.integers(0, 256, (23, 31, 2), dtype=np.uint8)[..., 0]).convert("LA")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=50)
    one_bit = Image.fromarray(grey).convert("1")
    return {
        "png-rgb": _encode(Image.fromarray(rgb), "PNG"),
        "png-rgba": _encode(Image.fromarray(rgba), "PNG"),
        "png-grey": _encode(Image.fromarray(grey), "PNG"),
        "png-grey-alpha": _encode(la, "PNG"),
        "png-palette": _encode(pal, "PNG"),
        "png-1bit": _encode(one_bit, "PNG"),
        "bmp-rgb": _encode(Image.fromarray(rgb), "BMP"),
        "bmp-grey": _encode(Image.fromarray(grey), "BMP"),
        "bmp-palette": _encode(pal, "BMP"),
        "bmp-1bit": _encode(one_bit, "BMP"),
        "tiff-rgb": _encode(Image.fromarray(rgb), "TIFF"),
        "tiff-rgba": _encode(Image.fromarray(rgba), "TIFF"),
    }


@pytest.mark.parametrize("name", sorted(_variants()))
def test_8bit_variants_pixel_exact_vs_pillow(native, name):
    data = _variants()[name]
    np.testing.assert_array_equal(native.decode(data), _pil_rgb(io.BytesIO(data)), err_msg=name)


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("fmt", [".png", ".tiff"])
def test_16bit_colour_matches_pillow(native, channels, fmt):
    cv2 = pytest.importorskip("cv2")
    arr = np.random.default_rng(channels).integers(0, 65536, (9, 13, channels), dtype=np.uint16)
    ok, enc = cv2.imencode(fmt, arr)
    assert ok
    data = enc.tobytes()
    ours = native.decode(data)
    np.testing.assert_array_equal(ours, _pil_rgb(io.BytesIO(data)))
    # documented mapping: high byte (cv2 stores BGR(A); we return RGB)
    np.testing.assert_array_equal(ours, (arr[..., [2, 1, 0]] >> 8).astype(np.uint8))


def test_16bit_grey_uses_high_byte(native):
    """Pillow clips I;16 to 255 when converting to RGB; we keep the high byte (documented)."""
    arr = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2700)
    data = _encode(Image.fromarray(arr), "PNG")
    ours = native.decode(data)
    expect = np.repeat((arr >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(ours, expect)


def test_jpeg_close_to_pillow(native):
    img = make_cell(64, seed=3)
    data = _encode(Image.fromarray(img), "JPEG", quality=95)
    ours = native.decode(data).astype(int)
    pil = _pil_rgb(io.BytesIO(data)).astype(int)
    # different IDCT / upsampling implementations: tolerance, not exactness
    diff = np.abs(ours - pil)
    assert diff.mean() < 1.0 and diff.max() <= 12, (diff.mean(), diff.max())


def test_alpha_is_dropped_not_composited(native):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)  # fully transparent
    out = native.decode(_encode(Image.fromarray(rgba), "PNG"))
    assert (out == (200, 100, 50)).all()


def test_one_pixel_image(native):
    data = _encode(Image.fromarray(np.array([[[9, 8, 7]]], np.uint8)), "BMP")
    np.testing.assert_array_equal(native.decode(data), [[[9, 8, 7]]])


# -- errors -------------------------------------------------------------------------------------
def _err(native, src, **kw) -> str:
    with pytest.raises(native.DecodeError) as ei:
        native.decode(src, **kw)
    assert isinstance(ei.value, ValueError)
    return str(ei.value)


def test_zero_byte_file(native, tmp_path):
    p = tmp_path / "empty.bmp"
    p.write_bytes(b"")
    msg = _err(native, p)
    assert "empty.bmp" in msg and "zero-byte" in msg


def test_text_renamed_bmp(native, tmp_path):
    p = tmp_path / "notes.bmp"
    p.write_text("this is not an image\n" * 5)
    msg = _err(native, p)
    assert "notes.bmp" in msg and "not an image" in msg


@pytest.mark.parametrize("fmt", ["BMP", "PNG", "TIFF", "JPEG"])
def test_truncated(native, tmp_path, fmt):
    data = _encode(Image.fromarray(make_cell(80, seed=1)), fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    if fmt == "JPEG":
        # zune-jpeg, like libjpeg, may pad a truncated scan instead of failing; either a clear
        # error or an image of the declared size is acceptable, never a crash.
        try:
            out = native.decode(p)
        except native.DecodeError as e:
            assert "cut.jpeg" in str(e)
        else:
            assert out.shape == (80, 80, 3)
        return
    msg = _err(native, p)
    assert "cut." in msg and "truncated" in msg


def test_bomb_header_refused_quickly(native, tmp_path):
    p = tmp_path / "bomb.bmp"
    p.write_bytes(bmp_header(100_000, 100_000))
    t = time.perf_counter()
    msg = _err(native, p)
    assert time.perf_counter() - t < 1.0
    assert "bomb.bmp" in msg and "too large" in msg
    # within the BMP decoder's own dimension limit our pixel-count check fires first
    p2 = tmp_path / "bomb2.bmp"
    p2.write_bytes(bmp_header(40_000, 40_000))
    msg = _err(native, p2)
    assert "40000x40000" in msg and "max_pixels=64000000" in msg


def test_max_pixels_is_configurable(native):
    data = _encode(Image.fromarray(make_cell(50, 40, seed=1)), "PNG")
    assert native.decode(data, max_pixels=2000).shape == (50, 40, 3)
    msg = _err(native, data, max_pixels=1999)
    assert "40x50" in msg and "max_pixels=1999" in msg


def test_missing_file_and_unsupported(native, tmp_path):
    msg = _err(native, tmp_path / "nope.bmp")
    assert "nope.bmp" in msg and "no such file" in msg
    gif = io.BytesIO()
    Image.fromarray(make_cell(8, seed=0)).save(gif, "GIF")
    msg = _err(native, gif.getvalue())
    assert "unsupported" in msg


def test_bad_argument_types(native):
    with pytest.raises(TypeError):
        native.decode(12345)
    with pytest.raises(ValueError):
        native.decode(b"x", max_pixels=0)


def test_sample_paths_are_real_files(cnmc_sample):
    assert isinstance(cnmc_sample, Path) and cnmc_sample.is_dir()


def test_lossless_webp_equals_the_bmp_pixels_of_real_cells(native, sample_cells, tmp_path):
    """C-NMC fold 1 is shared as lossless WebP: every real sample cell re-encoded so decodes to its BMP's pixels,
    and goes through `preprocess_batch` exactly like the BMP."""
    from leukedge.config import PreprocessConfig, StainConfig

    webps = []
    for p in sample_cells[:12]:
        w = tmp_path / (p.stem + ".webp")
        Image.open(p).save(w, lossless=True)
        np.testing.assert_array_equal(native.decode(str(w)), native.decode(str(p)), err_msg=str(p))
        np.testing.assert_array_equal(native.decode(w.read_bytes()), _pil_rgb(p))
        webps.append(w)
    cfg = PreprocessConfig(stain=StainConfig(method="none"), crop="window", size=64).to_json()
    a, sa = native.preprocess_batch([str(p) for p in sample_cells[:12]], cfg)
    b, sb = native.preprocess_batch([str(w) for w in webps], cfg)
    assert all(s["ok"] for s in sa + sb)
    np.testing.assert_array_equal(a, b)


def test_truncated_or_corrupt_webp_is_a_per_file_error(native, sample_cells, tmp_path):
    good = tmp_path / "good.webp"
    Image.open(sample_cells[0]).save(good, lossless=True)
    data = good.read_bytes()
    cut = tmp_path / "cut.webp"
    cut.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.webp"
    junk.write_bytes(data[:30] + bytes(b ^ 0x5A for b in data[30:]))
    out, status = native.preprocess_batch([str(cut), str(good), str(junk)], '{"size": 32}')
    assert [s["ok"] for s in status] == [False, True, False]
    assert "cut.webp" in status[0]["error"] and "junk.webp" in status[2]["error"]
    assert not out[0].any() and out[1].any()
    with pytest.raises(native.DecodeError, match="cut.webp"):
        native.decode(str(cut))


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"lossless": True})])
def test_pre_sized_half_written_file_is_incomplete_not_ok(native, tmp_path, fmt, kw):
    """Issue 25: a pre-allocated file whose writer paused half way (second half still zeros) used to
    decode as a valid, wrong image for some formats; now it is an error naming the file."""
    data = _encode(Image.fromarray(make_cell(80, seed=3)), fmt, **kw)
    half = len(data) // 2
    p = tmp_path / f"paused.{fmt.lower()}"
    p.write_bytes(data[:half] + bytes(len(data) - half))
    msg = _err(native, p)
    assert str(p) in msg and "incompletely written" in msg and "zero bytes" in msg, msg
    _, st = native.preprocess_batch([str(p)], '{"size": 16}')
    assert not st[0]["ok"] and "incompletely written" in st[0]["error"]


def test_png_must_end_with_iend(native, tmp_path):
    data = _encode(Image.fromarray(make_cell(40, seed=4)), "PNG")
    p = tmp_path / "no-iend.png"
    p.write_bytes(data[:-12] + bytes(12))  # IEND not yet written
    msg = _err(native, p)
    assert "no-iend.png" in msg and "IEND" in msg, msg
    p.write_bytes(data + b"trailer")  # bytes after IEND are tolerated, as Pillow does
    np.testing.assert_array_equal(native.decode(p), _pil_rgb(io.BytesIO(data)))


def test_bigtiff_and_bitfields_24bit_bmp_have_clear_one_line_messages(native, tmp_path):
    big = tmp_path / "big.tif"
    big.write_bytes(b"II\x2b\x00\x08\x00\x00\x00" + bytes(64))
    msg = _err(native, big)
    assert "big.tif" in msg and "BigTIFF" in msg and "\n" not in msg, msg
    bmp = bytearray(_encode(Image.fromarray(make_cell(16, seed=5)), "BMP"))
    bmp[30:34] = struct.pack("<I", 3)  # BI_BITFIELDS with 24 bits per pixel
    bf = tmp_path / "bf.bmp"
    bf.write_bytes(bytes(bmp))
    msg = _err(native, bf)
    assert "bf.bmp" in msg and "BITFIELDS" in msg and "24 bits per pixel" in msg and "\n" not in msg, msg
