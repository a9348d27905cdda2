//! Macenko (torchstain's `NumpyMacenkoNormalizer`): fit on foreground pixels, table-driven recomposition.

use super::mask::filter_into;
#[cfg(test)]
use super::mask::MaskRule;
use super::params::MacenkoParams;
use crate::numeric::linalg::{pinv_3x2, sym_eigen3};
use crate::numeric::select::{percentile_mut, percentiles};
use crate::config::StainConfig;

/// Minimal number of pixels with optical density above `beta` needed for a Macenko fit.
pub const MIN_OD_PIXELS: usize = 16;

/// Optical density lookup table: `OD[v] = -ln((v + 1) / Io)`.
pub fn od_lut(io: f64) -> [f64; 256] {
    let mut t = [0.0; 256];
    for (v, x) in t.iter_mut().enumerate() {
        *x = -((v as f64 + 1.0) / io).ln();
    }
    t
}


/// Result of a Macenko fit on a set of foreground pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MacenkoFit {
    pub params: MacenkoParams,
    /// Pseudo-inverse of `he` (2x3): concentrations = `pinv @ OD`.
    pub pinv: [[f64; 3]; 2],
    /// Number of pixels with OD >= beta used for the stain vectors.
    pub n_od: usize,
}

/// Settings of the Macenko algorithm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MacenkoSettings {
    pub io: f64,
    pub alpha: f64,
    pub beta: f64,
}

impl MacenkoSettings {
    pub fn from_config(c: &StainConfig) -> Self {
        MacenkoSettings {
            io: c.io,
            alpha: c.alpha,
            beta: c.beta,
        }
    }
}

impl Default for MacenkoSettings {
    fn default() -> Self {
        MacenkoSettings {
            io: 240.0,
            alpha: 1.0,
            beta: 0.15,
        }
    }
}

/// Per-channel tables `t[c][v] = k[c] * lut[v]` for fast dot products with OD vectors.
#[inline]
pub(crate) fn dot_tables(k: [f64; 3], lut: &[f64; 256]) -> [[f64; 256]; 3] {
    let mut t = [[0.0; 256]; 3];
    for c in 0..3 {
        for v in 0..256 {
            t[c][v] = k[c] * lut[v];
        }
    }
    t
}

#[inline(always)]
pub(crate) fn tdot(t: &[[f64; 256]; 3], p: [u8; 3]) -> f64 {
    t[0][p[0] as usize] + t[1][p[1] as usize] + t[2][p[2] as usize]
}

/// `out[i] = tdot(t, px[i])` for every pixel (AVX2 gathers, 4 pixels per step, when available;
/// the same additions in the same order, so bit-identical to the scalar loop).
pub fn tdot_all(t: &[[f64; 256]; 3], px: &[[u8; 3]], out: &mut Vec<f64>) {
    out.clear();
    out.reserve(px.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2.
            unsafe { tdot_all_avx2(t, px, out) };
            return;
        }
    }
    out.extend(px.iter().map(|&p| tdot(t, p)));
}

/// Channel `c` of 4 packed RGB pixels starting at `p` (16 bytes readable) as 4 x i32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn rgb4_indices(p: *const u8) -> [std::arch::x86_64::__m128i; 3] {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let m = |c: i8| _mm_setr_epi8(c, -1, -1, -1, c + 3, -1, -1, -1, c + 6, -1, -1, -1, c + 9, -1, -1, -1);
    [
        _mm_shuffle_epi8(v, m(0)),
        _mm_shuffle_epi8(v, m(1)),
        _mm_shuffle_epi8(v, m(2)),
    ]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tdot_all_avx2(t: &[[f64; 256]; 3], px: &[[u8; 3]], out: &mut Vec<f64>) {
    use std::arch::x86_64::*;
    let n = px.len();
    let base = px.as_ptr() as *const u8;
    let dst = out.spare_capacity_mut()[..n].as_mut_ptr() as *mut f64;
    let mut j = 0;
    // 16-byte loads: need 3 * j + 16 <= 3 * n
    while 3 * j + 16 <= 3 * n {
        // SAFETY: bounds above; indices are u8 values < 256 = table length; j + 4 <= n
        // elements of spare capacity.
        unsafe {
            let [ir, ig, ib] = rgb4_indices(base.add(3 * j));
            let a = _mm256_i32gather_pd::<8>(t[0].as_ptr(), ir);
            let b = _mm256_i32gather_pd::<8>(t[1].as_ptr(), ig);
            let c = _mm256_i32gather_pd::<8>(t[2].as_ptr(), ib);
            _mm256_storeu_pd(dst.add(j), _mm256_add_pd(_mm256_add_pd(a, b), c));
        }
        j += 4;
    }
    for (k, &p) in px.iter().enumerate().skip(j) {
        // SAFETY: k < n elements of spare capacity.
        unsafe { dst.add(k).write(tdot(t, p)) };
    }
    // SAFETY: all n slots were written.
    unsafe { out.set_len(n) };
}

