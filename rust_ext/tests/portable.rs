//! The portable paths (what a Jetson's Arm cores run) give the same bits as the x86 SIMD paths.
//!
//! Each case runs the whole pipeline (decode, mask, stain fit and apply, crop, resize, layout and
//! dtype conversion) once normally and once inside `cpu::with_portable`, on the real C-NMC sample
//! cells (`../shared/data/cnmc_sample` next to the repository, or `LEUKEDGE_SAMPLE_DIR`; skipped
//! with a note when absent) and on generated cells, and requires identical output bytes and
//! statuses. Under `LEUKEDGE_PORTABLE=1` both runs are portable (CI runs the whole suite that way
//! too), so the comparison is then trivially equal and the rest of the suite checks the portable
//! paths against its fixed expectations.

use std::path::PathBuf;

use _native::batch::{ItemStatus, Pipeline, Source};
use _native::config::DType;
use _native::cpu;
use _native::output::OutElem;
use half::f16;

fn sample_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("LEUKEDGE_SAMPLE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cnmc_sample"),
    };
    dir.is_dir().then_some(dir)
}

fn sample_files() -> Vec<PathBuf> {
    let Some(dir) = sample_dir() else {
        eprintln!("portable.rs: no sample cells (../shared/data/cnmc_sample); generated cells only");
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("bmp")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A cell-like image: dark purple disc with texture on black, sides not multiples of 8.
fn generated_cell(w: usize, h: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let (cx, cy, r) = (w as f64 / 2.0, h as f64 / 2.0, w.min(h) as f64 * 0.38);
    let mut px = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            if d < r {
                let nucleus = d < r * 0.6;
                let base: [u32; 3] = if nucleus { [110, 60, 150] } else { [200, 160, 210] };
                let i = (y * w + x) * 3;
                for c in 0..3 {
                    px[i + c] = (base[c] + next() % 40).min(255) as u8;
                }
            }
        }
    }
    px
}

/// The bit patterns of an output buffer (u8, f32 or f16 values), to compare exactly.
fn bits<T: OutElem>(v: &[T]) -> Vec<u8> {
    // SAFETY: u8, f32 and f16 (the OutElem types) are plain data without padding; the view covers
    // exactly the slice's bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }.to_vec()
}

fn run_typed<T: OutElem>(p: &Pipeline, src: &Source<'_>) -> (Vec<u8>, ItemStatus) {
    let mut buf = vec![T::ZERO; p.cfg.item_len()];
    let st = p.run_item(src, "item", &mut buf, &mut Vec::new());
    (bits(&buf), st)
}

fn run(p: &Pipeline, src: &Source<'_>) -> (Vec<u8>, ItemStatus) {
    match p.cfg.dtype {
        DType::Uint8 => run_typed::<u8>(p, src),
        DType::Float32 => run_typed::<f32>(p, src),
        DType::Float16 => run_typed::<f16>(p, src),
    }
}

fn configs() -> Vec<String> {
    let mut out = Vec::new();
    for stain in ["macenko", "reinhard", "none"] {
        for (dtype, layout) in [("uint8", "nhwc"), ("uint8", "nchw"), ("float32", "nchw"), ("float32", "nhwc"), ("float16", "nchw"), ("float16", "nhwc")] {
            out.push(format!(
                r#"{{"size": 93, "dtype": "{dtype}", "layout": "{layout}", "stain": {{"method": "{stain}"}}}}"#
            ));
        }
    }
    for filter in ["lanczos3", "box", "nearest", "catmullrom"] {
        out.push(format!(r#"{{"size": 64, "dtype": "float16", "filter": "{filter}"}}"#));
    }
    out.push(r#"{"size": 224, "crop": "none", "square": "crop", "stain": {"method": "macenko", "fit_pixels": 4096}}"#.into());
    out
}

#[test]
fn portable_paths_equal_simd_paths_bit_for_bit() {
    let files = sample_files();
    let cells: Vec<(usize, usize, Vec<u8>)> = [(131, 97), (200, 200), (61, 203)]
        .iter()
        .enumerate()
        .map(|(i, &(w, h))| (w, h, generated_cell(w, h, i as u64)))
        .collect();
    let mut compared = 0;
    for json in configs() {
        let p = Pipeline::from_json(&json).unwrap();
        let mut sources: Vec<Source<'_>> = files.iter().map(|f| Source::Path(f.clone())).collect();
        sources.extend(cells.iter().map(|(w, h, d)| Source::Pixels { data: d, width: *w, height: *h, channels: 3 }));
        for (k, src) in sources.iter().enumerate() {
            let (simd, st_simd) = run(&p, src);
            let (port, st_port) = cpu::with_portable(|| run(&p, src));
            assert_eq!(st_simd, st_port, "{json} item {k}: statuses differ");
            assert!(st_simd.ok, "{json} item {k}: {:?}", st_simd.error);
            if let Some(i) = (0..simd.len()).find(|&i| simd[i] != port[i]) {
                panic!("{json} item {k}: portable output differs from SIMD at byte {i}: {:#x} vs {:#x}", port[i], simd[i]);
            }
            compared += 1;
        }
    }
    assert!(compared >= configs().len() * 3);
}

#[test]
fn switch_is_reported() {
    let paths: std::collections::BTreeMap<_, _> = cpu::paths().into_iter().collect();
    assert_eq!(paths["portable"], cpu::portable());
    if cpu::portable() {
        assert!(paths.iter().all(|(k, &on)| *k == "portable" || !on), "{paths:?}");
    }
    cpu::with_portable(|| {
        let p: std::collections::BTreeMap<_, _> = cpu::paths().into_iter().collect();
        assert!(p["portable"] && !p["avx2"] && !p["avx2_f16c"] && !p["ssse3"] && !p["resize_simd"]);
    });
}
