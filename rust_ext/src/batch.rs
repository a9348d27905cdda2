//! The fused, parallel preprocessing pipeline:
//! decode -> crop to foreground -> stain normalisation -> square -> resize -> output layout/dtype,
//! writing each item straight into its slice of one output buffer.
//!
//! Per-item failures (unreadable file, bad data, even a panic) never affect other items: the
//! item's output slice is zero-filled and its status carries the error message.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use half::f16;
use rayon::prelude::*;

use crate::config::{Config, CropMode, Layout};
use crate::decode::{channels_to_rgb, decode_bytes, header_pixels, max_file_bytes, read_image_file, Rgb8};
use crate::error::{Error, Result};
use crate::gate;
use crate::resize::{crop_window, expand_rect, square_resize_into, window_origin};
use crate::stain::{fit_in_place, foreground_bbox, normalize_in_place, MaskRule, StainOutcome, StainParams};

/// One input item.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    /// A file on disk.
    Path(PathBuf),
    /// Encoded image bytes (BMP/PNG/JPEG/TIFF/WebP).
    Bytes(&'a [u8]),
    /// Raw interleaved uint8 pixels (`channels` = 1, 2, 3 or 4).
    Pixels {
        data: &'a [u8],
        width: usize,
        height: usize,
        channels: usize,
    },
}

/// Outcome of one item.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ItemStatus {
    pub ok: bool,
    pub error: Option<String>,
    pub stain_fallback: bool,
    pub stain_reason: Option<String>,
    /// Why the cell quality gate rejected the frame (`ok` stays true: the pixels are written; the
    /// caller must not classify it). `None` = passed (or the gate is off).
    pub rejected: Option<String>,
}

/// What [`Pipeline::process_rgb`] learnt about one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    pub stain: StainOutcome,
    pub rejected: Option<String>,
}

/// The output buffer of a whole batch (`n * item_len` elements).
pub enum OutBuf<'a> {
    U8(&'a mut [u8]),
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

/// A validated config with its stain parameters resolved.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub cfg: Config,
    pub params: StainParams,
    /// `lut[c][v] = (v/255 - mean[c]) / std[c]` computed in float32 exactly like
    /// `leukedge.config.normalize_uint8`.
    lut: [[f32; 256]; 3],
    /// `lut` rounded to float16 (built once, not per item).
    lut16: [[f16; 256]; 3],
}

impl Pipeline {
    pub fn new(cfg: Config) -> Result<Pipeline> {
        cfg.validate()?;
        let params = StainParams::from_config(&cfg.stain)?;
        let lut = std::array::from_fn(|c| std::array::from_fn(|v| ((v as f32) / 255.0f32 - cfg.mean[c]) / cfg.std[c]));
        let lut16 = std::array::from_fn(|c| std::array::from_fn(|v| f16::from_f32(lut[c][v])));
        Ok(Pipeline {
            cfg,
            params,
            lut,
            lut16,
        })
    }

    pub fn from_json(json: &str) -> Result<Pipeline> {
        Pipeline::new(Config::from_json(json)?)
    }

    /// Decode / convert a source into RGB8.
    pub fn load(&self, src: &Source<'_>, name: &str) -> Result<Rgb8> {
        self.load_within(src, name, None).map(|(img, _)| img)
    }