/// Returns `Err(reason)` when degenerate.
#[inline(never)]
fn macenko_stain_vectors(
    fg: &[[u8; 3]],
    lut: &[f64; 256],
    s: &MacenkoSettings,
) -> std::result::Result<([[f64; 2]; 3], usize), String> {
    // Pixels whose OD is >= beta in every channel (torchstain: ~np.any(OD < beta, axis=1)).
    // OD is decreasing in the value, so this is a per-channel threshold on the value.
    let ok: [bool; 256] = std::array::from_fn(|v| !(lut[v] < s.beta));
    let is_od = |p: &[u8; 3]| ok[p[0] as usize] & ok[p[1] as usize] & ok[p[2] as usize];
    // Covariance (np.cov: centred, ddof = 1) in one pass over data shifted by the first
    // pixel's OD (shifted sums avoid the cancellation of the naive formula), fused with the
    // selection of the OD pixels.
    let mut od_px: Vec<[u8; 3]> = Vec::new();
    filter_into(fg, is_od, &mut od_px);
    let mut sum = [0.0f64; 3];
    let mut sxx = [[0.0f64; 3]; 3];
    if let Some(p0) = od_px.first() {
        let shift = [lut[p0[0] as usize], lut[p0[1] as usize], lut[p0[2] as usize]];
        for p in &od_px {
            let d = [
                lut[p[0] as usize] - shift[0],
                lut[p[1] as usize] - shift[1],
                lut[p[2] as usize] - shift[2],
            ];
            for i in 0..3 {
                sum[i] += d[i];
                for j in i..3 {
                    sxx[i][j] += d[i] * d[j];
                }
            }
        }
    }
    let n = od_px.len();
    if n < MIN_OD_PIXELS {
        return Err(format!(
            "only {n} pixels have optical density >= beta={} (need {MIN_OD_PIXELS})",
            s.beta
        ));
    }
    let nf = n as f64;
    let mut cov = [[0.0f64; 3]; 3];
    for i in 0..3 {
        for j in i..3 {
            cov[i][j] = (sxx[i][j] - sum[i] * sum[j] / nf) / (nf - 1.0);
            cov[j][i] = cov[i][j];
        }
    }
    if cov.iter().flatten().any(|x| !x.is_finite()) {
        return Err("non-finite optical density covariance".into());
    }
    let (vals, vecs) = sym_eigen3(cov);
    if !(vals[2] > 0.0) {
        return Err("optical density has zero variance (uniform colour)".into());
    }
    // e1 = middle, e2 = largest eigenvector (columns 1 and 2 as in torchstain). The result does
    // not depend on their signs (see module docs); orient e2 so that projections are positive,
    // which keeps all angles inside (0, pi) and lets us work on the cheaper key -x/y.
    let e1 = [vecs[0][1], vecs[1][1], vecs[2][1]];
    let mut e2 = [vecs[0][2], vecs[1][2], vecs[2][2]];
    if e2.iter().sum::<f64>() < 0.0 {
        e2 = e2.map(|x| -x);
    }
    if !e1.iter().chain(e2.iter()).all(|x| x.is_finite()) {
        return Err("non-finite eigenvectors".into());
    }
    let t1 = dot_tables(e1, lut);
    let t2 = dot_tables(e2, lut);
    // phi = atan2(y, x). When every y > 0, phi = atan2(1, x/y) is increasing in -x/y, so the
    // percentiles can be selected on that key and only the two neighbours need an atan2.
    let mut ys = Vec::new();
    tdot_all(&t2, &od_px, &mut ys);
    let mut keys = Vec::new();
    tdot_all(&t1, &od_px, &mut keys);
    let mut all_pos = true;
    for (k, &y) in keys.iter_mut().zip(&ys) {
        all_pos &= y > 0.0;
        *k = -*k / y;
    }
    let (min_phi, max_phi) = if all_pos {
        let phis = percentiles(&mut keys, &[s.alpha, 100.0 - s.alpha], |k| 1.0f64.atan2(-k));
        (phis[0], phis[1])
    } else {
        let mut phi: Vec<f64> = od_px.iter().map(|p| tdot(&t2, *p).atan2(tdot(&t1, *p))).collect();
        (
            percentile_mut(&mut phi, s.alpha),
            percentile_mut(&mut phi, 100.0 - s.alpha),
        )
    };
    let dir = |phi: f64| -> [f64; 3] {
        let (c, sn) = (phi.cos(), phi.sin());
        [e1[0] * c + e2[0] * sn, e1[1] * c + e2[1] * sn, e1[2] * c + e2[2] * sn]
    };
    let v_min = dir(min_phi);
    let v_max = dir(max_phi);
    let (h, e) = if v_min[0] > v_max[0] {
        (v_min, v_max)
    } else {
        (v_max, v_min)
    };
    let he = [[h[0], e[0]], [h[1], e[1]], [h[2], e[2]]];
    if he.as_flattened().iter().any(|x| !x.is_finite()) {
        return Err("non-finite stain vectors".into());
    }
    Ok((he, n))
}

