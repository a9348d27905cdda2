//! Cropping, squaring and resizing (fast_image_resize, SIMD, single-threaded per call).
//!
//! Filters map to fast_image_resize's *convolution* resizers, which implement the same
//! separable kernels and support as Pillow's `Image.resize` (without `reducing_gap`):
//! `bilinear` (triangle), `lanczos3`, `box` (area average when downscaling), `catmullrom`
//! (bicubic, a = -0.5) and `nearest`. Bilinear and box agree with Pillow within +-1 level;
//! for lanczos3 / catmullrom note that fast_image_resize does the vertical pass first for
//! uint8 images (Pillow the horizontal one), and both clip the uint8 intermediate, so results
//! differ near sharp edges unless compared in the same pass order (see tests/test_native_resize.py).

use std::cell::RefCell;

use fast_image_resize as fr;

use crate::config::{Filter, SquareMode};
use crate::decode::Rgb8;
use crate::error::{Error, Result};
use crate::stain::{all_zero, first_nonzero, last_nonzero};

/// An axis-aligned rectangle `(x0, y0, x1, y1)`, end-exclusive.
pub type Rect = (usize, usize, usize, usize);

pub fn resize_alg(filter: Filter) -> fr::ResizeAlg {
    use fr::FilterType as F;
    match filter {
        Filter::Bilinear => fr::ResizeAlg::Convolution(F::Bilinear),
        Filter::Lanczos3 => fr::ResizeAlg::Convolution(F::Lanczos3),
        Filter::Box => fr::ResizeAlg::Convolution(F::Box),
        Filter::Catmullrom => fr::ResizeAlg::Convolution(F::CatmullRom),
        Filter::Nearest => fr::ResizeAlg::Nearest,
    }
}

/// Grow a bounding box by `margin` pixels on every side, clamped to the image.
pub fn expand_rect(r: Rect, margin: usize, width: usize, height: usize) -> Rect {
    (
        r.0.saturating_sub(margin),
        r.1.saturating_sub(margin),
        (r.2 + margin).min(width),
        (r.3 + margin).min(height),
    )
}

/// Top-left corner `(x, y)` of a `side` x `side` window centred on the rectangle `r` of a
/// `width` x `height` image. Along an axis where the image is at least `side` long, the window is
/// shifted to lie inside the image (no padding, same scale); where it is shorter, the image is
/// centred in the window (the corner is negative: the rest is black padding).
pub fn window_origin(r: Rect, side: usize, width: usize, height: usize) -> (isize, isize) {
    fn axis(a: usize, b: usize, side: usize, len: usize) -> isize {
        if len >= side {
            ((a + b).saturating_sub(side) / 2).min(len - side) as isize
        } else {
            -(((side - len) / 2) as isize)
        }
    }
    (axis(r.0, r.2, side, width), axis(r.1, r.3, side, height))
}

/// The `side` x `side` window of `img` whose top-left corner is `origin` (which may lie outside
/// the image): pixels outside the image are black. `side` comes from the validated config
/// (at most 4096), never from the file.
pub fn crop_window(img: &Rgb8, origin: (isize, isize), side: usize) -> Rgb8 {
    let mut out = Rgb8::black(side, side);
    let (ox, oy) = origin;
    let x0 = ox.max(0) as usize;
    let x1 = ((ox + side as isize).max(0) as usize).min(img.width);
    let y0 = oy.max(0) as usize;
    let y1 = ((oy + side as isize).max(0) as usize).min(img.height);
    if x0 >= x1 || y0 >= y1 {
        return out;
    }
    for y in y0..y1 {
        let dy = (y as isize - oy) as usize;
        let dx = (x0 as isize - ox) as usize;
        let src = &img.data[(y * img.width + x0) * 3..(y * img.width + x1) * 3];
        out.data[(dy * side + dx) * 3..(dy * side + dx) * 3 + src.len()].copy_from_slice(src);
    }
    out
}

/// Centred square inside `r` (for `square = "crop"`).
pub fn centre_square(r: Rect) -> Rect {
    let (w, h) = (r.2 - r.0, r.3 - r.1);
    let side = w.min(h);
    let x0 = r.0 + (w - side) / 2;
    let y0 = r.1 + (h - side) / 2;
    (x0, y0, x0 + side, y0 + side)
}