    /// [`Pipeline::load`] within a batch's [`PixelBudget`]: the header's pixel count is reserved before
    /// the pixels are decoded, and the returned guard keeps it reserved until the item is done.
    pub fn load_within<'b>(
        &self,
        src: &Source<'_>,
        name: &str,
        budget: Option<&'b PixelBudget>,
    ) -> Result<(Rgb8, Option<BudgetGuard<'b>>)> {
        let decode = |bytes: &[u8], name: &str| {
            let guard = budget.map(|b| b.acquire(header_pixels(bytes)));
            decode_bytes(bytes, name, self.cfg.max_pixels).map(|img| (img, guard))
        };
        match src {
            Source::Path(p) => {
                let bytes = read_image_file(p, max_file_bytes(self.cfg.max_pixels))?;
                decode(&bytes, &p.display().to_string())
            }
            Source::Bytes(b) => decode(b, name),
            Source::Pixels {
                data,
                width,
                height,
                channels,
            } => self.load_pixels(data, *width, *height, *channels, name).map(|img| (img, None)),
        }
    }

    fn load_pixels(&self, data: &[u8], width: usize, height: usize, channels: usize, name: &str) -> Result<Rgb8> {
        if (width as u64) * (height as u64) > self.cfg.max_pixels {
            return Err(Error::Input(format!(
                "{name}: {width}x{height} pixels exceeds max_pixels={}",
                self.cfg.max_pixels
            )));
        }
        channels_to_rgb(data, width, height, channels).map_err(|e| Error::Input(format!("{name}: {e}")))
    }

    /// Everything after decoding: crop, stain, square + resize into `dst` (`size*size*3`
    /// packed RGB bytes).
    pub fn process_rgb(&self, img: Rgb8, dst: &mut [u8]) -> Result<Processed> {
        let cfg = &self.cfg;
        let rule = MaskRule::from_config(&cfg.stain);
        let whole = (0, 0, img.width, img.height);
        let need_bbox = cfg.crop != CropMode::None || cfg.gate.enabled;
        let bbox = if need_bbox {
            foreground_bbox(&img.data, img.width, img.height, rule)
        } else {
            None
        };
        let rejected = gate::check(&img.data, img.width, img.height, bbox, rule, &cfg.gate);
        let mut img = match cfg.crop {
            CropMode::None => img,
            CropMode::Bbox => match bbox.map(|b| expand_rect(b, cfg.crop_margin as usize, img.width, img.height)) {
                Some(r) if r != whole => crop(&img, r),
                _ => img,
            },
            CropMode::Window => {
                let side = cfg.crop_window as usize;
                crop_window(&img, window_origin(bbox.unwrap_or(whole), side, img.width, img.height), side)
            }
        };
        let full = (0, 0, img.width, img.height);
        if cfg.stain.apply_at_output {
            // fit (and blacken the background) at full resolution, transform the output pixels
            let (outcome, transform) = fit_in_place(&mut img.data, &cfg.stain, &self.params);
            square_resize_into(&img, full, cfg.square, cfg.size as usize, cfg.filter, dst, cfg.max_pixels)?;
            if let Some(t) = transform {
                t.apply_non_black(dst);
            }
            return Ok(Processed {
                stain: outcome,
                rejected,
            });
        }
        let outcome = normalize_in_place(&mut img.data, &cfg.stain, &self.params);
        square_resize_into(&img, full, cfg.square, cfg.size as usize, cfg.filter, dst, cfg.max_pixels)?;
        Ok(Processed {
            stain: outcome,
            rejected,
        })
    }

    /// Convert a packed RGB `size x size` image into one item of the output.
    pub fn write_item(&self, rgb: &[u8], out: ItemOut<'_>) {
        let s2 = (self.cfg.size as usize).pow(2);
        match (out, self.cfg.layout) {
            (ItemOut::U8(o), Layout::Nhwc) => o.copy_from_slice(rgb),
            (ItemOut::U8(o), Layout::Nchw) => planar(rgb, o, s2, |_, v| v),
            (ItemOut::F32(o), Layout::Nhwc) => {
                for (d, s) in o.chunks_exact_mut(3).zip(rgb.chunks_exact(3)) {
                    for c in 0..3 {
                        d[c] = self.lut[c][s[c] as usize];
                    }
                }
            }
            (ItemOut::F32(o), Layout::Nchw) => {
                #[cfg(target_arch = "x86_64")]
                if crate::cpu::avx2() {
                    // SAFETY: the CPU supports AVX2 (crate::cpu::avx2).
                    unsafe { planar_normalized_avx2(rgb, s2, &self.cfg.mean, &self.cfg.std, PlanarOut::F32(o)) };
                    return;
                }
                planar(rgb, o, s2, |c, v| self.lut[c][v as usize])
            }
            (ItemOut::F16(o), Layout::Nchw) if simd_f16() => {
                // SAFETY: the CPU supports AVX2 and F16C (simd_f16).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    planar_normalized_avx2(rgb, s2, &self.cfg.mean, &self.cfg.std, PlanarOut::F16(o))
                };
            }
            (ItemOut::F16(o), layout) => {
                let lut16 = &self.lut16;
                match layout {
                    Layout::Nhwc => {
                        for (d, s) in o.chunks_exact_mut(3).zip(rgb.chunks_exact(3)) {
                            for c in 0..3 {
                                d[c] = lut16[c][s[c] as usize];
                            }
                        }
                    }
                    Layout::Nchw => planar(rgb, o, s2, |c, v| lut16[c][v as usize]),
                }
            }
        }
    }

    /// Process one source into `out` (zero-filled on error). Never panics.
    pub fn run_item(&self, src: &Source<'_>, name: &str, out: ItemOut<'_>, scratch: &mut Vec<u8>) -> ItemStatus {
        self.run_item_within(src, name, out, scratch, None)
    }

    /// [`Pipeline::run_item`] within a batch's decode budget.
    fn run_item_within(
        &self,
        src: &Source<'_>,
        name: &str,
        out: ItemOut<'_>,
        scratch: &mut Vec<u8>,
        budget: Option<&PixelBudget>,
    ) -> ItemStatus {
        let s2 = (self.cfg.size as usize).pow(2);
        scratch.resize(3 * s2, 0);
        let res = catch_unwind(AssertUnwindSafe(|| -> Result<Processed> {
            let (img, _held) = self.load_within(src, name, budget)?;
            self.process_rgb(img, scratch)
        }));
        let res = match res {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::Input(format!("{name}: internal error while processing: {msg}")))
            }
        };
        match res {
            Ok(p) => {
                self.write_item(scratch, out);
                ItemStatus {
                    ok: true,
                    error: None,
                    stain_fallback: p.stain.fallback,
                    stain_reason: p.stain.reason,
                    rejected: p.rejected,
                }
            }
            Err(e) => {
                out.zero();
                let mut msg = e.to_string();
                if !msg.contains(name) {
                    msg = format!("{name}: {msg}");
                }
                ItemStatus {
                    ok: false,
                    error: Some(msg),
                    stain_fallback: false,
                    stain_reason: None,
                    rejected: None,
                }
            }
        }
    }

    /// Process a whole batch on a pool of `threads` threads (0 = all cores).
    pub fn run_batch(
        &self,
        sources: &[Source<'_>],
        names: &[String],
        out: OutBuf<'_>,
        threads: usize,
    ) -> Result<Vec<ItemStatus>> {
        let n = sources.len();
        assert_eq!(names.len(), n);
        let len = self.cfg.item_len();
        let got = match &out {
            OutBuf::U8(b) => b.len(),
            OutBuf::F32(b) => b.len(),
            OutBuf::F16(b) => b.len(),
        };
        if got != n * len {
            return Err(Error::Input(format!(
                "output buffer holds {got} values, need {n} x {len}"
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let pool = pool(threads)?;
        let budget = PixelBudget::new(decode_budget_pixels(self.cfg.max_pixels));
        let work = |(i, out): (usize, ItemOut<'_>)| -> ItemStatus {
            SCRATCH.with(|s| self.run_item_within(&sources[i], &names[i], out, &mut s.borrow_mut(), Some(&budget)))
        };
        let statuses = pool.install(|| match out {
            OutBuf::U8(b) => b
                .par_chunks_mut(len)
                .map(ItemOut::U8)
                .enumerate()
                .map(work)
                .collect::<Vec<_>>(),
            OutBuf::F32(b) => b.par_chunks_mut(len).map(ItemOut::F32).enumerate().map(work).collect(),
            OutBuf::F16(b) => b.par_chunks_mut(len).map(ItemOut::F16).enumerate().map(work).collect(),
        });
        Ok(statuses)
    }
}

/// Pixels a batch may hold decoded at once, across all its threads: twice `max_pixels`. Many small
/// images (a C-NMC cell is 0.2 M pixels) still decode in parallel; images near the limit decode two at a
/// time whatever the thread count (eight 64 M-pixel 16-bit PNGs on 8 threads took 6.5 GB before).
pub fn decode_budget_pixels(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(2)
}

/// A counting budget of decoded pixels shared by the threads of one batch (a mutex and a condition
/// variable; a thread waits only while others hold pixels, so one image bigger than the whole budget
/// still runs, alone).
pub struct PixelBudget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl PixelBudget {
    pub fn new(limit: u64) -> PixelBudget {
        PixelBudget {
            limit,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Reserve `pixels`, waiting until they fit beside what other threads hold.
    pub fn acquire(&self, pixels: u64) -> BudgetGuard<'_> {
        let n = pixels.min(self.limit);
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += n;
        BudgetGuard { budget: self, n }
    }

    /// Pixels reserved now.
    pub fn in_use(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Pixels reserved from a [`PixelBudget`], given back when dropped (also on error or panic).
pub struct BudgetGuard<'a> {
    budget: &'a PixelBudget,
    n: u64,
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= self.n;
        self.budget.freed.notify_all();
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One item's slice of the output buffer.
pub enum ItemOut<'a> {
    U8(&'a mut [u8]),
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

impl ItemOut<'_> {
    fn zero(self) {
        match self {
            ItemOut::U8(o) => o.fill(0),
            ItemOut::F32(o) => o.fill(0.0),
            ItemOut::F16(o) => o.fill(f16::ZERO),
        }
    }
}

/// Interleaved RGB -> planar CHW with a per-channel mapping.
#[inline]
fn planar<T: Copy>(rgb: &[u8], out: &mut [T], s2: usize, f: impl Fn(usize, u8) -> T) {
    let (r, rest) = out.split_at_mut(s2);
    let (g, b) = rest.split_at_mut(s2);
    let b = &mut b[..s2];
    for (((p, r), g), b) in rgb
        .chunks_exact(3)
        .zip(r.iter_mut())
        .zip(g.iter_mut())
        .zip(b.iter_mut())
    {
        *r = f(0, p[0]);
        *g = f(1, p[1]);
        *b = f(2, p[2]);
    }
}

/// True when [`planar_normalized_avx2`] can write float16 (AVX2 and F16C).
fn simd_f16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::avx2_f16c()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Destination planes of [`planar_normalized_avx2`].
#[cfg(target_arch = "x86_64")]
enum PlanarOut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

/// Interleaved RGB -> planar CHW `(v/255 - mean[c]) / std[c]`, 8 pixels per step: the same
/// float32 operations as the lookup table of [`Pipeline`] (IEEE division and subtraction are
/// exact-rounded in SIMD too), and for float16 the hardware conversion (round to nearest even,
/// as `f16::from_f32`), so the output is bit-identical to the table path (tested for all values).
///
/// # Safety
/// AVX2 must be available, and F16C for [`PlanarOut::F16`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn planar_normalized_avx2(rgb: &[u8], s2: usize, mean: &[f32; 3], std: &[f32; 3], out: PlanarOut<'_>) {
    use std::arch::x86_64::*;
    assert!(rgb.len() >= 3 * s2);
    let n8 = s2 / 8 * 8;
    // byte c + 3k of 8 pixels: k < 6 (c = 0) or k < 5 from the first 16 bytes, the rest from bytes 16..24
    let lo = |c: i8| -> [i8; 16] {
        std::array::from_fn(|k| {
            let b = c as i32 + 3 * k as i32;
            if k < 8 && b < 16 {
                b as i8
            } else {
                -1
            }
        })
    };
    let hi = |c: i8| -> [i8; 16] {
        std::array::from_fn(|k| {
            let b = c as i32 + 3 * k as i32 - 16;
            if k < 8 && (0..8).contains(&b) {
                b as i8
            } else {
                -1
            }
        })
    };
    let load = |m: [i8; 16]| unsafe { _mm_loadu_si128(m.as_ptr() as *const __m128i) };
    let (ml, mh) = ([load(lo(0)), load(lo(1)), load(lo(2))], [load(hi(0)), load(hi(1)), load(hi(2))]);
    let d255 = _mm256_set1_ps(255.0);
    let mv = mean.map(|m| _mm256_set1_ps(m));
    let sv = std.map(|s| _mm256_set1_ps(s));
    let p = rgb.as_ptr();
    let mut f32_out: Option<[*mut f32; 3]> = None;
    let mut f16_out: Option<[*mut u16; 3]> = None;
    match out {
        PlanarOut::F32(o) => {
            assert!(o.len() >= 3 * s2);
            let b = o.as_mut_ptr();
            // SAFETY: planes start inside `o` (length checked).
            f32_out = Some(unsafe { [b, b.add(s2), b.add(2 * s2)] });
        }
        PlanarOut::F16(o) => {
            assert!(o.len() >= 3 * s2);
            let b = o.as_mut_ptr() as *mut u16;
            // SAFETY: as above; f16 is a transparent u16.
            f16_out = Some(unsafe { [b, b.add(s2), b.add(2 * s2)] });
        }
    }
    let mut j = 0;
    while j < n8 {
        // SAFETY: pixels j..j+8 are inside `rgb` (24 bytes at 3j, j + 8 <= s2), stores of 8
        // values at plane offset j < s2 - 7.
        unsafe {
            let a = _mm_loadu_si128(p.add(3 * j) as *const __m128i);
            let b = _mm_loadl_epi64(p.add(3 * j + 16) as *const __m128i);
            for c in 0..3 {
                let bytes = _mm_or_si128(_mm_shuffle_epi8(a, ml[c]), _mm_shuffle_epi8(b, mh[c]));
                let x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                let y = _mm256_div_ps(_mm256_sub_ps(_mm256_div_ps(x, d255), mv[c]), sv[c]);
                if let Some(o) = f32_out {
                    _mm256_storeu_ps(o[c].add(j), y);
                } else if let Some(o) = f16_out {
                    _mm_storeu_si128(o[c].add(j) as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y));
                }
            }
        }
        j += 8;
    }
    for j in n8..s2 {
        for c in 0..3 {
            let y = ((rgb[3 * j + c] as f32) / 255.0f32 - mean[c]) / std[c];
            // SAFETY: j < s2, inside plane c.
            unsafe {
                if let Some(o) = f32_out {
                    o[c].add(j).write(y);
                } else if let Some(o) = f16_out {
                    o[c].add(j).write(f16::from_f32(y).to_bits());
                }
            }
        }
    }
}

/// Copy a rectangle out of an image.
pub fn crop(img: &Rgb8, r: (usize, usize, usize, usize)) -> Rgb8 {
    let (w, h) = (r.2 - r.0, r.3 - r.1);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in r.1..r.3 {
        data.extend_from_slice(&img.data[(y * img.width + r.0) * 3..(y * img.width + r.2) * 3]);
    }
    Rgb8::new(w, h, data)
}

/// Number of threads for `threads = 0`.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Rayon pools, cached per thread count.
pub fn pool(threads: usize) -> Result<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let n = if threads == 0 { default_threads() } else { threads };
    if n > 1024 {
        return Err(Error::Input(format!("threads={threads} is not reasonable (max 1024)")));
    }
    let mut map = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(&n) {
        return Ok(p.clone());
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("leukedge-{i}"))
            .build()
            .map_err(|e| Error::Input(format!("cannot start {n} threads: {e}")))?,
    );
    map.insert(n, p.clone());
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stain::tests::synthetic_cell;

    fn cfg(json: &str) -> Pipeline {
        Pipeline::from_json(json).unwrap()
    }

    /// `crop = "window"` keeps the cell's size: a disc twice as wide covers four times the output
    /// pixels (bbox cropping makes both fill the frame), wherever the cell lies in the frame.
    #[test]
    fn window_crop_keeps_cell_size() {
        let disc = |r: f64, cx: f64, cy: f64| {
            let mut img = Rgb8::black(450, 450);
            for y in 0..450 {
                for x in 0..450 {
                    if ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt() <= r {
                        img.data[(y * 450 + x) * 3..(y * 450 + x) * 3 + 3].copy_from_slice(&[180, 120, 200]);
                    }
                }
            }
            img
        };
        let fg = |p: &Pipeline, img: Rgb8| {
            let mut dst = vec![0u8; 3 * 96 * 96];
            p.process_rgb(img, &mut dst).unwrap();
            dst.chunks_exact(3).filter(|c| c.iter().any(|&v| v > 10)).count() as f64
        };
        let win = cfg(r#"{"size": 96, "crop": "window", "crop_window": 384, "stain": {"method": "none"}}"#);
        let bbox = cfg(r#"{"size": 96, "crop": "bbox", "crop_margin": 0, "stain": {"method": "none"}}"#);
        let (small, big) = (fg(&win, disc(40.0, 225.0, 225.0)), fg(&win, disc(80.0, 225.0, 225.0)));
        assert!((big / small - 4.0).abs() < 0.3, "{small} {big}");
        let expected = std::f64::consts::PI * (80.0f64 * 96.0 / 384.0).powi(2);
        assert!((big / expected - 1.0).abs() < 0.08, "{big} vs {expected}");
        // near a corner: same area (the window moves inside the frame instead of padding)
        let corner = fg(&win, disc(80.0, 85.0, 370.0));
        assert!((corner / big - 1.0).abs() < 0.03, "{corner} {big}");
        let (bs, bb) = (fg(&bbox, disc(40.0, 225.0, 225.0)), fg(&bbox, disc(80.0, 225.0, 225.0)));
        assert!((bb / bs - 1.0).abs() < 0.05, "bbox erases size: {bs} {bb}");
        // an empty frame is centred, not an error
        assert_eq!(fg(&win, Rgb8::black(450, 450)), 0.0);
        assert!(Pipeline::from_json(r#"{"crop": "window", "crop_window": 5}"#).is_err());
    }

    #[test]
    fn float_lut_matches_formula() {
        let p = cfg("{}");
        // (200/255 - 0.485) / 0.229 in float32
        let v = ((200.0f32 / 255.0f32) - 0.485f32) / 0.229f32;
        assert_eq!(p.lut[0][200], v);
        for c in 0..3 {
            for v in 0..256 {
                assert_eq!(p.lut16[c][v], f16::from_f32(p.lut[c][v]));
            }
        }
    }

    #[test]
    fn simd_planar_output_equals_tables_for_every_value() {
        // every byte value in every channel, odd size (scalar tail), several means/stds
        for json in [
            r#"{"size": 37, "dtype": "float16", "layout": "nchw"}"#,
            r#"{"size": 37, "dtype": "float32", "layout": "nchw"}"#,
            r#"{"size": 37, "dtype": "float16", "layout": "nchw", "mean": [0.1, 0.9, 0.5], "std": [0.01, 3.0, 0.3]}"#,
            r#"{"size": 37, "dtype": "float32", "layout": "nchw", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}"#,
        ] {
            let p = cfg(json);
            let s2 = 37 * 37;
            let rgb: Vec<u8> = (0..3 * s2).map(|i| (i / 3 * 5 + 91 * (i % 3)) as u8).collect();
            let want = |c: usize, v: u8| (p.lut[c][v as usize], p.lut16[c][v as usize]);
            if json.contains("float16") {
                let mut o = vec![f16::ZERO; 3 * s2];
                p.write_item(&rgb, ItemOut::F16(&mut o));
                for j in 0..s2 {
                    for c in 0..3 {
                        assert_eq!(o[c * s2 + j].to_bits(), want(c, rgb[3 * j + c]).1.to_bits(), "{json} {j} {c}");
                    }
                }
            } else {
                let mut o = vec![0f32; 3 * s2];
                p.write_item(&rgb, ItemOut::F32(&mut o));
                for j in 0..s2 {
                    for c in 0..3 {
                        assert_eq!(o[c * s2 + j].to_bits(), want(c, rgb[3 * j + c]).0.to_bits(), "{json} {j} {c}");
                    }
                }
            }
            let mut seen = [[false; 256]; 3];
            for j in 0..s2 {
                for c in 0..3 {
                    seen[c][rgb[3 * j + c] as usize] = true;
                }
            }
            assert!(seen.iter().all(|s| s.iter().all(|&b| b)), "test data covers every value");
        }
    }

    #[test]
    fn batch_equals_single_and_errors_are_isolated() {
        let (w, h) = (90, 70);
        let a = synthetic_cell(w, h, 1);
        let b = synthetic_cell(w, h, 2);
        let p = cfg(r#"{"size": 32, "dtype": "float16", "layout": "nchw"}"#);
        let len = p.cfg.item_len();
        let sources = vec![
            Source::Pixels {
                data: &a,
                width: w,
                height: h,
                channels: 3,
            },
            Source::Path(PathBuf::from("/nonexistent/cell.bmp")),
            Source::Bytes(b"garbage"),
            Source::Pixels {
                data: &b,
                width: w,
                height: h,
                channels: 3,
            },
        ];
        let names: Vec<String> = (0..4).map(|i| format!("item{i}")).collect();
        let mut out = vec![f16::ONE; 4 * len];
        let st = p.run_batch(&sources, &names, OutBuf::F16(&mut out), 2).unwrap();
        assert_eq!(
            st.iter().map(|s| s.ok).collect::<Vec<_>>(),
            vec![true, false, false, true]
        );
        assert!(st[1].error.as_ref().unwrap().contains("/nonexistent/cell.bmp"));
        assert!(st[2].error.as_ref().unwrap().contains("item2"));
        assert!(out[len..3 * len].iter().all(|v| *v == f16::ZERO));
        for (k, img) in [(0usize, &a), (3, &b)] {
            let mut one = vec![f16::ZERO; len];
            let s1 = p
                .run_batch(&sources[k..k + 1], &names[k..k + 1], OutBuf::F16(&mut one), 1)
                .unwrap();
            assert!(s1[0].ok);
            assert_eq!(&out[k * len..(k + 1) * len], &one[..], "item {k}");
            let _ = img;
        }
    }

    #[test]
    fn apply_at_output_transforms_the_resized_pixels() {
        let (w, h) = (120, 100);
        let img = synthetic_cell(w, h, 7);
        let src = [Source::Pixels {
            data: &img,
            width: w,
            height: h,
            channels: 3,
        }];
        let names = ["c".to_string()];
        let run = |json: &str| {
            let p = cfg(json);
            let mut out = vec![0u8; 3 * 48 * 48];
            let st = p.run_batch(&src, &names, OutBuf::U8(&mut out), 1).unwrap();
            assert!(st[0].ok && !st[0].stain_fallback, "{st:?}");
            (p, out)
        };
        for method in ["macenko", "reinhard"] {
            let base = format!(r#""size":48,"dtype":"uint8","layout":"nhwc","crop":"none","stain":{{"method":"{method}""#);
            let (_, exact) = run(&format!("{{{base}}}}}"));
            let (p, late) = run(&format!(r#"{{{base},"apply_at_output":true}}}}"#));
            assert!(p.cfg.stain.apply_at_output);
            assert!(serde_json::to_string(&p.cfg).unwrap().contains(r#""apply_at_output":true"#));
            // the same as fitting, resizing, then transforming the non-black output pixels
            let mut im = Rgb8::new(w, h, img.clone());
            let (o, t) = fit_in_place(&mut im.data, &p.cfg.stain, &p.params);
            assert!(!o.fallback);
            let mut want = vec![0u8; 3 * 48 * 48];
            square_resize_into(&im, (0, 0, w, h), p.cfg.square, 48, p.cfg.filter, &mut want, p.cfg.max_pixels).unwrap();
            t.unwrap().apply_non_black(&mut want);
            assert_eq!(late, want, "{method}");
            // close to the exact order (transform, then resize), but not the same
            assert_ne!(late, exact, "{method}");
            let mean = late.iter().zip(&exact).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / late.len() as f64;
            assert!(mean < 8.0, "{method}: mean |diff| {mean}");
        }
        // off by default, and then left out of the serialised config
        assert!(!serde_json::to_string(&cfg("{}").cfg).unwrap().contains("apply_at_output"));
    }

    #[test]
    fn layouts_agree() {
        let (w, h) = (64, 48);
        let a = synthetic_cell(w, h, 4);
        let src = [Source::Pixels {
            data: &a,
            width: w,
            height: h,
            channels: 3,
        }];
        let names = ["a".to_string()];
        let mut u8_nhwc = vec![0u8; 3 * 16 * 16];
        cfg(r#"{"size":16,"dtype":"uint8","layout":"nhwc"}"#)
            .run_batch(&src, &names, OutBuf::U8(&mut u8_nhwc), 1)
            .unwrap();
        let mut u8_nchw = vec![0u8; 3 * 16 * 16];
        cfg(r#"{"size":16,"dtype":"uint8","layout":"nchw"}"#)
            .run_batch(&src, &names, OutBuf::U8(&mut u8_nchw), 1)
            .unwrap();
        let mut f = vec![0f32; 3 * 16 * 16];
        let pf = cfg(r#"{"size":16,"dtype":"float32","layout":"nchw"}"#);
        pf.run_batch(&src, &names, OutBuf::F32(&mut f), 1).unwrap();
        for i in 0..256 {
            for c in 0..3 {
                assert_eq!(u8_nchw[c * 256 + i], u8_nhwc[i * 3 + c]);
                assert_eq!(f[c * 256 + i], pf.lut[c][u8_nhwc[i * 3 + c] as usize]);
            }
        }
        assert!(u8_nhwc.iter().any(|&v| v > 0));
    }

    #[test]
    fn crop_to_bbox_fills_frame() {
        // small cell in a big black frame: with bbox crop, the output has few black pixels
        let (w, h) = (200, 200);
        let mut img = vec![0u8; w * h * 3];
        for y in 90..110 {
            for x in 80..120 {
                let i = (y * w + x) * 3;
                img[i..i + 3].copy_from_slice(&[180, 90, 200]);
            }
        }
        let src = [Source::Pixels {
            data: &img,
            width: w,
            height: h,
            channels: 3,
        }];
        let names = ["c".to_string()];
        let mut out = vec![0u8; 3 * 40 * 40];
        let p = cfg(
            r#"{"size":40,"dtype":"uint8","layout":"nhwc","crop_margin":0,"square":"crop","stain":{"method":"none"}}"#,
        );
        let st = p.run_batch(&src, &names, OutBuf::U8(&mut out), 1).unwrap();
        assert!(st[0].ok);
        assert!(out.chunks_exact(3).all(|px| px == [180, 90, 200]));
    }

    #[test]
    fn threads_do_not_change_results() {
        let imgs: Vec<Vec<u8>> = (0..6).map(|s| synthetic_cell(50, 50, s)).collect();
        let src: Vec<Source<'_>> = imgs
            .iter()
            .map(|d| Source::Pixels {
                data: d,
                width: 50,
                height: 50,
                channels: 3,
            })
            .collect();
        let names: Vec<String> = (0..6).map(|i| i.to_string()).collect();
        let p = cfg(r#"{"size":24,"stain":{"min_foreground":50}}"#);
        let mut o1 = vec![0f32; 6 * p.cfg.item_len()];
        let mut o2 = o1.clone();
        p.run_batch(&src, &names, OutBuf::F32(&mut o1), 1).unwrap();
        p.run_batch(&src, &names, OutBuf::F32(&mut o2), 2).unwrap();
        assert_eq!(o1, o2);
    }

    #[test]
    fn gate_rejects_junk_but_still_writes_its_pixels() {
        let (w, h) = (120, 120);
        let cell = synthetic_cell(w, h, 5);
        let grey = vec![128u8; w * h * 3];
        let black = vec![0u8; w * h * 3];
        let src: Vec<Source<'_>> = [&cell, &grey, &black]
            .iter()
            .map(|d| Source::Pixels {
                data: d,
                width: w,
                height: h,
                channels: 3,
            })
            .collect();
        let names: Vec<String> = (0..3).map(|i| i.to_string()).collect();
        for json in [r#"{"size":16,"dtype":"uint8"}"#, r#"{"size":16,"dtype":"uint8","crop":"none"}"#] {
            let p = cfg(json);
            let mut out = vec![0u8; 3 * p.cfg.item_len()];
            let st = p.run_batch(&src, &names, OutBuf::U8(&mut out), 1).unwrap();
            assert!(st.iter().all(|s| s.ok && s.error.is_none()), "{st:?}");
            assert_eq!(st[0].rejected, None, "{json}");
            assert!(st[1].rejected.as_deref().unwrap().contains("foreground area"), "{st:?}");
            assert!(st[2].rejected.as_deref().unwrap().starts_with("no cell found"), "{st:?}");
            let len = p.cfg.item_len();
            assert!(out[len..2 * len].iter().any(|&v| v != 0), "grey pixels written");
        }
        let p = cfg(r#"{"size":16,"gate":{"enabled":false}}"#);
        let mut out = vec![0f32; 3 * p.cfg.item_len()];
        let st = p.run_batch(&src, &names, OutBuf::F32(&mut out), 1).unwrap();
        assert!(st.iter().all(|s| s.rejected.is_none()));
    }

    #[test]
    fn pixel_budget_bounds_what_threads_hold_at_once() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let budget = PixelBudget::new(100);
        let peak = AtomicU64::new(0);
        std::thread::scope(|s| {
            for k in 0..8u64 {
                let (budget, peak) = (&budget, &peak);
                s.spawn(move || {
                    for _ in 0..20 {
                        let _g = budget.acquire(30 + k * 5);
                        peak.fetch_max(budget.in_use(), Ordering::SeqCst);
                        std::thread::yield_now();
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 100, "{}", peak.load(Ordering::SeqCst));
        assert_eq!(budget.in_use(), 0);
        // bigger than the whole budget: runs alone instead of waiting forever
        let g = budget.acquire(1_000);
        assert_eq!(budget.in_use(), 100);
        drop(g);
        assert_eq!(decode_budget_pixels(64_000_000), 128_000_000);
    }

    #[test]
    fn wrong_buffer_size_is_refused() {
        let p = cfg(r#"{"size":8}"#);
        let mut o = vec![0f32; 5];
        assert!(p
            .run_batch(&[Source::Bytes(b"x")], &["x".into()], OutBuf::F32(&mut o), 1)
            .is_err());
    }
}