/// Fit Macenko on foreground pixels: stain vectors from OD pixels, concentrations over all
/// given pixels, `max_c` = 99th percentile. `Err(reason)` when degenerate.
pub fn macenko_fit_pixels(fg: &[[u8; 3]], s: &MacenkoSettings) -> std::result::Result<MacenkoFit, String> {
    if fg.is_empty() {
        return Err("no foreground pixels".into());
    }
    let lut = od_lut(s.io);
    let (he, n_od) = macenko_stain_vectors(fg, &lut, s)?;
    let pinv = pinv_3x2(&he).ok_or_else(|| "stain vectors are collinear".to_string())?;
    let t0 = dot_tables(pinv[0], &lut);
    let t1 = dot_tables(pinv[1], &lut);
    let mut c: Vec<f64> = Vec::new();
    tdot_all(&t0, fg, &mut c);
    let c0 = percentiles(&mut c, &[99.0], |v| v)[0];
    tdot_all(&t1, fg, &mut c);
    let c1 = percentiles(&mut c, &[99.0], |v| v)[0];
    let max_c = [c0, c1];
    if !(max_c[0].is_finite() && max_c[1].is_finite() && max_c[0] > 1e-6 && max_c[1] > 1e-6) {
        return Err(format!(
            "degenerate stain concentrations (maxC = [{:.3e}, {:.3e}])",
            max_c[0], max_c[1]
        ));
    }
    Ok(MacenkoFit {
        params: MacenkoParams { he, max_c },
        pinv,
        n_od,
    })
}

/// Recomposition tables: `Inorm_k = Io * exp(-sum_j HERef[k][j] * (maxCRef[j]/maxC[j]) * C_j)`
/// with `C = pinv @ OD` equals `Io * prod_c exp(-Q[k][c] * OD_c)`, `Q = HERef * diag(scale) *
/// pinv` (a 3x3 matrix), so `t[k][c][v] = exp(-Q[k][c] * OD[v])` with `Io` folded into `c = 0`.
pub fn macenko_tables(src: &MacenkoFit, target: &MacenkoParams, io: f64) -> Box<[[[f64; 256]; 3]; 3]> {
    let lut = od_lut(io);
    let scale = [
        target.max_c[0] / src.params.max_c[0],
        target.max_c[1] / src.params.max_c[1],
    ];
    let mut tables = Box::new([[[0.0f64; 256]; 3]; 3]);
    for k in 0..3 {
        for c in 0..3 {
            let q = target.he[k][0] * scale[0] * src.pinv[0][c] + target.he[k][1] * scale[1] * src.pinv[1][c];
            for v in 0..256 {
                tables[k][c][v] = (-q * lut[v]).exp();
            }
        }
        // fold Io into the first channel's table
        for v in 0..256 {
            tables[k][0][v] *= io;
        }
    }
    tables
}