/// Copy `r` out of `img` into a black square canvas of side `max(w, h)`, centred
/// (for `square = "pad"`).
pub fn pad_to_square(img: &Rgb8, r: Rect) -> Rgb8 {
    let (w, h) = (r.2 - r.0, r.3 - r.1);
    let side = w.max(h);
    let (ox, oy) = ((side - w) / 2, (side - h) / 2);
    let mut out = Rgb8::black(side, side);
    for y in 0..h {
        let src = &img.data[((r.1 + y) * img.width + r.0) * 3..((r.1 + y) * img.width + r.0 + w) * 3];
        let d0 = ((oy + y) * side + ox) * 3;
        out.data[d0..d0 + w * 3].copy_from_slice(src);
    }
    out
}

thread_local! {
    static RESIZER: RefCell<fr::Resizer> = RefCell::new(fr::Resizer::new());
}

/// Run `f` with this thread's resizer, its CPU extensions set by [`crate::cpu::resize_extensions`]
/// (none when the portable paths are forced).
fn with_resizer<R>(f: impl FnOnce(&mut fr::Resizer) -> R) -> R {
    RESIZER.with(|r| {
        let mut r = r.borrow_mut();
        let ext = crate::cpu::resize_extensions();
        if r.cpu_extensions() != ext {
            // SAFETY: `ext` is None or fast_image_resize's own pick of what this CPU supports.
            unsafe { r.set_cpu_extensions(ext) };
        }
        f(&mut r)
    })
}

fn pixel_type(channels: usize) -> Result<fr::PixelType> {
    match channels {
        1 => Ok(fr::PixelType::U8),
        2 => Ok(fr::PixelType::U8x2),
        3 => Ok(fr::PixelType::U8x3),
        4 => Ok(fr::PixelType::U8x4),
        c => Err(Error::Input(format!(
            "cannot resize an image with {c} channels (need 1..4)"
        ))),
    }
}

/// Resize the region `crop` of an interleaved 8-bit image (`channels` per pixel) into `dst`
/// (`dst_w * dst_h * channels` bytes). Alpha, if any, is treated like any other channel.
#[allow(clippy::too_many_arguments)]
pub fn resize_region_into(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    crop: Rect,
    dst: &mut [u8],
    dst_w: usize,
    dst_h: usize,
    filter: Filter,
) -> Result<()> {
    if width == 0 || height == 0 || dst_w == 0 || dst_h == 0 {
        return Err(Error::Input(format!(
            "cannot resize {width}x{height} to {dst_w}x{dst_h}: zero size"
        )));
    }
    if crop.0 >= crop.2 || crop.1 >= crop.3 || crop.2 > width || crop.3 > height {
        return Err(Error::Input(format!(
            "crop {crop:?} is outside a {width}x{height} image"
        )));
    }
    let pt = pixel_type(channels)?;
    let to_u32 = |v: usize, what: &str| u32::try_from(v).map_err(|_| Error::Input(format!("{what}={v} is too large")));
    let src_img = fr::images::ImageRef::new(to_u32(width, "width")?, to_u32(height, "height")?, src, pt)
        .map_err(|e| Error::Input(format!("source buffer: {e}")))?;
    let mut dst_img = fr::images::Image::from_slice_u8(to_u32(dst_w, "width")?, to_u32(dst_h, "height")?, dst, pt)
        .map_err(|e| Error::Input(format!("destination buffer: {e}")))?;
    let opts = fr::ResizeOptions::new()
        .resize_alg(resize_alg(filter))
        .use_alpha(false)
        .crop(
            crop.0 as f64,
            crop.1 as f64,
            (crop.2 - crop.0) as f64,
            (crop.3 - crop.1) as f64,
        );
    with_resizer(|r| r.resize(&src_img, &mut dst_img, &opts))
        .map_err(|e| Error::Input(format!("resize failed: {e}")))
}

