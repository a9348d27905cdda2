//! Per-stage work of the fused pipeline, for instruction counting on a loaded machine
//! (developer tool, not a benchmark of record):
//!
//! ```text
//! cargo build --release --example stage_counts
//! for m in none decode stain resize write full; do
//!   valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$m target/release/examples/stage_counts $m FILE.bmp...
//! done
//! ```
//!
//! Every mode first prepares all inputs (decode, stain, resize each file once); the mode then
//! repeats one stage `REPS` times over all files (`none` repeats nothing). The instruction count
//! of a stage per image is `(Ir(mode) - Ir(none)) / (REPS * files)`. Without valgrind the same
//! binary prints best-of-5 wall times per image for the chosen stage.
//! Pipeline config: `crop = "none"`, bilinear 224, NCHW float16 (as benchmarks/bench_preprocess.py),
//! or the JSON in the environment variable `STAGE_CONFIG`.
use std::time::Instant;

use _native::batch::{Pipeline, Source};
use _native::decode::{decode_path, Rgb8};
use _native::resize::square_resize_into;
use _native::stain::normalize_in_place;
use half::f16;

const REPS: usize = 2;

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().expect("usage: stage_counts MODE FILE...");
    let files: Vec<std::path::PathBuf> = args.map(Into::into).collect();
    assert!(!files.is_empty(), "pass some image files");
    // STAGE_CONFIG (JSON) replaces the default config, e.g. '{"crop":"none","dtype":"float16","stain":{"fit_pixels":16384}}'
    let json = std::env::var("STAGE_CONFIG")
        .unwrap_or_else(|_| r#"{"crop":"none","dtype":"float16","layout":"nchw","size":224}"#.to_string());
    let p = Pipeline::from_json(&json).unwrap();
    let cfg = p.cfg.clone();
    let size = cfg.size as usize;
    // preparation (counted in every mode)
    let imgs: Vec<Rgb8> = files.iter().map(|f| decode_path(f, cfg.max_pixels).unwrap()).collect();
    let stained: Vec<Rgb8> = imgs
        .iter()
        .map(|im| {
            let mut s = im.clone();
            normalize_in_place(&mut s.data, &cfg.stain, &p.params);
            s
        })
        .collect();
    let resized: Vec<Vec<u8>> = stained
        .iter()
        .map(|s| {
            let mut d = vec![0u8; 3 * size * size];
            square_resize_into(s, (0, 0, s.width, s.height), cfg.square, size, cfg.filter, &mut d, cfg.max_pixels).unwrap();
            d
        })
        .collect();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let srcs: Vec<Source> = files.iter().map(|f| Source::Path(f.clone())).collect();
    let mut out = vec![f16::ZERO; files.len() * cfg.item_len()];
    let mut work = imgs.clone();
    let mut dst = vec![0u8; 3 * size * size];

    let mut stage = |mode: &str| -> u64 {
        let mut check = 0u64;
        match mode {
            "none" => {}
            "decode" => {
                for f in &files {
                    let im = decode_path(f, cfg.max_pixels).unwrap();
                    check += im.data[im.data.len() / 2] as u64;
                }
            }
            "stain" => {
                for (w, im) in work.iter_mut().zip(&imgs) {
                    w.data.copy_from_slice(&im.data);
                    let o = normalize_in_place(&mut w.data, &cfg.stain, &p.params);
                    check += o.fallback as u64 + w.data[w.data.len() / 2] as u64;
                }
            }
            "resize" => {
                for s in &stained {
                    square_resize_into(s, (0, 0, s.width, s.height), cfg.square, size, cfg.filter, &mut dst, cfg.max_pixels).unwrap();
                    check += dst[dst.len() / 2] as u64;
                }
            }
            "write" => {
                for (r, o) in resized.iter().zip(out.chunks_exact_mut(cfg.item_len())) {
                    p.write_item(r, o);
                    check += o[o.len() / 2].to_bits() as u64;
                }
            }
            "full" => {
                let st = p.run_batch(&srcs, &names, &mut out, 1).unwrap();
                check += st.iter().filter(|s| s.ok).count() as u64 + out[out.len() / 2].to_bits() as u64;
            }
            m => panic!("unknown mode {m:?} (none, decode, stain, resize, write, full)"),
        }
        check
    };
    let under_valgrind = std::env::var_os("LD_PRELOAD").is_some_and(|v| v.to_string_lossy().contains("valgrind"));
    let mut check = 0u64;
    if under_valgrind {
        for _ in 0..REPS {
            check = check.wrapping_add(stage(&mode));
        }
        println!("{mode}: reps={REPS} files={} check={check}", files.len());
    } else {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..REPS {
                check = check.wrapping_add(stage(&mode));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{mode}: {:.4} ms/image (best of 5, reps={REPS}, files={}) check={check}",
            best * 1e3 / (REPS * files.len()) as f64,
            files.len()
        );
    }
}