/// One recomposed pixel. torchstain: `Inorm[Inorm > 255] = 255; astype(uint8)` truncates;
/// Rust's saturating `as u8` does exactly that (and maps NaN / negatives to 0).
#[inline(always)]
fn macenko_pixel(t: &[[[f64; 256]; 3]; 3], p: [u8; 3]) -> [u8; 3] {
    let (r, g, b) = (p[0] as usize, p[1] as usize, p[2] as usize);
    std::array::from_fn(|k| (t[k][0][r] * t[k][1][g] * t[k][2][b]) as u8)
}

#[cfg(test)]
/// Reference (tests only): the straightforward full-image recomposition; foreground pixels are recomposed with the target
/// parameters, background pixels become black.
pub fn macenko_apply(rgb: &mut [u8], rule: MaskRule, src: &MacenkoFit, target: &MacenkoParams, io: f64) {
    let tables = macenko_tables(src, target, io);
    for p in rgb.chunks_exact_mut(3) {
        if rule.is_background(p) {
            p.copy_from_slice(&[0, 0, 0]);
            continue;
        }
        p.copy_from_slice(&macenko_pixel(&tables, [p[0], p[1], p[2]]));
    }
}

/// Recompose only the given foreground pixels (`idx[i]` = pixel index of `px[i]`, as produced
/// by [`gather_foreground`]); the rest of `rgb` is left as is.
pub fn macenko_apply_foreground(rgb: &mut [u8], idx: &[u32], px: &[[u8; 3]], tables: &[[[f64; 256]; 3]; 3]) {
    assert_eq!(idx.len(), px.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2.
            unsafe { macenko_apply_foreground_avx2(rgb, idx, px, tables) };
            return;
        }
    }
    macenko_apply_foreground_scalar(rgb, idx, px, tables);
}

pub(crate) fn macenko_apply_foreground_scalar(rgb: &mut [u8], idx: &[u32], px: &[[u8; 3]], tables: &[[[f64; 256]; 3]; 3]) {
    for (&i, &p) in idx.iter().zip(px) {
        let i = i as usize * 3;
        rgb[i..i + 3].copy_from_slice(&macenko_pixel(tables, p));
    }
}

/// Four pixels per step with AVX2 gathers; the same float operations in the same order as
/// [`macenko_pixel`] (`(t0 * t1) * t2`, then `max(.,0)`, `min(.,255)`, truncation = the
/// saturating `as u8`, NaN -> 0), so the output is bit-identical to the scalar path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn macenko_apply_foreground_avx2(rgb: &mut [u8], idx: &[u32], px: &[[u8; 3]], tables: &[[[f64; 256]; 3]; 3]) {
    use std::arch::x86_64::*;
    let n = px.len();
    let zero = _mm256_setzero_pd();
    let max = _mm256_set1_pd(255.0);
    let base = px.as_ptr() as *const u8;
    let mut j = 0;
    // 16-byte loads: need 3 * j + 16 <= 3 * n
    while 3 * j + 16 <= 3 * n {
        // SAFETY: 16 readable bytes at pixel j (bound above).
        let [ir, ig, ib] = unsafe { rgb4_indices(base.add(3 * j)) };
        let mut out = [[0i32; 4]; 3];
        for k in 0..3 {
            // SAFETY: indices are u8 values < 256 = table length.
            let v = unsafe {
                let a = _mm256_i32gather_pd::<8>(tables[k][0].as_ptr(), ir);
                let b = _mm256_i32gather_pd::<8>(tables[k][1].as_ptr(), ig);
                let c = _mm256_i32gather_pd::<8>(tables[k][2].as_ptr(), ib);
                _mm256_mul_pd(_mm256_mul_pd(a, b), c)
            };
            // max(v, 0) returns 0 for NaN (second operand), like `as u8`
            let v = _mm256_min_pd(_mm256_max_pd(v, zero), max);
            // SAFETY: 4 x i32 store into a 16-byte array.
            unsafe { _mm_storeu_si128(out[k].as_mut_ptr() as *mut __m128i, _mm256_cvttpd_epi32(v)) };
        }
        for (l, &i) in idx[j..j + 4].iter().enumerate() {
            let i = i as usize * 3;
            rgb[i..i + 3].copy_from_slice(&[out[0][l] as u8, out[1][l] as u8, out[2][l] as u8]);
        }
        j += 4;
    }
    macenko_apply_foreground_scalar(rgb, &idx[j..], &px[j..], tables);
}
