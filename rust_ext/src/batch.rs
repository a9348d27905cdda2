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

use rayon::prelude::*;

use crate::config::{Config, CropMode};
use crate::decode::{channels_to_rgb, decode_bytes, decode_note, header_pixels, max_file_bytes, read_image_file, Rgb8};
use crate::error::{Error, Result};
use crate::gate;
use crate::output::{OutElem, OutputTables};
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
    /// What the user should know about a file that was used (`ok`), e.g. `"TIFF: page 1 of 3 used (only
    /// the first page is read)"`; `None` for most files ([`crate::decode::decode_note`]).
    pub note: Option<String>,
}

/// A decoded source: its pixels, the decode budget it holds until the item is done, and its note
/// ([`crate::decode::decode_note`]).
pub type Loaded<'b> = (Rgb8, Option<BudgetGuard<'b>>, Option<String>);

/// What [`Pipeline::process_rgb`] learnt about one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    pub stain: StainOutcome,
    pub rejected: Option<String>,
}

/// A validated config with its stain parameters resolved.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub cfg: Config,
    pub params: StainParams,
    /// Layout and float tables of the output (built once, not per item).
    pub tables: OutputTables,
}

impl Pipeline {
    pub fn new(cfg: Config) -> Result<Pipeline> {
        cfg.validate()?;
        let params = StainParams::from_config(&cfg.stain)?;
        let tables = OutputTables::new(&cfg);
        Ok(Pipeline { cfg, params, tables })
    }

    pub fn from_json(json: &str) -> Result<Pipeline> {
        Pipeline::new(Config::from_json(json)?)
    }

    /// Decode / convert a source into RGB8.
    pub fn load(&self, src: &Source<'_>, name: &str) -> Result<Rgb8> {
        self.load_within(src, name, None).map(|(img, _, _)| img)
    }

