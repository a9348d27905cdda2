//! Stage timings of the Rust core on real files (developer tool, not a benchmark of record):
//! `cargo run --release --example profile_stages -- FILE.bmp...`
use std::time::Instant;

use _native::batch::{Pipeline, Source};
use _native::decode::decode_path;
use _native::stain::{
    foreground_pixels, gather_foreground, macenko_apply_foreground, macenko_fit_pixels, macenko_tables, MacenkoParams,
    MacenkoSettings, MaskRule,
};

fn main() {
    let files: Vec<std::path::PathBuf> = std::env::args().skip(1).map(Into::into).collect();
    assert!(!files.is_empty(), "pass some image files");
    let reps = 20;
    let n = (files.len() * reps) as f64;
    let t = Instant::now();
    let mut imgs = Vec::new();
    for _ in 0..reps {
        imgs.clear();
        for f in &files {
            imgs.push(decode_path(f, 64_000_000).unwrap());
        }
    }
    println!("decode        {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n);
    let rule = MaskRule {
        black_threshold: 10,
        white_threshold: None,
    };
    let s = MacenkoSettings::default();
    let t = Instant::now();
    let mut fg = Vec::new();
    for _ in 0..reps {
        for im in &imgs {
            fg.clear();
            foreground_pixels(&im.data, rule, &mut fg);
        }
    }
    println!(
        "fg collect    {:.3} ms  ({} px)",
        t.elapsed().as_secs_f64() * 1e3 / n,
        fg.len()
    );
    let fgs: Vec<Vec<[u8; 3]>> = imgs
        .iter()
        .map(|im| {
            let mut v = Vec::new();
            foreground_pixels(&im.data, rule, &mut v);
            v
        })
        .collect();
    let t = Instant::now();
    let mut fits = Vec::new();
    for _ in 0..reps {
        fits.clear();
        for f in &fgs {
            fits.push(macenko_fit_pixels(f, &s).unwrap());
        }
    }
    println!("macenko fit   {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    for _ in 0..reps {
        for (im, fit) in imgs.iter().zip(&fits) {
            let mut d = im.data.clone();
            let (mut idx, mut px) = (Vec::new(), Vec::new());
            gather_foreground(&mut d, rule, &mut idx, &mut px);
            macenko_apply_foreground(&mut d, &idx, &px, &macenko_tables(fit, &MacenkoParams::default(), 240.0));
        }
    }
    println!(
        "macenko apply {:.3} ms (incl. clone + gather)",
        t.elapsed().as_secs_f64() * 1e3 / n
    );
    let p = Pipeline::from_json(r#"{"crop":"none","dtype":"float16"}"#).unwrap();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let srcs: Vec<Source> = files.iter().map(|f| Source::Path(f.clone())).collect();
    let mut out = vec![half::f16::ZERO; files.len() * p.cfg.item_len()];
    let t = Instant::now();
    for _ in 0..reps {
        p.run_batch(&srcs, &names, &mut out, 1).unwrap();
    }
    println!("batch 1 thread {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    for _ in 0..reps {
        p.run_batch(&srcs, &names, &mut out, 2).unwrap();
    }
    println!("batch 2 threads {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n);
}
