//! Reinhard colour transfer in CIE L*a*b* (torchstain's `NumpyReinhardNormalizer`).

use super::lab::Lab;
use super::params::ReinhardParams;

/// Per-channel L*a*b* mean and population std of the given pixels. `Err` when degenerate.
pub fn reinhard_fit_pixels(fg: &[[u8; 3]], lab: &Lab) -> std::result::Result<ReinhardParams, String> {
    if fg.is_empty() {
        return Err("no foreground pixels".into());
    }
    let n = fg.len() as f64;
    let mut sum = [0.0f64; 3];
    let labs: Vec<[f32; 3]> = fg.iter().map(|p| lab.from_rgb(*p)).collect();
    for l in &labs {
        for c in 0..3 {
            sum[c] += l[c] as f64;
        }
    }
    let mean = sum.map(|s| s / n);
    let mut var = [0.0f64; 3];
    for l in &labs {
        for c in 0..3 {
            let d = l[c] as f64 - mean[c];
            var[c] += d * d;
        }
    }
    let std = var.map(|v| (v / n).sqrt());
    if !mean.iter().chain(std.iter()).all(|x| x.is_finite()) {
        return Err("non-finite L*a*b* statistics".into());
    }
    if std.iter().any(|&s| s < 1e-6) {
        return Err(format!(
            "zero colour variance in L*a*b* (std = [{:.2e}, {:.2e}, {:.2e}])",
            std[0], std[1], std[2]
        ));
    }
    Ok(ReinhardParams { mean, std })
}

/// Reinhard transfer of the given foreground pixels only (see [`macenko_apply_foreground`]).
pub fn reinhard_apply_foreground(
    rgb: &mut [u8],
    idx: &[u32],
    px: &[[u8; 3]],
    src: &ReinhardParams,
    target: &ReinhardParams,
    lab: &Lab,
) {
    assert_eq!(idx.len(), px.len());
    let gain: [f64; 3] = std::array::from_fn(|c| target.std[c] / src.std[c]);
    for (&i, &p) in idx.iter().zip(px) {
        let l = lab.from_rgb(p);
        let t: [f64; 3] = std::array::from_fn(|c| (l[c] as f64 - src.mean[c]) * gain[c] + target.mean[c]);
        let i = i as usize * 3;
        rgb[i..i + 3].copy_from_slice(&lab.to_rgb(t));
    }
}