/// Bounding box `(x0, y0, x1, y1)` (end-exclusive) of the pixels that are not all-zero in a
/// packed RGB8 image, or `None` when every byte is zero. Rows are skipped with word-wide
/// zero tests, so a mostly black frame costs little.
pub fn nonzero_bbox(data: &[u8], width: usize, height: usize) -> Option<Rect> {
    let stride = 3 * width;
    assert_eq!(data.len(), stride * height);
    let row = |y: usize| &data[y * stride..(y + 1) * stride];
    let y0 = (0..height).find(|&y| !all_zero(row(y)))?;
    let y1 = (y0..height).rev().find(|&y| !all_zero(row(y))).unwrap() + 1;
    let (mut x0, mut x1) = (width, 0);
    for y in y0..y1 {
        let r = row(y);
        // only the parts outside the current column range need looking at
        if let Some(b) = first_nonzero(&r[..3 * x0]) {
            x0 = b / 3;
        }
        let from = 3 * x1.max(x0);
        if let Some(b) = last_nonzero(&r[from..]) {
            x1 = (from + b) / 3 + 1;
        }
    }
    Some((x0, y0, x1.max(x0 + 1), y1))
}

thread_local! {
    /// Intermediate image of [`resize_skipping_black`] (vertical pass result, full source width).
    static VERTICAL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Resize a whole packed RGB8 image into `dst` exactly as [`resize_region_into`] does
/// (bit-identical), but without convolving the all-black parts of the frame (the C-NMC
/// background): a convolution of zeros is zero, so the vertical pass runs only over the columns
/// that hold a non-zero pixel and the horizontal pass only over the rows of its result that
/// are not all zero; everything else is written as black.
///
/// This works because fast_image_resize does two separable passes for uint8 images (vertical
/// first, into a uint8 intermediate, then horizontal), and each 1-D pass alone computes the
/// same coefficients as the combined call: the vertical pass of a column range (crop
/// `(x0, 0, x1 - x0, height)`, full height) and the horizontal pass of a row range of the
/// intermediate (crop `(0, y0, width, rows)`, full width). Falls back to the single call when
/// one direction needs no resampling or the filter is not a convolution.
///
/// Long on purpose: the two passes share the thread-local intermediate buffer and its column and
/// row bounds; read in one place, the bit-identity argument above can be checked line by line.
pub fn resize_skipping_black(
    src: &[u8],
    width: usize,
    height: usize,
    dst: &mut [u8],
    dst_w: usize,
    dst_h: usize,
    filter: Filter,
) -> Result<()> {
    let whole = (0, 0, width, height);
    if filter == Filter::Nearest || width == dst_w || height == dst_h || width == 0 || height == 0 || dst_w == 0 || dst_h == 0 {
        return resize_region_into(src, width, height, 3, whole, dst, dst_w, dst_h, filter);
    }
    if dst.len() != dst_w * dst_h * 3 || src.len() != width * height * 3 {
        return Err(Error::Input(format!(
            "resize buffers: {} / {} bytes for {width}x{height} -> {dst_w}x{dst_h}",
            src.len(),
            dst.len()
        )));
    }
    let Some((x0, _, x1, _)) = nonzero_bbox(src, width, height) else {
        dst.fill(0);
        return Ok(());
    };
    let to_u32 = |v: usize, what: &str| u32::try_from(v).map_err(|_| Error::Input(format!("{what}={v} is too large")));
    let (w32, h32, dw32, dh32) = (
        to_u32(width, "width")?,
        to_u32(height, "height")?,
        to_u32(dst_w, "width")?,
        to_u32(dst_h, "height")?,
    );
    let pt = fr::PixelType::U8x3;
    let alg = resize_alg(filter);
    VERTICAL.with(|v| -> Result<()> {
        let mut mid = v.borrow_mut();
        // only the columns outside [x0, x1) need zeros: the vertical pass writes the rest
        mid.resize(width * dst_h * 3, 0);
        for row in mid.chunks_exact_mut(3 * width) {
            row[..3 * x0].fill(0);
            row[3 * x1..].fill(0);
        }
        let src_img = fr::images::ImageRef::new(w32, h32, src, pt).map_err(|e| Error::Input(format!("source buffer: {e}")))?;
        {
            let mut mid_img = fr::images::Image::from_slice_u8(w32, dh32, &mut mid, pt)
                .map_err(|e| Error::Input(format!("intermediate buffer: {e}")))?;
            let cols = (x1 - x0) as u32;
            let mut view = fr::images::CroppedImageMut::new(&mut mid_img, x0 as u32, 0, cols, dh32)
                .map_err(|e| Error::Input(format!("intermediate view: {e}")))?;
            let opts = fr::ResizeOptions::new()
                .resize_alg(alg)
                .use_alpha(false)
                .crop(x0 as f64, 0.0, cols as f64, height as f64);
            with_resizer(|r| r.resize(&src_img, &mut view, &opts))
                .map_err(|e| Error::Input(format!("resize failed: {e}")))?;
        }
        let stride = 3 * width;
        let row_zero = |y: usize| all_zero(&mid[y * stride + 3 * x0..y * stride + 3 * x1]);
        let Some(y0) = (0..dst_h).find(|&y| !row_zero(y)) else {
            dst.fill(0);
            return Ok(());
        };
        let y1 = (y0..dst_h).rev().find(|&y| !row_zero(y)).unwrap() + 1;
        let ds = 3 * dst_w;
        dst[..y0 * ds].fill(0);
        dst[y1 * ds..].fill(0);
        let mid_img = fr::images::ImageRef::new(w32, dh32, &mid, pt).map_err(|e| Error::Input(format!("intermediate buffer: {e}")))?;
        let mut out = fr::images::Image::from_slice_u8(dw32, (y1 - y0) as u32, &mut dst[y0 * ds..y1 * ds], pt)
            .map_err(|e| Error::Input(format!("destination buffer: {e}")))?;
        let opts = fr::ResizeOptions::new()
            .resize_alg(alg)
            .use_alpha(false)
            .crop(0.0, y0 as f64, width as f64, (y1 - y0) as f64);
        with_resizer(|r| r.resize(&mid_img, &mut out, &opts))
            .map_err(|e| Error::Input(format!("resize failed: {e}")))
    })
}

/// Resize a whole interleaved image to `dst_w x dst_h`.
pub fn resize_image(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    dst_w: usize,
    dst_h: usize,
    filter: Filter,
) -> Result<Vec<u8>> {
    let mut out = vec![0u8; dst_w * dst_h * channels];
    resize_region_into(
        src,
        width,
        height,
        channels,
        (0, 0, width, height),
        &mut out,
        dst_w,
        dst_h,
        filter,
    )?;
    Ok(out)
}

/// Side of the padded canvas used when the exact canvas (`max(w, h)^2` pixels) would exceed
/// `max_pixels`: a few times the output size (so the final resize still averages several
/// source pixels per output pixel), never more than `max_pixels` allows.
fn bounded_canvas_side(size: usize, max_pixels: u64) -> usize {
    let limit = (max_pixels as f64).sqrt().floor() as usize;
    (4 * size).max(size).min(limit.max(1))
}

/// Make the region `r` of `img` square (pad or centre-crop) and resize it into `dst`
/// (`size * size * 3` bytes, packed RGB).
///
/// For `square = "pad"` the content is copied into a black square canvas of side `max(w, h)`
/// and that canvas is resized. The canvas is never allowed to exceed `max_pixels`: a very
/// tall or thin region (say 1 x 16,000,000) would otherwise claim `max(w, h)^2` pixels (768 TB).
/// Such a region is first downscaled (same filter) so that its long side fits a canvas of
/// [`bounded_canvas_side`], then padded and resized; the result differs from the exact one only
/// by the rounding of the intermediate step.
#[allow(clippy::too_many_arguments)]
pub fn square_resize_into(
    img: &Rgb8,
    r: Rect,
    square: SquareMode,
    size: usize,
    filter: Filter,
    dst: &mut [u8],
    max_pixels: u64,
) -> Result<()> {
    let (w, h) = (r.2 - r.0, r.3 - r.1);
    if w == h {
        if r == (0, 0, img.width, img.height) {
            return resize_skipping_black(&img.data, img.width, img.height, dst, size, size, filter);
        }
        return resize_region_into(&img.data, img.width, img.height, 3, r, dst, size, size, filter);
    }
    match square {
        SquareMode::Crop => resize_region_into(
            &img.data,
            img.width,
            img.height,
            3,
            centre_square(r),
            dst,
            size,
            size,
            filter,
        ),
        SquareMode::Pad => {
            let side = w.max(h) as u64;
            let sq = if side.saturating_mul(side) <= max_pixels {
                pad_to_square(img, r)
            } else {
                let t = bounded_canvas_side(size, max_pixels);
                let scale = t as f64 / side as f64;
                let (sw, sh) = (
                    ((w as f64 * scale).round() as usize).clamp(1, t),
                    ((h as f64 * scale).round() as usize).clamp(1, t),
                );
                let mut small = vec![0u8; sw * sh * 3];
                resize_region_into(&img.data, img.width, img.height, 3, r, &mut small, sw, sh, filter)?;
                pad_to_square(&Rgb8::new(sw, sh, small), (0, 0, sw, sh))
            };
            resize_skipping_black(&sq.data, sq.width, sq.height, dst, size, size, filter)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rect_helpers() {
        assert_eq!(expand_rect((5, 5, 10, 10), 8, 12, 100), (0, 0, 12, 18));
        assert_eq!(centre_square((0, 0, 10, 4)), (3, 0, 7, 4));
        assert_eq!(centre_square((2, 1, 5, 9)), (2, 3, 5, 6));
    }

    #[test]
    fn window_origin_centres_then_stays_inside() {
        // 450 x 450 frame, 384 window: centred on the cell when it can be ...
        assert_eq!(window_origin((200, 210, 250, 260), 384, 450, 450), (33, 43));
        // ... shifted inside at a border (no padding, so no change of scale) ...
        assert_eq!(window_origin((0, 0, 40, 30), 384, 450, 450), (0, 0));
        assert_eq!(window_origin((420, 400, 450, 450), 384, 450, 450), (66, 66));
        // ... and the image centred in the window when the image is shorter than it.
        assert_eq!(window_origin((0, 0, 10, 10), 384, 100, 450), (-142, 0));
        assert_eq!(window_origin((0, 0, 300, 20), 8, 300, 20), (146, 6));
    }

    #[test]
    fn crop_window_copies_native_pixels_and_pads_black() {
        let img = Rgb8::new(4, 3, (0..36).map(|v| v as u8 + 1).collect());
        let inside = crop_window(&img, (1, 1), 2);
        assert_eq!((inside.width, inside.height), (2, 2));
        let px = |im: &Rgb8, x: usize, y: usize| im.data[(y * im.width + x) * 3];
        assert_eq!(px(&inside, 0, 0), px(&img, 1, 1));
        assert_eq!(px(&inside, 1, 1), px(&img, 2, 2));
        let padded = crop_window(&img, (-2, -1), 6);
        assert_eq!((padded.width, padded.height), (6, 6));
        for y in 0..6 {
            for x in 0..6 {
                let (sx, sy) = (x as isize - 2, y as isize - 1);
                let want = if (0..4).contains(&sx) && (0..3).contains(&sy) { px(&img, sx as usize, sy as usize) } else { 0 };
                assert_eq!(px(&padded, x, y), want, "({x},{y})");
            }
        }
        assert!(crop_window(&img, (10, 10), 3).data.iter().all(|&v| v == 0));
        assert!(crop_window(&img, (-10, -10), 3).data.iter().all(|&v| v == 0));
    }

    #[test]
    fn pad_centres_content() {
        let img = Rgb8::new(3, 1, vec![1, 1, 1, 2, 2, 2, 3, 3, 3]);
        let sq = pad_to_square(&img, (0, 0, 3, 1));
        assert_eq!((sq.width, sq.height), (3, 3));
        assert_eq!(&sq.data[9..18], &[1, 1, 1, 2, 2, 2, 3, 3, 3]);
        assert!(sq.data[..9].iter().chain(&sq.data[18..]).all(|&v| v == 0));
    }

    #[test]
    fn constant_image_stays_constant_for_all_filters() {
        let img = [50u8, 100, 150].repeat(37 * 23);
        for f in [
            Filter::Bilinear,
            Filter::Lanczos3,
            Filter::Box,
            Filter::Nearest,
            Filter::Catmullrom,
        ] {
            for (dw, dh) in [(10, 10), (64, 80), (1, 1)] {
                let out = resize_image(&img, 37, 23, 3, dw, dh, f).unwrap();
                assert_eq!(out.len(), dw * dh * 3);
                for p in out.chunks_exact(3) {
                    assert_eq!(p, &[50, 100, 150], "{f:?} {dw}x{dh}");
                }
            }
        }
    }

    #[test]
    fn box_downscale_by_two_averages() {
        // 2x2 -> 1x1 with box = mean
        let img = vec![0u8, 0, 0, 100, 100, 100, 50, 50, 50, 250, 250, 250];
        let out = resize_image(&img, 2, 2, 3, 1, 1, Filter::Box).unwrap();
        assert_eq!(out, vec![100, 100, 100]);
        let grey = resize_image(&[0, 100, 50, 250], 2, 2, 1, 1, 1, Filter::Box).unwrap();
        assert_eq!(grey, vec![100]);
    }

    #[test]
    fn square_modes() {
        // 4x2 image: left half 200, right half 100
        let mut data = Vec::new();
        for _y in 0..2 {
            for x in 0..4 {
                let v = if x < 2 { 200 } else { 100 };
                data.extend_from_slice(&[v, v, v]);
            }
        }
        let img = Rgb8::new(4, 2, data);
        let mut dst = vec![0u8; 4 * 4 * 3];
        square_resize_into(&img, (0, 0, 4, 2), SquareMode::Pad, 4, Filter::Nearest, &mut dst, 1 << 20).unwrap();
        // first row is padding
        assert!(dst[..12].iter().all(|&v| v == 0));
        assert_eq!(&dst[12..15], &[200, 200, 200]); // second row, first pixel
        let mut dst = vec![0u8; 2 * 2 * 3];
        square_resize_into(&img, (0, 0, 4, 2), SquareMode::Crop, 2, Filter::Nearest, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst, vec![200, 200, 200, 100, 100, 100, 200, 200, 200, 100, 100, 100]);
    }

    /// A frame with black borders and a few blobs of random colour (and one lone pixel).
    fn blobs(w: usize, h: usize, seed: u64) -> Vec<u8> {
        let mut rng = crate::stain::tests::Rng::new(seed);
        let mut v = vec![0u8; w * h * 3];
        for _ in 0..3 {
            let (cx, cy) = ((rng.next() as usize) % w, (rng.next() as usize) % h);
            let r = 1 + (rng.next() as usize) % (w.min(h) / 3 + 1);
            for y in cy.saturating_sub(r)..(cy + r).min(h) {
                for x in cx.saturating_sub(r)..(cx + r).min(w) {
                    let p = rng.pixel();
                    v[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&p);
                }
            }
        }
        let (x, y) = ((rng.next() as usize) % w, (rng.next() as usize) % h);
        v[(y * w + x) * 3 + 1] = 255;
        v
    }

    #[test]
    fn nonzero_bbox_matches_scan() {
        for (w, h, seed) in [(1usize, 1usize, 1u64), (9, 4, 2), (40, 31, 3), (450, 450, 4), (17, 90, 5)] {
            let img = blobs(w, h, seed);
            let mut want: Option<Rect> = None;
            for y in 0..h {
                for x in 0..w {
                    if img[(y * w + x) * 3..(y * w + x) * 3 + 3] != [0, 0, 0] {
                        let b = want.get_or_insert((x, y, x + 1, y + 1));
                        *b = (b.0.min(x), b.1.min(y), b.2.max(x + 1), b.3.max(y + 1));
                    }
                }
            }
            assert_eq!(nonzero_bbox(&img, w, h), want, "{w}x{h}");
        }
        assert_eq!(nonzero_bbox(&[0; 27], 3, 3), None);
    }

    #[test]
    fn skipping_black_is_bit_identical_to_one_call() {
        let filters = [Filter::Bilinear, Filter::Lanczos3, Filter::Box, Filter::Catmullrom, Filter::Nearest];
        for (w, h, seed) in [(450usize, 450usize, 1u64), (450, 450, 2), (97, 61, 3), (64, 200, 4), (13, 13, 5), (300, 120, 6)] {
            let img = blobs(w, h, seed);
            for f in filters {
                for (dw, dh) in [(224usize, 224usize), (128, 128), (31, 57), (500, 480), (w, 40), (50, h), (1, 1)] {
                    let mut want = vec![0u8; dw * dh * 3];
                    resize_region_into(&img, w, h, 3, (0, 0, w, h), &mut want, dw, dh, f).unwrap();
                    let mut got = vec![7u8; dw * dh * 3];
                    resize_skipping_black(&img, w, h, &mut got, dw, dh, f).unwrap();
                    assert!(got == want, "{w}x{h} -> {dw}x{dh} {f:?}");
                }
            }
        }
        // all black, and a buffer of the wrong size
        let mut out = vec![9u8; 16 * 16 * 3];
        resize_skipping_black(&[0; 40 * 30 * 3], 40, 30, &mut out, 16, 16, Filter::Bilinear).unwrap();
        assert!(out.iter().all(|&v| v == 0));
        assert!(resize_skipping_black(&[0; 40 * 30 * 3], 40, 30, &mut out[..5], 16, 16, Filter::Bilinear).is_err());
    }

    #[test]
    fn errors() {
        assert!(resize_image(&[], 0, 0, 3, 4, 4, Filter::Bilinear).is_err());
        assert!(resize_image(&[0; 5], 1, 1, 5, 4, 4, Filter::Bilinear).is_err());
        let mut dst = vec![0u8; 12];
        assert!(resize_region_into(&[0; 12], 2, 2, 3, (0, 0, 3, 2), &mut dst, 2, 2, Filter::Box).is_err());
    }

    /// A 1 x 1,000,000 region must not allocate a 10^12-pixel canvas: with max_pixels = 10^6
    /// the canvas is bounded, and the result is close to the exact pad-then-resize.
    #[test]
    fn pad_of_very_thin_region_is_bounded() {
        let (w, h) = (3usize, 200_000usize);
        let mut data = vec![0u8; w * h * 3];
        for (i, px) in data.chunks_exact_mut(3).enumerate() {
            let v = (i / w % 251) as u8;
            px.copy_from_slice(&[v, 200, 255 - v]);
        }
        let img = Rgb8::new(w, h, data);
        let mut bounded = vec![0u8; 16 * 16 * 3];
        square_resize_into(&img, (0, 0, w, h), SquareMode::Pad, 16, Filter::Bilinear, &mut bounded, 1_000_000).unwrap();
        // the exact path (canvas 200000^2 = 4e10 px) is too big to run in a test; compare with a
        // 100x smaller image of the same shape instead: both are a thin centred column.
        let centre: Vec<&[u8]> = bounded.chunks_exact(3).skip(7).step_by(16).collect();
        assert!(centre.iter().all(|p| p[1] > 0), "content column present");
        assert!(bounded.chunks_exact(3).step_by(16).all(|p| p == [0, 0, 0]), "left edge is padding");
        assert_eq!(bounded_canvas_side(16, 1_000_000), 64);
        assert_eq!(bounded_canvas_side(224, 10_000), 100);
        // within the limit the exact path is unchanged
        let small = Rgb8::new(2, 6, vec![9; 36]);
        let mut a = vec![0u8; 4 * 4 * 3];
        let mut b = vec![0u8; 4 * 4 * 3];
        square_resize_into(&small, (0, 0, 2, 6), SquareMode::Pad, 4, Filter::Bilinear, &mut a, 36).unwrap();
        let sq = pad_to_square(&small, (0, 0, 2, 6));
        resize_region_into(&sq.data, 6, 6, 3, (0, 0, 6, 6), &mut b, 4, 4, Filter::Bilinear).unwrap();
        assert_eq!(a, b);
    }
}