    /// [`Pipeline::load`] within a batch's [`PixelBudget`]: the header's pixel count is reserved before
    /// the pixels are decoded, and the returned guard keeps it reserved until the item is done. Encoded
    /// sources also return their note ([`decode_note`]).
    pub fn load_within<'b>(&self, src: &Source<'_>, name: &str, budget: Option<&'b PixelBudget>) -> Result<Loaded<'b>> {
        let decode = |bytes: &[u8], name: &str| {
            let guard = budget.map(|b| b.acquire(header_pixels(bytes)));
            decode_bytes(bytes, name, self.cfg.max_pixels).map(|img| (img, guard, decode_note(bytes)))
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
            } => self.load_pixels(data, *width, *height, *channels, name).map(|img| (img, None, None)),
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
    pub fn write_item<T: OutElem>(&self, rgb: &[u8], out: &mut [T]) {
        T::write(&self.tables, rgb, out)
    }

    /// Process one source into `out` (zero-filled on error). Never panics.
    pub fn run_item<T: OutElem>(&self, src: &Source<'_>, name: &str, out: &mut [T], scratch: &mut Vec<u8>) -> ItemStatus {
        self.run_item_within(src, name, out, scratch, None)
    }

    /// [`Pipeline::run_item`] within a batch's decode budget.
    fn run_item_within<T: OutElem>(
        &self,
        src: &Source<'_>,
        name: &str,
        out: &mut [T],
        scratch: &mut Vec<u8>,
        budget: Option<&PixelBudget>,
    ) -> ItemStatus {
        let s2 = (self.cfg.size as usize).pow(2);
        scratch.resize(3 * s2, 0);
        let res = catch_unwind(AssertUnwindSafe(|| -> Result<(Processed, Option<String>)> {
            let (img, _held, note) = self.load_within(src, name, budget)?;
            self.process_rgb(img, scratch).map(|p| (p, note))
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
            Ok((p, note)) => {
                self.write_item(scratch, out);
                ItemStatus {
                    ok: true,
                    error: None,
                    stain_fallback: p.stain.fallback,
                    stain_reason: p.stain.reason,
                    rejected: p.rejected,
                    note,
                }
            }
            Err(e) => {
                out.fill(T::ZERO);
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
                    note: None,
                }
            }
        }
    }

    /// Process a whole batch on a pool of `threads` threads (0 = all cores).
    pub fn run_batch<T: OutElem>(
        &self,
        sources: &[Source<'_>],
        names: &[String],
        out: &mut [T],
        threads: usize,
    ) -> Result<Vec<ItemStatus>> {
        let n = sources.len();
        assert_eq!(names.len(), n);
        if T::DTYPE != self.cfg.dtype {
            return Err(Error::Input(format!(
                "output buffer of {} values, but the config asks for {}",
                T::DTYPE.name(),
                self.cfg.dtype.name()
            )));
        }
        let len = self.cfg.item_len();
        let got = out.len();
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
        let work = |(i, out): (usize, &mut [T])| -> ItemStatus {
            SCRATCH.with(|s| self.run_item_within(&sources[i], &names[i], out, &mut s.borrow_mut(), Some(&budget)))
        };
        let statuses = pool.install(|| out.par_chunks_mut(len).enumerate().map(work).collect());
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
    use half::f16;
    use crate::stain::tests::synthetic_cell;

    fn cfg(json: &str) -> Pipeline {
        Pipeline::from_json(json).unwrap()
    }

    /// A packed RGB source of `w x h` pixels.
    fn rgb(data: &[u8], w: usize, h: usize) -> Source<'_> {
        Source::Pixels {
            data,
            width: w,
            height: h,
            channels: 3,
        }
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
    fn batch_equals_single_and_errors_are_isolated() {
        let (w, h) = (90, 70);
        let a = synthetic_cell(w, h, 1);
        let b = synthetic_cell(w, h, 2);
        let p = cfg(r#"{"size": 32, "dtype": "float16", "layout": "nchw"}"#);
        let len = p.cfg.item_len();
        let sources = vec![
            rgb(&a, w, h),
            Source::Path(PathBuf::from("/nonexistent/cell.bmp")),
            Source::Bytes(b"garbage"),
            rgb(&b, w, h),
        ];
        let names: Vec<String> = (0..4).map(|i| format!("item{i}")).collect();
        let mut out = vec![f16::ONE; 4 * len];
        let st = p.run_batch(&sources, &names, &mut out, 2).unwrap();
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
                .run_batch(&sources[k..k + 1], &names[k..k + 1], &mut one, 1)
                .unwrap();
            assert!(s1[0].ok);
            assert_eq!(&out[k * len..(k + 1) * len], &one[..], "item {k}");
            let _ = img;
        }
    }

    /// A TIFF of several pages is used (page 1) with a note in its status; a single page has none.
    #[test]
    fn multi_page_tiff_is_ok_with_a_note() {
        let (w, h) = (40usize, 30usize);
        let cell = synthetic_cell(w, h, 3);
        let three = crate::decode::tests::tiff_pages_of(&[&vec![0u8; w * h * 3], &cell, &cell], w as u32, h as u32);
        let one = crate::decode::tests::tiff_pages_of(&[&cell], w as u32, h as u32);
        let p = cfg(r#"{"size": 16, "dtype": "uint8", "layout": "nhwc", "stain": {"method": "none"}}"#);
        let names = ["three.tif".to_string(), "one.tif".to_string()];
        let mut out = vec![0u8; 2 * p.cfg.item_len()];
        let st = p.run_batch(&[Source::Bytes(&three), Source::Bytes(&one)], &names, &mut out, 1).unwrap();
        assert!(st[0].ok && st[1].ok, "{st:?}");
        assert_eq!(st[0].note.as_deref(), Some("TIFF: page 1 of 3 used (only the first page is read)"));
        assert_eq!(st[1].note, None);
        // page 1 (black) is what was used
        assert!(out[..p.cfg.item_len()].iter().all(|&v| v == 0));
    }

    #[test]
    fn apply_at_output_transforms_the_resized_pixels() {
        let (w, h) = (120, 100);
        let img = synthetic_cell(w, h, 7);
        let src = [rgb(&img, w, h)];
        let names = ["c".to_string()];
        let run = |json: &str| {
            let p = cfg(json);
            let mut out = vec![0u8; 3 * 48 * 48];
            let st = p.run_batch(&src, &names, &mut out, 1).unwrap();
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
        let src = [rgb(&a, w, h)];
        let names = ["a".to_string()];
        let mut u8_nhwc = vec![0u8; 3 * 16 * 16];
        cfg(r#"{"size":16,"dtype":"uint8","layout":"nhwc"}"#)
            .run_batch(&src, &names, &mut u8_nhwc, 1)
            .unwrap();
        let mut u8_nchw = vec![0u8; 3 * 16 * 16];
        cfg(r#"{"size":16,"dtype":"uint8","layout":"nchw"}"#)
            .run_batch(&src, &names, &mut u8_nchw, 1)
            .unwrap();
        let mut f = vec![0f32; 3 * 16 * 16];
        let pf = cfg(r#"{"size":16,"dtype":"float32","layout":"nchw"}"#);
        pf.run_batch(&src, &names, &mut f, 1).unwrap();
        for i in 0..256 {
            for c in 0..3 {
                assert_eq!(u8_nchw[c * 256 + i], u8_nhwc[i * 3 + c]);
                assert_eq!(f[c * 256 + i], pf.tables.lut[c][u8_nhwc[i * 3 + c] as usize]);
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
        let src = [rgb(&img, w, h)];
        let names = ["c".to_string()];
        let mut out = vec![0u8; 3 * 40 * 40];
        let p = cfg(
            r#"{"size":40,"dtype":"uint8","layout":"nhwc","crop_margin":0,"square":"crop","stain":{"method":"none"}}"#,
        );
        let st = p.run_batch(&src, &names, &mut out, 1).unwrap();
        assert!(st[0].ok);
        assert!(out.chunks_exact(3).all(|px| px == [180, 90, 200]));
    }

    #[test]
    fn threads_do_not_change_results() {
        let imgs: Vec<Vec<u8>> = (0..6).map(|s| synthetic_cell(50, 50, s)).collect();
        let src: Vec<Source<'_>> = imgs
            .iter()
            .map(|d| rgb(d, 50, 50))
            .collect();
        let names: Vec<String> = (0..6).map(|i| i.to_string()).collect();
        let p = cfg(r#"{"size":24,"stain":{"min_foreground":50}}"#);
        let mut o1 = vec![0f32; 6 * p.cfg.item_len()];
        let mut o2 = o1.clone();
        p.run_batch(&src, &names, &mut o1, 1).unwrap();
        p.run_batch(&src, &names, &mut o2, 2).unwrap();
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
            .map(|d| rgb(d, w, h))
            .collect();
        let names: Vec<String> = (0..3).map(|i| i.to_string()).collect();
        for json in [r#"{"size":16,"dtype":"uint8"}"#, r#"{"size":16,"dtype":"uint8","crop":"none"}"#] {
            let p = cfg(json);
            let mut out = vec![0u8; 3 * p.cfg.item_len()];
            let st = p.run_batch(&src, &names, &mut out, 1).unwrap();
            assert!(st.iter().all(|s| s.ok && s.error.is_none()), "{st:?}");
            assert_eq!(st[0].rejected, None, "{json}");
            assert!(st[1].rejected.as_deref().unwrap().contains("foreground area"), "{st:?}");
            assert!(st[2].rejected.as_deref().unwrap().starts_with("no cell found"), "{st:?}");
            let len = p.cfg.item_len();
            assert!(out[len..2 * len].iter().any(|&v| v != 0), "grey pixels written");
        }
        let p = cfg(r#"{"size":16,"gate":{"enabled":false}}"#);
        let mut out = vec![0f32; 3 * p.cfg.item_len()];
        let st = p.run_batch(&src, &names, &mut out, 1).unwrap();
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
            .run_batch(&[Source::Bytes(b"x")], &["x".into()], &mut o, 1)
            .is_err());
    }
}
