//! Stain normalisation with black-background masking.
//!
//! C-NMC cells are segmented onto a pure black background (~83 % of the pixels). Fitting a
//! stain model on those pixels would be meaningless (black has maximal optical density), so
//! every function here works on the **foreground** only:
//!
//! * a pixel is background when `max(R,G,B) <= black_threshold`, or, if a white threshold is
//!   set, when `min(R,G,B) >= white_threshold` (near-white glass);
//! * background pixels are excluded from every fit and are written as pure black `(0,0,0)`;
//! * when a cell has fewer than `min_foreground` foreground pixels or the fit degenerates
//!   (too few pixels with optical density above `beta`, zero variance, collinear stain vectors,
//!   non-finite numbers) the image is returned unchanged except that background is set to
//!   black, and the caller is told that a fallback happened. NaN never reaches the output.
//!
//! **Macenko** follows torchstain's NumPy backend (`NumpyMacenkoNormalizer`) step by step:
//! `OD = -ln((I+1)/Io)`, drop OD rows with any channel `< beta`, eigenvectors of the 3x3
//! covariance (`np.cov`, symmetric Jacobi solver here), project on the two largest, angle
//! percentiles `alpha` / `100-alpha` (NumPy "linear" percentile), H/E ordering by the first (red)
//! OD component, least-squares concentrations over **all foreground** pixels, `maxC` = 99th
//! percentile per stain, `Inorm = Io*exp(-HERef @ C*(maxCRef/maxC))`, values above 255 set to
//! 255 and truncated to uint8 (`astype(np.uint8)`, as torchstain does). Fitting on reference
//! images yields `{HE, maxC}` that are then used as `HERef`/`maxCRef` (torchstain's `fit`).
//!
//! **Speed** (bit-identical to the straightforward per-pixel code, see the tests):
//! [`normalize_in_place`] makes one pass that blackens the background and gathers the
//! foreground indices/values into per-thread scratch buffers (runs of 8 pure-black pixels are
//! skipped with three 64-bit loads); the fit and the recomposition then touch foreground pixels
//! only. Per-pixel dot products with OD vectors are 256-entry tables per channel (AVX2 gathers,
//! 4 pixels per step, when available); percentiles select exact order statistics inside a
//! sampled bracket; the output is `Io * T0[r] * T1[g] * T2[b]` per channel (3x3 tables of
//! `exp(-Q * OD)`, `Q = HERef diag(maxCRef/maxC) pinv(HE)`).
//!
//! **Reinhard** works in CIE L\*a\*b\* (sRGB, D65 white) with exactly the formulas of
//! torchstain's NumPy backend (`rgb2lab`/`lab2rgb`, themselves skimage's), so that on images
//! without background it matches `NumpyReinhardNormalizer`. We chose CIE Lab rather than
//! Ruderman's lαβ (original paper) or OpenCV's 8-bit LAB (StainTools) because it is the space
//! of the reference implementation we test against, it is device-independent and it is not
//! quantised to 8 bits. Statistics are per-channel mean and population standard deviation over
//! the foreground pixels; output is `clip(rgb,0,1)*255` truncated to uint8 (as torchstain).

use serde::{Deserialize, Serialize};

use crate::config::{StainConfig, StainMethod};
use crate::error::{Error, Result};

/// torchstain's reference H&E matrix (columns: haematoxylin, eosin; rows: R, G, B OD).
pub const MACENKO_HE_REF: [[f64; 2]; 3] = [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]];
/// torchstain's reference maximal concentrations.
pub const MACENKO_MAXC_REF: [f64; 2] = [1.9705, 1.0308];

/// Built-in Reinhard target: CIE L*a*b* mean of the pooled foreground of 294 real C-NMC 2019
/// training cells (every 12th file of `training_data/fold_0`, sorted by path), rounded to
/// 2 decimals. (C-NMC cells are dark on black: L* is low, a* strongly positive = purple.)
pub const REINHARD_MEAN_REF: [f64; 3] = [19.31, 27.92, -22.67];
/// Built-in Reinhard target: matching population standard deviations.
pub const REINHARD_STD_REF: [f64; 3] = [5.12, 3.77, 4.06];

/// Minimal number of pixels with optical density above `beta` needed for a Macenko fit.
pub const MIN_OD_PIXELS: usize = 16;

// ---------------------------------------------------------------------------------------------
// Masking
// ---------------------------------------------------------------------------------------------

/// Background rule shared by all functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskRule {
    pub black_threshold: u8,
    pub white_threshold: Option<u8>,
}

impl MaskRule {
    pub fn from_config(c: &StainConfig) -> MaskRule {
        MaskRule {
            black_threshold: c.black_threshold,
            white_threshold: c.white_threshold,
        }
    }

    #[inline(always)]
    pub fn is_background(&self, p: &[u8]) -> bool {
        let mx = p[0].max(p[1]).max(p[2]);
        if mx <= self.black_threshold {
            return true;
        }
        match self.white_threshold {
            Some(w) => p[0].min(p[1]).min(p[2]) >= w,
            None => false,
        }
    }
}

/// Foreground mask (true = foreground) of a packed RGB8 buffer.
pub fn foreground_mask(rgb: &[u8], rule: MaskRule) -> Vec<bool> {
    rgb.chunks_exact(3).map(|p| !rule.is_background(p)).collect()
}

/// True when every byte is zero (OR of 64-bit words, 32 bytes per step).
#[inline]
pub fn all_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(32);
    for b in &mut blocks {
        let w = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap());
        if w(0) | w(8) | w(16) | w(24) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&v| v == 0)
}

/// Bounding box `(x0, y0, x1, y1)` (end-exclusive) of the foreground, or `None` if there is none.
pub fn foreground_bbox(
    rgb: &[u8],
    width: usize,
    height: usize,
    rule: MaskRule,
) -> Option<(usize, usize, usize, usize)> {
    assert_eq!(rgb.len(), width * height * 3);
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0usize, 0usize);
    for y in 0..height {
        let row = &rgb[y * width * 3..(y + 1) * width * 3];
        // a row of pure black pixels is background whatever the thresholds
        if all_zero(row) {
            continue;
        }
        let first = row.chunks_exact(3).position(|p| !rule.is_background(p));
        if let Some(f) = first {
            let last = row.chunks_exact(3).rposition(|p| !rule.is_background(p)).unwrap();
            x0 = x0.min(f);
            x1 = x1.max(last + 1);
            y0 = y0.min(y);
            y1 = y + 1;
        }
    }
    (x0 != usize::MAX).then_some((x0, y0, x1, y1))
}

/// Collect the foreground pixels of an image.
pub fn foreground_pixels(rgb: &[u8], rule: MaskRule, out: &mut Vec<[u8; 3]>) {
    for p in rgb.chunks_exact(3) {
        if !rule.is_background(p) {
            out.push([p[0], p[1], p[2]]);
        }
    }
}

/// One pass over a packed RGB8 image: background pixels are set to black, the index and value
/// of every foreground pixel are appended to `idx` / `px` (in image order). Runs of 8 pure
/// black pixels (the C-NMC background) are skipped with three 64-bit loads.
pub fn gather_foreground(rgb: &mut [u8], rule: MaskRule, idx: &mut Vec<u32>, px: &mut Vec<[u8; 3]>) {
    let n = rgb.len() / 3;
    assert!(n <= u32::MAX as usize, "image too large for 32-bit pixel indices");
    assert_eq!(idx.len(), px.len());
    let start = idx.len();
    idx.reserve(n);
    px.reserve(n);
    let idx_out = &mut idx.spare_capacity_mut()[..n];
    let px_out = &mut px.spare_capacity_mut()[..n];
    let mut cnt = 0usize;
    // Branch-free per pixel: the slot `cnt` is always written and kept only for foreground
    // (`cnt <= j < n`, so it is in bounds); background pixels are stored back as black.
    let mut one = |rgb: &mut [u8], j: usize| {
        let q = &mut rgb[3 * j..3 * j + 3];
        let p = [q[0], q[1], q[2]];
        let fg = !rule.is_background(&p);
        let m = if fg { 0xFF } else { 0 };
        q[0] = p[0] & m;
        q[1] = p[1] & m;
        q[2] = p[2] & m;
        idx_out[cnt].write(j as u32);
        px_out[cnt].write(p);
        cnt += fg as usize;
    };
    let mut i = 0;
    while i + 8 <= n {
        let c = &rgb[3 * i..3 * i + 24];
        let a = u64::from_ne_bytes(c[0..8].try_into().unwrap());
        let b = u64::from_ne_bytes(c[8..16].try_into().unwrap());
        let d = u64::from_ne_bytes(c[16..24].try_into().unwrap());
        if a | b | d != 0 {
            for j in i..i + 8 {
                one(rgb, j);
            }
        }
        i += 8;
    }
    for j in i..n {
        one(rgb, j);
    }
    // SAFETY: slots `0..cnt` of both spare capacities were written above.
    unsafe {
        idx.set_len(start + cnt);
        px.set_len(start + cnt);
    }
}

/// `out` = the elements of `src` for which `keep` is true, in order (branch-free copy).
pub fn filter_into<T: Copy>(src: &[T], keep: impl Fn(&T) -> bool, out: &mut Vec<T>) {
    out.clear();
    out.reserve(src.len());
    let spare = &mut out.spare_capacity_mut()[..src.len()];
    let mut cnt = 0usize;
    for (i, x) in src.iter().enumerate() {
        // cnt <= i < src.len(): in bounds
        spare[cnt.min(i)].write(*x);
        cnt += keep(x) as usize;
    }
    // SAFETY: slots 0..cnt were written (each kept element at its final slot).
    unsafe { out.set_len(cnt) };
}

/// Set every background pixel to black.
pub fn blacken_background(rgb: &mut [u8], rule: MaskRule) {
    for p in rgb.chunks_exact_mut(3) {
        if rule.is_background(p) {
            p.copy_from_slice(&[0, 0, 0]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Numerics
// ---------------------------------------------------------------------------------------------

/// NumPy's `_lerp` (used by the "linear" percentile), including its `t >= 0.5` branch.
#[inline]
fn np_lerp(a: f64, b: f64, t: f64) -> f64 {
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

/// Position of the `pct` percentile in a sorted array of `n` values, as NumPy computes it:
/// `(k, gamma)` with `k` the lower index, or `Err(index)` when the result is a single element.
fn np_virtual_index(n: usize, pct: f64) -> std::result::Result<(usize, f64), usize> {
    let q = pct / 100.0;
    let vi = (n as f64 * q + (1.0 - q)) - 1.0;
    if vi >= (n - 1) as f64 {
        return Err(n - 1);
    }
    if vi < 0.0 {
        return Err(0);
    }
    let lo = vi.floor();
    Ok((lo as usize, vi - lo))
}

/// `np.percentile(values, pct)` (method "linear"), possibly reordering `values`.
/// Panics on an empty slice. Values must not be NaN.
pub fn percentile_mut(values: &mut [f64], pct: f64) -> f64 {
    percentile_mapped(values, pct, |v| v)
}

/// Percentile of `f(v)` where `f` is non-decreasing: order statistics are taken on `values`
/// and only the two neighbours are mapped before NumPy's interpolation.
fn percentile_mapped(values: &mut [f64], pct: f64, f: impl Fn(f64) -> f64) -> f64 {
    let n = values.len();
    assert!(n > 0, "percentile of an empty array");
    match np_virtual_index(n, pct) {
        Err(i) => f(kth_pair(values, i).0),
        Ok((k, g)) => {
            let (a, b) = kth_pair(values, k);
            np_lerp(f(a), f(b), g)
        }
    }
}

/// Bracket around position `pos` of a sorted sample: the values `margin` places below and above it
/// (open-ended at the sample's ends). The true order statistic lies inside with high probability.
fn sample_bracket(sample: &[f64], pos: usize, margin: usize) -> (f64, f64) {
    let lo = if pos >= margin {
        sample[pos - margin]
    } else {
        f64::NEG_INFINITY
    };
    let hi = if pos + margin + 1 < sample.len() {
        sample[pos + margin + 1]
    } else {
        f64::INFINITY
    };
    (lo, hi)
}

/// Sample-bracketing selection: a strided sample of 512 values gives thresholds that (very
/// likely) bracket ranks `k` and `k+1`; one pass counts the values below the bracket and
/// gathers those inside, which are then sorted. Returns `None` when the bracket missed (the
/// caller then uses an exact histogram method), so the result is always exact.
fn kth_pair_sampled(values: &[f64], k: usize) -> Option<(f64, f64)> {
    const M: usize = 512;
    const MARGIN: usize = 10;
    let n = values.len();
    let step = n / M;
    let mut sample: Vec<f64> = (0..M).map(|i| values[i * step]).collect();
    if sample.iter().any(|v| v.is_nan()) {
        return None;
    }
    sample.sort_unstable_by(f64::total_cmp);
    let pos = (k as f64 / n as f64 * M as f64) as usize;
    let (t_lo, t_hi) = sample_bracket(&sample, pos, MARGIN);
    let mut below = 0usize;
    let mut inside: Vec<f64> = Vec::with_capacity(4 * MARGIN * n / M + 16);
    for &v in values {
        if v < t_lo {
            below += 1;
        } else if v <= t_hi {
            inside.push(v);
        }
    }
    let need_hi = (k + 1).min(n - 1);
    if below > k || below + inside.len() <= need_hi {
        return None;
    }
    Some(kth_two(&mut inside, k - below, need_hi - below))
}

/// The `a`-th and `b`-th smallest values (`b` is `a` or `a + 1`) in `total_cmp` order, by
/// selection instead of a full sort (same values as sorting).
fn kth_two(v: &mut [f64], a: usize, b: usize) -> (f64, f64) {
    debug_assert!(b == a || b == a + 1);
    let (_, x, right) = v.select_nth_unstable_by(a, f64::total_cmp);
    let x = *x;
    if b == a {
        return (x, x);
    }
    let y = right.iter().copied().min_by(f64::total_cmp).expect("b < len");
    (x, y)
}

/// Exact NumPy "linear" percentiles of `f(value(i)), i < n` (`f` non-decreasing): the values
/// are materialised once and handed to [`percentiles_of`]. `value` must be deterministic.
pub fn percentiles_stream(
    n: usize,
    value: impl Fn(usize) -> f64,
    pcts: &[f64],
    f: impl Fn(f64) -> f64 + Copy,
) -> Vec<f64> {
    assert!(n > 0, "percentile of an empty array");
    let mut all: Vec<f64> = (0..n).map(value).collect();
    percentiles_of(&mut all, pcts, f)
}

/// Exact NumPy "linear" percentiles of `f(v)` over `values` (`f` non-decreasing), possibly
/// reordering `values`. For large inputs a strided sample of 512 values brackets each needed
/// rank; one tight pass per percentile counts the values below the bracket and gathers those
/// inside, and a selection on the (few) gathered values gives the exact order statistics.
/// Falls back to [`percentile_mapped`] (selection on everything) when a bracket misses, on
/// NaN, or for small inputs, so the result is always exact.
pub fn percentiles_of(values: &mut [f64], pcts: &[f64], f: impl Fn(f64) -> f64 + Copy) -> Vec<f64> {
    const M: usize = 512;
    const MARGIN: usize = 8;
    let n = values.len();
    assert!(n > 0, "percentile of an empty array");
    if n < 4 * M {
        return pcts.iter().map(|&p| percentile_mapped(values, p, f)).collect();
    }
    let step = n / M;
    let mut sample: Vec<f64> = (0..M).map(|i| values[i * step]).collect();
    if sample.iter().any(|v| v.is_nan()) {
        return pcts.iter().map(|&p| percentile_mapped(values, p, f)).collect();
    }
    sample.sort_unstable_by(f64::total_cmp);
    let mut inside: Vec<f64> = Vec::with_capacity(4 * MARGIN * step + 16);
    let mut out = Vec::with_capacity(pcts.len());
    for &p in pcts {
        // ranks needed: (k, k+1 clamped, gamma)
        let (k, k1, g) = match np_virtual_index(n, p) {
            Ok((k, g)) => (k, (k + 1).min(n - 1), g),
            Err(i) => (i, i, 0.0),
        };
        let pos = (k as f64 / n as f64 * M as f64) as usize;
        let (lo, hi) = sample_bracket(&sample, pos, MARGIN);
        let mut below = 0usize;
        inside.clear();
        // branch-free counting in blocks of 8; the rare blocks with values inside the
        // bracket are gathered in a second look
        let mut blocks = values.chunks_exact(8);
        for b in &mut blocks {
            let mut nb = 0usize;
            let mut any = false;
            for &v in b {
                nb += (v < lo) as usize;
                any |= (v >= lo) & (v <= hi);
            }
            below += nb;
            if any {
                inside.extend(b.iter().filter(|&&v| v >= lo && v <= hi));
            }
        }
        for &v in blocks.remainder() {
            below += (v < lo) as usize;
            if v >= lo && v <= hi {
                inside.push(v);
            }
        }
        // NaN is neither below nor inside (it sorts last, like "above" the bracket)
        if below > k || below + inside.len() <= k1 {
            out.push(percentile_mapped(values, p, f));
            continue;
        }
        let (a, b) = kth_two(&mut inside, k - below, k1 - below);
        out.push(if k1 == k { f(a) } else { np_lerp(f(a), f(b), g) });
    }
    out
}

/// The `k`-th and `(k+1)`-th smallest values (the second equals the first when `k = n-1`).
///
/// Exact. For large inputs a 4096-bucket histogram locates the bucket(s) holding ranks `k` and
/// `k+1`, and only those candidates are sorted: two linear passes instead of a quickselect
/// (several times faster on the ~40k values of a cell). Falls back to `select_nth_unstable`
/// for small or non-finite inputs.
pub fn kth_pair(values: &mut [f64], k: usize) -> (f64, f64) {
    let n = values.len();
    assert!(k < n);
    let select = |values: &mut [f64]| -> (f64, f64) {
        let (_, a, right) = values.select_nth_unstable_by(k, f64::total_cmp);
        let a = *a;
        let b = right.iter().copied().fold(f64::INFINITY, f64::min);
        (a, if k + 1 < n { b } else { a })
    };
    if n < 2048 {
        return select(values);
    }
    if let Some(r) = kth_pair_sampled(values, k) {
        return r;
    }
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in values.iter() {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !(lo.is_finite() && hi.is_finite()) || values.iter().any(|v| v.is_nan()) {
        return select(values);
    }
    if lo == hi {
        return (lo, lo);
    }
    const B: usize = 4096;
    let scale = (B as f64) / (hi - lo);
    // (v - lo) * scale is non-decreasing in v (correctly rounded ops), so bucket order is
    // consistent with value order.
    let bucket = |v: f64| (((v - lo) * scale) as usize).min(B - 1);
    let mut counts = vec![0u32; B];
    for &v in values.iter() {
        counts[bucket(v)] += 1;
    }
    let mut cum = 0usize;
    let mut bk = 0;
    for (b, &c) in counts.iter().enumerate() {
        if cum + c as usize > k {
            bk = b;
            break;
        }
        cum += c as usize;
    }
    let rank = k - cum;
    // the (k+1)-th is in the same bucket, or the smallest of the next non-empty one
    let mut bn = bk;
    if rank + 1 >= counts[bk] as usize && k + 1 < n {
        bn = (bk + 1..B).find(|&b| counts[b] > 0).unwrap_or(bk);
    }
    let mut cand: Vec<f64> = values
        .iter()
        .copied()
        .filter(|&v| {
            let b = bucket(v);
            b == bk || b == bn
        })
        .collect();
    cand.sort_unstable_by(f64::total_cmp);
    let a = cand[rank];
    let b = if k + 1 < n { cand[rank + 1] } else { a };
    (a, b)
}

/// Eigen-decomposition of a symmetric 3x3 matrix (cyclic Jacobi). Returns eigenvalues in
/// ascending order and the matching unit eigenvectors as **columns** (like `np.linalg.eigh`).
pub fn sym_eigen3(m: [[f64; 3]; 3]) -> ([f64; 3], [[f64; 3]; 3]) {
    let mut a = m;
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let scale = a.iter().flatten().map(|x| x * x).sum::<f64>();
    for _sweep in 0..64 {
        let off = a[0][1] * a[0][1] + a[0][2] * a[0][2] + a[1][2] * a[1][2];
        if off <= scale * 1e-32 || off == 0.0 {
            break;
        }
        for (p, q) in [(0usize, 1usize), (0, 2), (1, 2)] {
            let apq = a[p][q];
            if apq == 0.0 {
                continue;
            }
            let theta = (a[q][q] - a[p][p]) / (2.0 * apq);
            let t = if theta >= 0.0 {
                1.0 / (theta + (theta * theta + 1.0).sqrt())
            } else {
                -1.0 / (-theta + (theta * theta + 1.0).sqrt())
            };
            let c = 1.0 / (t * t + 1.0).sqrt();
            let s = t * c;
            for k in 0..3 {
                let (akp, akq) = (a[k][p], a[k][q]);
                a[k][p] = c * akp - s * akq;
                a[k][q] = s * akp + c * akq;
            }
            for k in 0..3 {
                let (apk, aqk) = (a[p][k], a[q][k]);
                a[p][k] = c * apk - s * aqk;
                a[q][k] = s * apk + c * aqk;
            }
            for row in v.iter_mut() {
                let (vkp, vkq) = (row[p], row[q]);
                row[p] = c * vkp - s * vkq;
                row[q] = s * vkp + c * vkq;
            }
        }
    }
    let mut order = [0usize, 1, 2];
    order.sort_by(|&i, &j| a[i][i].total_cmp(&a[j][j]));
    let vals = [a[order[0]][order[0]], a[order[1]][order[1]], a[order[2]][order[2]]];
    let mut vecs = [[0.0; 3]; 3];
    for (col, &o) in order.iter().enumerate() {
        for r in 0..3 {
            vecs[r][col] = v[r][o];
        }
    }
    (vals, vecs)
}

/// Optical density lookup table: `OD[v] = -ln((v + 1) / Io)`.
pub fn od_lut(io: f64) -> [f64; 256] {
    let mut t = [0.0; 256];
    for (v, x) in t.iter_mut().enumerate() {
        *x = -((v as f64 + 1.0) / io).ln();
    }
    t
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// Macenko stain parameters: `he` is the 3x2 stain matrix (rows R,G,B; columns H,E) and
/// `max_c` the 99th-percentile concentrations. Used as torchstain's `HERef` / `maxCRef`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MacenkoParams {
    pub he: [[f64; 2]; 3],
    pub max_c: [f64; 2],
}

impl Default for MacenkoParams {
    fn default() -> Self {
        MacenkoParams {
            he: MACENKO_HE_REF,
            max_c: MACENKO_MAXC_REF,
        }
    }
}

/// Reinhard parameters: per-channel mean and standard deviation in CIE L*a*b*
/// (L in [0, 100]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReinhardParams {
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl Default for ReinhardParams {
    fn default() -> Self {
        ReinhardParams {
            mean: REINHARD_MEAN_REF,
            std: REINHARD_STD_REF,
        }
    }
}

/// Fitted parameters, serialised as `{"method": "macenko", "he": .., "max_c": .., ...}`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StainParams {
    Macenko(MacenkoParams),
    Reinhard(ReinhardParams),
    None,
}

#[derive(Serialize, Deserialize)]
struct ParamsJson {
    method: StainMethod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    he: Option<[[f64; 2]; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_c: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mean: Option<[f64; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    std: Option<[f64; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n_images: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n_pixels: Option<usize>,
}

impl StainParams {
    /// Parameters for a config: its `params` if set, else the built-in reference.
    pub fn from_config(c: &StainConfig) -> Result<StainParams> {
        match &c.params {
            None | Some(serde_json::Value::Null) => Ok(match c.method {
                StainMethod::Macenko => StainParams::Macenko(MacenkoParams::default()),
                StainMethod::Reinhard => StainParams::Reinhard(ReinhardParams::default()),
                StainMethod::None => StainParams::None,
            }),
            Some(v) => {
                let p = StainParams::from_value(v)?;
                let m = p.method();
                if m != c.method {
                    return Err(Error::Config(format!(
                        "stain.params were fitted for method {m:?} but stain.method is {:?}",
                        c.method
                    )));
                }
                Ok(p)
            }
        }
    }

    pub fn method(&self) -> StainMethod {
        match self {
            StainParams::Macenko(_) => StainMethod::Macenko,
            StainParams::Reinhard(_) => StainMethod::Reinhard,
            StainParams::None => StainMethod::None,
        }
    }

    pub fn from_value(v: &serde_json::Value) -> Result<StainParams> {
        let j: ParamsJson =
            serde_json::from_value(v.clone()).map_err(|e| Error::Config(format!("stain.params: {e}")))?;
        let finite = |xs: &[f64]| xs.iter().all(|x| x.is_finite());
        match j.method {
            StainMethod::Macenko => {
                let (Some(he), Some(max_c)) = (j.he, j.max_c) else {
                    return Err(Error::Config(
                        "stain.params: macenko needs \"he\" (3x2) and \"max_c\" (2)".into(),
                    ));
                };
                if !finite(he.as_flattened()) || !finite(&max_c) || max_c.iter().any(|&m| m <= 0.0) {
                    return Err(Error::Config(
                        "stain.params: macenko he/max_c must be finite, max_c > 0".into(),
                    ));
                }
                Ok(StainParams::Macenko(MacenkoParams { he, max_c }))
            }
            StainMethod::Reinhard => {
                let (Some(mean), Some(std)) = (j.mean, j.std) else {
                    return Err(Error::Config(
                        "stain.params: reinhard needs \"mean\" (3) and \"std\" (3)".into(),
                    ));
                };
                if !finite(&mean) || !finite(&std) || std.iter().any(|&s| s <= 0.0) {
                    return Err(Error::Config(
                        "stain.params: reinhard mean/std must be finite, std > 0".into(),
                    ));
                }
                Ok(StainParams::Reinhard(ReinhardParams { mean, std }))
            }
            StainMethod::None => Ok(StainParams::None),
        }
    }

    /// JSON object for `StainConfig.params`.
    pub fn to_json(&self, n_images: Option<usize>, n_pixels: Option<usize>) -> String {
        let mut j = ParamsJson {
            method: self.method(),
            he: None,
            max_c: None,
            mean: None,
            std: None,
            n_images,
            n_pixels,
        };
        match self {
            StainParams::Macenko(p) => {
                j.he = Some(p.he);
                j.max_c = Some(p.max_c);
            }
            StainParams::Reinhard(p) => {
                j.mean = Some(p.mean);
                j.std = Some(p.std);
            }
            StainParams::None => {}
        }
        serde_json::to_string(&j).expect("serialisable")
    }
}

// ---------------------------------------------------------------------------------------------
// Macenko
// ---------------------------------------------------------------------------------------------

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
fn dot_tables(k: [f64; 3], lut: &[f64; 256]) -> [[f64; 256]; 3] {
    let mut t = [[0.0; 256]; 3];
    for c in 0..3 {
        for v in 0..256 {
            t[c][v] = k[c] * lut[v];
        }
    }
    t
}

#[inline(always)]
fn tdot(t: &[[f64; 256]; 3], p: [u8; 3]) -> f64 {
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

/// Pseudo-inverse of a full-rank 3x2 matrix; `None` when the columns are (nearly) collinear.
pub fn pinv_3x2(he: &[[f64; 2]; 3]) -> Option<[[f64; 3]; 2]> {
    let mut g = [[0.0; 2]; 2];
    for i in 0..2 {
        for j in 0..2 {
            g[i][j] = (0..3).map(|r| he[r][i] * he[r][j]).sum();
        }
    }
    let det = g[0][0] * g[1][1] - g[0][1] * g[1][0];
    let norm = g[0][0] * g[1][1];
    if !(det.is_finite() && norm > 0.0 && det > 1e-10 * norm) {
        return None;
    }
    let inv = [[g[1][1] / det, -g[0][1] / det], [-g[1][0] / det, g[0][0] / det]];
    let mut p = [[0.0; 3]; 2];
    for i in 0..2 {
        for r in 0..3 {
            p[i][r] = inv[i][0] * he[r][0] + inv[i][1] * he[r][1];
        }
    }
    Some(p)
}

/// The stain matrix from the OD pixels (torchstain's `__find_HE` after `eigh(cov)`).
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
        let phis = percentiles_of(&mut keys, &[s.alpha, 100.0 - s.alpha], |k| 1.0f64.atan2(-k));
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
    let c0 = percentiles_of(&mut c, &[99.0], |v| v)[0];
    tdot_all(&t1, fg, &mut c);
    let c1 = percentiles_of(&mut c, &[99.0], |v| v)[0];
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

/// Write the Macenko-normalised image: foreground pixels are recomposed with the target
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

fn macenko_apply_foreground_scalar(rgb: &mut [u8], idx: &[u32], px: &[[u8; 3]], tables: &[[[f64; 256]; 3]; 3]) {
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

// ---------------------------------------------------------------------------------------------
// Reinhard (CIE L*a*b*, D65, torchstain / skimage formulas)
// ---------------------------------------------------------------------------------------------

const RGB2XYZ: [[f64; 3]; 3] = [
    [0.412453, 0.357580, 0.180423],
    [0.212671, 0.715160, 0.072169],
    [0.019334, 0.119193, 0.950227],
];
const WHITE: [f64; 3] = [0.95047, 1.0, 1.08883];

fn inv3(m: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let mut r = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            let (a, b) = ((j + 1) % 3, (j + 2) % 3);
            let (c, d) = ((i + 1) % 3, (i + 2) % 3);
            r[i][j] = (m[a][c] * m[b][d] - m[a][d] * m[b][c]) / det;
        }
    }
    r
}

/// sRGB (8-bit) to linear RGB, float32 like torchstain.
fn srgb_linear_lut() -> [f32; 256] {
    std::array::from_fn(|v| {
        let x = v as f32 / 255.0f32;
        if x > 0.04045 {
            ((x + 0.055) / 1.055).powf(2.4)
        } else {
            x / 12.92
        }
    })
}

/// Conversion context (tables are built once per call).
pub struct Lab {
    lin: [f32; 256],
    m: [[f32; 3]; 3],
    inv: [[f64; 3]; 3],
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    pub fn new() -> Lab {
        let m: [[f32; 3]; 3] = std::array::from_fn(|i| std::array::from_fn(|j| RGB2XYZ[i][j] as f32));
        Lab {
            lin: srgb_linear_lut(),
            m,
            inv: inv3(&RGB2XYZ),
        }
    }

    /// 8-bit sRGB to L*a*b* (L in [0, 100]).
    #[inline]
    pub fn from_rgb(&self, p: [u8; 3]) -> [f32; 3] {
        let l = [
            self.lin[p[0] as usize],
            self.lin[p[1] as usize],
            self.lin[p[2] as usize],
        ];
        let mut f = [0.0f32; 3];
        for i in 0..3 {
            let xyz = self.m[i][0] * l[0] + self.m[i][1] * l[1] + self.m[i][2] * l[2];
            let t = xyz / WHITE[i] as f32;
            f[i] = if t > 0.008856 {
                t.cbrt()
            } else {
                7.787 * t + 16.0 / 116.0
            };
        }
        [116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])]
    }

    /// L*a*b* to 8-bit sRGB: `clip(rgb, 0, 1) * 255` truncated (torchstain).
    #[inline]
    pub fn to_rgb(&self, lab: [f64; 3]) -> [u8; 3] {
        let y = (lab[0] + 16.0) / 116.0;
        let x = lab[1] / 500.0 + y;
        let z = y - lab[2] / 200.0;
        let mut xyz = [x, y, z];
        for (i, v) in xyz.iter_mut().enumerate() {
            *v = if *v > 0.2068966 {
                *v * *v * *v
            } else {
                (*v - 16.0 / 116.0) / 7.787
            };
            *v *= WHITE[i];
        }
        let mut out = [0u8; 3];
        for k in 0..3 {
            let lin = self.inv[k][0] * xyz[0] + self.inv[k][1] * xyz[1] + self.inv[k][2] * xyz[2];
            let s = if lin > 0.0031308 {
                1.055 * lin.powf(1.0 / 2.4) - 0.055
            } else {
                lin * 12.92
            };
            let s = if s.is_nan() { 0.0 } else { s.clamp(0.0, 1.0) };
            out[k] = (s * 255.0) as u8;
        }
        out
    }
}

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

/// Reinhard transfer of the foreground, background set to black.
pub fn reinhard_apply(rgb: &mut [u8], rule: MaskRule, src: &ReinhardParams, target: &ReinhardParams, lab: &Lab) {
    let gain: [f64; 3] = std::array::from_fn(|c| target.std[c] / src.std[c]);
    for p in rgb.chunks_exact_mut(3) {
        if rule.is_background(p) {
            p.copy_from_slice(&[0, 0, 0]);
            continue;
        }
        let l = lab.from_rgb([p[0], p[1], p[2]]);
        let t: [f64; 3] = std::array::from_fn(|c| (l[c] as f64 - src.mean[c]) * gain[c] + target.mean[c]);
        p.copy_from_slice(&lab.to_rgb(t));
    }
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

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// What happened to one image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StainOutcome {
    /// True when the image was left unchanged (apart from blackened background).
    pub fallback: bool,
    /// Why the fallback happened.
    pub reason: Option<String>,
}

thread_local! {
    /// Per-thread scratch of [`normalize_in_place`]: foreground pixel indices and values.
    static FOREGROUND: std::cell::RefCell<(Vec<u32>, Vec<[u8; 3]>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Scratch buffers above this many pixels are released after use (huge images).
const KEEP_SCRATCH_PIXELS: usize = 1 << 22;

/// Normalise one packed RGB8 image in place according to `cfg`, using `target` as the
/// reference. Never fails: degenerate inputs give a fallback (see module docs).
///
/// One pass blackens the background and gathers the foreground (indices + values, in
/// per-thread scratch buffers); the fit and the recomposition then touch foreground pixels only.
pub fn normalize_in_place(rgb: &mut [u8], cfg: &StainConfig, target: &StainParams) -> StainOutcome {
    let rule = MaskRule::from_config(cfg);
    if matches!(target, StainParams::None) || cfg.method == StainMethod::None {
        return StainOutcome::default();
    }
    let fallback = |reason: String| StainOutcome {
        fallback: true,
        reason: Some(reason),
    };
    FOREGROUND.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (idx, fg) = &mut *guard;
        idx.clear();
        fg.clear();
        gather_foreground(rgb, rule, idx, fg);
        let outcome = if fg.len() < cfg.min_foreground.max(1) {
            fallback(format!(
                "only {} foreground pixels (min_foreground={})",
                fg.len(),
                cfg.min_foreground
            ))
        } else {
            match target {
                StainParams::Macenko(t) => {
                    let s = MacenkoSettings::from_config(cfg);
                    match macenko_fit_pixels(fg, &s) {
                        Ok(fit) => {
                            macenko_apply_foreground(rgb, idx, fg, &macenko_tables(&fit, t, s.io));
                            StainOutcome::default()
                        }
                        Err(r) => fallback(r),
                    }
                }
                StainParams::Reinhard(t) => {
                    let lab = Lab::new();
                    match reinhard_fit_pixels(fg, &lab) {
                        Ok(src) => {
                            reinhard_apply_foreground(rgb, idx, fg, &src, t, &lab);
                            StainOutcome::default()
                        }
                        Err(r) => fallback(r),
                    }
                }
                StainParams::None => StainOutcome::default(),
            }
        };
        if idx.capacity() > KEEP_SCRATCH_PIXELS {
            *idx = Vec::new();
            *fg = Vec::new();
        }
        outcome
    })
}

/// Fit parameters for `cfg.method` on the foreground pixels of several reference images
/// (pooled). Errors (rather than falling back) when the fit is impossible.
/// Returns the parameters and the number of foreground pixels used.
pub fn fit_images(images: &[&[u8]], cfg: &StainConfig) -> Result<(StainParams, usize)> {
    let rule = MaskRule::from_config(cfg);
    let mut fg = Vec::new();
    for img in images {
        foreground_pixels(img, rule, &mut fg);
    }
    if cfg.method == StainMethod::None {
        return Ok((StainParams::None, fg.len()));
    }
    if fg.len() < cfg.min_foreground.max(1) {
        return Err(Error::Stain(format!(
            "cannot fit {:?} stain parameters: only {} foreground pixels in {} image(s) (min_foreground={}, black_threshold={})",
            cfg.method, fg.len(), images.len(), cfg.min_foreground, cfg.black_threshold
        )));
    }
    let res = match cfg.method {
        StainMethod::Macenko => {
            macenko_fit_pixels(&fg, &MacenkoSettings::from_config(cfg)).map(|f| StainParams::Macenko(f.params))
        }
        StainMethod::Reinhard => reinhard_fit_pixels(&fg, &Lab::new()).map(StainParams::Reinhard),
        StainMethod::None => unreachable!(),
    };
    res.map(|p| (p, fg.len()))
        .map_err(|r| Error::Stain(format!("cannot fit {:?} stain parameters: {r}", cfg.method)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic xorshift for test data.
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Synthetic H&E-like tissue (no background): random mixture of two stains.
    pub fn synthetic_tissue(w: usize, h: usize, seed: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed);
        let he = [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]];
        let mut v = Vec::with_capacity(w * h * 3);
        for _ in 0..w * h {
            let ch = rng.unit() * 1.5;
            let ce = rng.unit() * 0.8;
            for k in 0..3 {
                let od = he[k][0] * ch + he[k][1] * ce + 0.02 * rng.unit();
                let i = 240.0 * (-od).exp() - 1.0;
                v.push(i.clamp(0.0, 255.0) as u8);
            }
        }
        v
    }

    /// A round synthetic cell on a black background.
    pub fn synthetic_cell(w: usize, h: usize, seed: u64) -> Vec<u8> {
        let tissue = synthetic_tissue(w, h, seed);
        let mut v = vec![0u8; w * h * 3];
        let (cx, cy, r) = (w as f64 / 2.0, h as f64 / 2.0, w.min(h) as f64 * 0.35);
        for y in 0..h {
            for x in 0..w {
                if ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt() < r {
                    let i = (y * w + x) * 3;
                    v[i..i + 3].copy_from_slice(&tissue[i..i + 3]);
                    // keep foreground clearly above the black threshold
                    if v[i..i + 3].iter().all(|&c| c <= 10) {
                        v[i] = 11;
                    }
                }
            }
        }
        v
    }

    #[test]
    fn mask_rules() {
        let r = MaskRule {
            black_threshold: 10,
            white_threshold: None,
        };
        assert!(r.is_background(&[10, 3, 0]));
        assert!(!r.is_background(&[11, 0, 0]));
        assert!(!r.is_background(&[250, 250, 250]));
        let w = MaskRule {
            black_threshold: 10,
            white_threshold: Some(230),
        };
        assert!(w.is_background(&[250, 240, 230]));
        assert!(!w.is_background(&[250, 240, 229]));
        assert_eq!(foreground_mask(&[0, 0, 0, 50, 0, 0], r), vec![false, true]);
    }

    #[test]
    fn bbox() {
        let r = MaskRule {
            black_threshold: 10,
            white_threshold: None,
        };
        let (w, h) = (5, 4);
        let mut img = vec![0u8; w * h * 3];
        assert_eq!(foreground_bbox(&img, w, h, r), None);
        img[(w + 2) * 3] = 200; // (x=2, y=1)
        img[(2 * w + 3) * 3 + 1] = 200; // (x=3, y=2)
        assert_eq!(foreground_bbox(&img, w, h, r), Some((2, 1, 4, 3)));
    }

    #[test]
    fn gather_equals_mask_collect_and_blacken() {
        let mut rng = Rng::new(21);
        for (w, h) in [(1usize, 1usize), (7, 3), (40, 30), (91, 17)] {
            for white in [None, Some(200u8)] {
                let rule = MaskRule {
                    black_threshold: 10,
                    white_threshold: white,
                };
                // mix of pure black runs, dark-but-not-zero background, bright and coloured pixels
                let img: Vec<u8> = (0..w * h)
                    .flat_map(|_| match rng.next() % 5 {
                        0 | 1 => [0, 0, 0],
                        2 => [(rng.next() % 11) as u8, 3, (rng.next() % 11) as u8],
                        3 => [250, 240, 230],
                        _ => [
                            (rng.next() % 256) as u8,
                            (rng.next() % 256) as u8,
                            (rng.next() % 256) as u8,
                        ],
                    })
                    .collect();
                let mut want_px = Vec::new();
                foreground_pixels(&img, rule, &mut want_px);
                let want_idx: Vec<u32> = (0..w * h)
                    .filter(|&i| !rule.is_background(&img[3 * i..3 * i + 3]))
                    .map(|i| i as u32)
                    .collect();
                let mut want_img = img.clone();
                blacken_background(&mut want_img, rule);
                let mut got_img = img.clone();
                let (mut idx, mut px) = (vec![7u32], vec![[1u8, 2, 3]]); // appends
                gather_foreground(&mut got_img, rule, &mut idx, &mut px);
                assert_eq!(&idx[1..], &want_idx[..], "{w}x{h} {white:?}");
                assert_eq!(&px[1..], &want_px[..]);
                assert_eq!(got_img, want_img);
            }
        }
    }

    #[test]
    fn all_zero_and_filter_into() {
        for n in 0..80 {
            let mut v = vec![0u8; n];
            assert!(all_zero(&v));
            for k in 0..n {
                v[k] = 1;
                assert!(!all_zero(&v), "n={n} k={k}");
                v[k] = 0;
            }
        }
        let src: Vec<u32> = (0..100).collect();
        let mut out = vec![999];
        filter_into(&src, |x| x % 3 == 1, &mut out);
        assert_eq!(out, src.iter().copied().filter(|x| x % 3 == 1).collect::<Vec<_>>());
        filter_into(&src, |_| false, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn percentiles_of_is_exact_with_nan_and_ties() {
        let mut rng = Rng::new(8);
        for n in [1usize, 3, 2047, 2048, 9000, 40_000] {
            for dist in 0..4 {
                let v: Vec<f64> = (0..n)
                    .map(|i| match dist {
                        0 => rng.unit(),
                        1 => (rng.next() % 3) as f64,
                        2 => -(rng.unit().powi(6)),
                        _ => {
                            if i == n / 3 {
                                f64::NAN
                            } else {
                                rng.unit()
                            }
                        }
                    })
                    .collect();
                let pcts = [1.0, 99.0, 0.0, 100.0, 37.5];
                let mut w = v.clone();
                let got = percentiles_of(&mut w, &pcts, |x| x * 3.0);
                let mut sorted = v.clone();
                sorted.sort_by(f64::total_cmp);
                for (j, &p) in pcts.iter().enumerate() {
                    let want = match np_virtual_index(n, p) {
                        Ok((k, g)) => np_lerp(3.0 * sorted[k], 3.0 * sorted[k + 1], g),
                        Err(i) => 3.0 * sorted[i],
                    };
                    assert!(
                        got[j] == want || (got[j].is_nan() && want.is_nan()),
                        "n={n} dist={dist} p={p}: {} vs {want}",
                        got[j]
                    );
                }
            }
        }
    }

    #[test]
    fn tdot_all_equals_scalar() {
        let mut rng = Rng::new(5);
        let lut = od_lut(240.0);
        let t = dot_tables([0.3, -1.7, 0.9], &lut);
        for n in [0usize, 1, 3, 4, 5, 1001] {
            let px: Vec<[u8; 3]> = (0..n)
                .map(|_| {
                    [
                        (rng.next() % 256) as u8,
                        (rng.next() % 256) as u8,
                        (rng.next() % 256) as u8,
                    ]
                })
                .collect();
            let mut out = vec![1.0];
            tdot_all(&t, &px, &mut out);
            let want: Vec<f64> = px.iter().map(|&p| tdot(&t, p)).collect();
            assert_eq!(out, want, "n={n}");
        }
    }

    #[test]
    fn apply_simd_equals_scalar_including_saturation() {
        // tables with values around the 0 / 255 boundaries, huge values, NaN and negatives
        let mut rng = Rng::new(77);
        let mut t = Box::new([[[0.0f64; 256]; 3]; 3]);
        for k in 0..3 {
            for c in 0..3 {
                for v in 0..256 {
                    t[k][c][v] = match rng.next() % 8 {
                        0 => f64::NAN,
                        1 => -rng.unit(),
                        2 => 1e300,
                        3 => 255.0 + rng.unit(),
                        _ => rng.unit() * if c == 0 { 300.0 } else { 1.2 },
                    };
                }
            }
        }
        let n = 1003;
        let px: Vec<[u8; 3]> = (0..n)
            .map(|_| {
                [
                    (rng.next() % 256) as u8,
                    (rng.next() % 256) as u8,
                    (rng.next() % 256) as u8,
                ]
            })
            .collect();
        let idx: Vec<u32> = (0..n as u32).map(|i| (i * 7) % (n as u32 * 2)).collect();
        let mut a = vec![1u8; n * 2 * 3];
        let mut b = a.clone();
        macenko_apply_foreground(&mut a, &idx, &px, &t);
        macenko_apply_foreground_scalar(&mut b, &idx, &px, &t);
        assert_eq!(a, b);
        assert!(a.iter().any(|&v| v == 255) && a.iter().any(|&v| v == 0));
    }

    #[test]
    fn foreground_apply_equals_full_image_apply() {
        let (w, h) = (120, 90);
        let img = synthetic_cell(w, h, 12);
        let rule = MaskRule {
            black_threshold: 10,
            white_threshold: None,
        };
        let mut fg = Vec::new();
        foreground_pixels(&img, rule, &mut fg);
        let fit = macenko_fit_pixels(&fg, &MacenkoSettings::default()).unwrap();
        let target = MacenkoParams::default();
        let mut full = img.clone();
        macenko_apply(&mut full, rule, &fit, &target, 240.0);
        let mut part = img.clone();
        let (mut idx, mut px) = (Vec::new(), Vec::new());
        gather_foreground(&mut part, rule, &mut idx, &mut px);
        assert_eq!(px, fg);
        macenko_apply_foreground(&mut part, &idx, &px, &macenko_tables(&fit, &target, 240.0));
        assert_eq!(part, full);
        // and normalize_in_place (scratch buffers, reused twice) gives the same
        for _ in 0..2 {
            let mut n = img.clone();
            let o = normalize_in_place(&mut n, &StainConfig::default(), &StainParams::Macenko(target));
            assert!(!o.fallback);
            assert_eq!(n, full);
        }
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([3, 1, 2, 10], [0, 1, 50, 99, 100]) = [1, 1.03, 2.5, 9.79, 10]
        let base = [3.0, 1.0, 2.0, 10.0];
        let expect = [
            (0.0, 1.0),
            (1.0, 1.03),
            (50.0, 2.5),
            (99.0, 9.79),
            (100.0, 10.0),
            (25.0, 1.75),
        ];
        for (p, e) in expect {
            let mut v = base;
            let got = percentile_mut(&mut v, p);
            assert!((got - e).abs() < 1e-12, "p={p}: {got} vs {e}");
        }
        let mut one = [5.0];
        assert_eq!(percentile_mut(&mut one, 99.0), 5.0);
    }

    #[test]
    fn kth_pair_matches_sorting() {
        let mut rng = Rng::new(11);
        for n in [1usize, 2, 5, 2047, 2048, 5000, 40_000] {
            for dist in 0..4 {
                let v: Vec<f64> = (0..n)
                    .map(|i| match dist {
                        0 => rng.unit(),
                        1 => (rng.next() % 7) as f64, // many ties
                        2 => {
                            if i % 100 == 0 {
                                1e6
                            } else {
                                rng.unit()
                            }
                        } // outliers
                        _ => -(rng.unit().powi(8)),   // skewed
                    })
                    .collect();
                let mut sorted = v.clone();
                sorted.sort_by(f64::total_cmp);
                for k in [0, n / 100, n / 2, n * 99 / 100, n.saturating_sub(2), n - 1] {
                    let mut w = v.clone();
                    let (a, b) = kth_pair(&mut w, k);
                    assert_eq!(a, sorted[k], "n={n} dist={dist} k={k}");
                    assert_eq!(b, sorted[(k + 1).min(n - 1)], "n={n} dist={dist} k={k}");
                    if n >= 2048 {
                        if let Some((a, b)) = kth_pair_sampled(&v, k) {
                            assert_eq!(
                                (a, b),
                                (sorted[k], sorted[(k + 1).min(n - 1)]),
                                "sampled n={n} dist={dist} k={k}"
                            );
                        }
                    }
                }
                for p in [1.0, 50.0, 99.0] {
                    let mut w = v.clone();
                    let got = percentile_mut(&mut w, p);
                    let (k, g) = match np_virtual_index(n, p) {
                        Ok(x) => x,
                        Err(i) => (i, 0.0),
                    };
                    let want = np_lerp(sorted[k], sorted[(k + 1).min(n - 1)], g);
                    assert_eq!(got, want);
                }
            }
        }
    }

    #[test]
    fn percentiles_stream_is_exact() {
        let mut rng = Rng::new(3);
        for n in [1usize, 10, 2047, 2048, 5000, 44_000] {
            for dist in 0..3 {
                let v: Vec<f64> = (0..n)
                    .map(|i| match dist {
                        0 => rng.unit(),
                        1 => (rng.next() % 5) as f64,
                        _ => {
                            if i < n / 2 {
                                rng.unit()
                            } else {
                                10.0 + rng.unit()
                            }
                        } // sorted halves
                    })
                    .collect();
                let pcts = [1.0, 50.0, 99.0, 100.0, 0.0];
                let got = percentiles_stream(n, |i| v[i], &pcts, |x| x * 2.0);
                for (j, &p) in pcts.iter().enumerate() {
                    let mut w = v.clone();
                    w.sort_by(f64::total_cmp);
                    let want = match np_virtual_index(n, p) {
                        Ok((k, g)) => np_lerp(2.0 * w[k], 2.0 * w[k + 1], g),
                        Err(i) => 2.0 * w[i],
                    };
                    assert_eq!(got[j], want, "n={n} dist={dist} p={p}");
                }
            }
        }
    }

    #[test]
    fn eigen_decomposition_reconstructs() {
        let m = [[2.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 0.5]];
        let (vals, v) = sym_eigen3(m);
        assert!(vals[0] <= vals[1] && vals[1] <= vals[2]);
        for i in 0..3 {
            for j in 0..3 {
                let rec: f64 = (0..3).map(|k| v[i][k] * vals[k] * v[j][k]).sum();
                assert!((rec - m[i][j]).abs() < 1e-12, "A[{i}][{j}]");
                let dot: f64 = (0..3).map(|k| v[k][i] * v[k][j]).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        let (vals, _) = sym_eigen3([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]);
        assert_eq!(vals, [1.0, 2.0, 3.0]);
    }

    #[test]
    fn pinv_is_left_inverse() {
        let p = pinv_3x2(&MACENKO_HE_REF).unwrap();
        for i in 0..2 {
            for j in 0..2 {
                let v: f64 = (0..3).map(|r| p[i][r] * MACENKO_HE_REF[r][j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(pinv_3x2(&[[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]).is_none());
    }

    #[test]
    fn macenko_recovers_synthetic_stains() {
        let img = synthetic_tissue(64, 64, 1);
        let fg: Vec<[u8; 3]> = img.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
        let fit = macenko_fit_pixels(&fg, &MacenkoSettings::default()).unwrap();
        let he = fit.params.he;
        // H column first (larger red OD), both unit vectors with positive entries
        assert!(he[0][0] > he[0][1]);
        for j in 0..2 {
            let n: f64 = (0..3).map(|r| he[r][j] * he[r][j]).sum();
            assert!((n - 1.0).abs() < 1e-9);
            assert!((0..3).all(|r| he[r][j] > -0.05));
        }
        assert!(fit.params.max_c.iter().all(|&m| m > 0.1));
    }

    #[test]
    fn normalize_blackens_background_and_changes_cell() {
        let (w, h) = (80, 60);
        let img = synthetic_cell(w, h, 3);
        let mut out = img.clone();
        let cfg = StainConfig::default();
        let o = normalize_in_place(&mut out, &cfg, &StainParams::Macenko(MacenkoParams::default()));
        assert!(!o.fallback, "{o:?}");
        let rule = MaskRule::from_config(&cfg);
        let mut changed = 0;
        for (a, b) in img.chunks_exact(3).zip(out.chunks_exact(3)) {
            if rule.is_background(a) {
                assert_eq!(b, &[0, 0, 0]);
            } else if a != b {
                changed += 1;
            }
        }
        assert!(changed > 100);
    }

    #[test]
    fn normalize_to_own_fit_is_near_identity() {
        let img = synthetic_tissue(48, 48, 9);
        let fg: Vec<[u8; 3]> = img.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
        let mut cfg = StainConfig {
            min_foreground: 10,
            ..Default::default()
        };
        let fit = macenko_fit_pixels(&fg, &MacenkoSettings::default()).unwrap();
        let mut out = img.clone();
        normalize_in_place(&mut out, &cfg, &StainParams::Macenko(fit.params));
        let mad: f64 = img
            .iter()
            .zip(&out)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / img.len() as f64;
        assert!(mad < 1.5, "mean abs diff {mad}");

        let lab = Lab::new();
        let rp = reinhard_fit_pixels(&fg, &lab).unwrap();
        cfg.method = StainMethod::Reinhard;
        let mut out = img.clone();
        normalize_in_place(&mut out, &cfg, &StainParams::Reinhard(rp));
        let mad: f64 = img
            .iter()
            .zip(&out)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / img.len() as f64;
        assert!(mad < 1.0, "reinhard mean abs diff {mad}");
    }

    #[test]
    fn fallbacks_never_produce_garbage() {
        let cfg = StainConfig::default();
        let rule = MaskRule::from_config(&cfg);
        // all black
        let mut img = vec![0u8; 30 * 30 * 3];
        let o = normalize_in_place(&mut img, &cfg, &StainParams::Macenko(MacenkoParams::default()));
        assert!(o.fallback);
        assert!(img.iter().all(|&v| v == 0));
        // uniform colour: zero variance
        let mut img: Vec<u8> = [120u8, 80, 160].repeat(40 * 40);
        img[0] = 5;
        img[1] = 5;
        img[2] = 5; // one background pixel
        let orig = img.clone();
        for method in [
            StainParams::Macenko(MacenkoParams::default()),
            StainParams::Reinhard(ReinhardParams::default()),
        ] {
            let mut c = cfg.clone();
            c.method = method.method();
            let mut out = orig.clone();
            let o = normalize_in_place(&mut out, &c, &method);
            assert!(o.fallback, "{method:?}");
            assert!(o.reason.is_some());
            assert_eq!(&out[..3], &[0, 0, 0]);
            assert_eq!(&out[3..], &orig[3..]);
        }
        // too few foreground pixels
        let mut img = synthetic_cell(20, 20, 1);
        let o = normalize_in_place(&mut img, &cfg, &StainParams::Macenko(MacenkoParams::default()));
        assert!(o.fallback && o.reason.unwrap().contains("min_foreground"));
        let _ = rule;
    }

    #[test]
    fn lab_roundtrip() {
        let lab = Lab::new();
        let mut rng = Rng::new(5);
        for _ in 0..2000 {
            let p = [
                (rng.next() % 256) as u8,
                (rng.next() % 256) as u8,
                (rng.next() % 256) as u8,
            ];
            let l = lab.from_rgb(p);
            let back = lab.to_rgb([l[0] as f64, l[1] as f64, l[2] as f64]);
            for c in 0..3 {
                // truncation may lose one level
                assert!((p[c] as i32 - back[c] as i32).abs() <= 1, "{p:?} -> {l:?} -> {back:?}");
            }
        }
        let w = lab.from_rgb([255, 255, 255]);
        assert!(
            (w[0] - 100.0).abs() < 1e-3 && w[1].abs() < 1e-2 && w[2].abs() < 1e-2,
            "{w:?}"
        );
    }

    #[test]
    fn params_json_roundtrip_and_method_check() {
        let p = StainParams::Macenko(MacenkoParams::default());
        let j = p.to_json(Some(2), Some(1000));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(StainParams::from_value(&v).unwrap(), p);
        let mut cfg = StainConfig {
            params: Some(v),
            ..Default::default()
        };
        assert_eq!(StainParams::from_config(&cfg).unwrap(), p);
        cfg.method = StainMethod::Reinhard;
        assert!(matches!(StainParams::from_config(&cfg), Err(Error::Config(_))));
        let bad: serde_json::Value = serde_json::from_str(r#"{"method":"macenko","he":[[1,2],[3,4],[5,6]]}"#).unwrap();
        assert!(StainParams::from_value(&bad).is_err());
    }

    #[test]
    fn fit_images_pools_and_errors() {
        let a = synthetic_cell(64, 64, 1);
        let b = synthetic_cell(64, 64, 2);
        let cfg = StainConfig::default();
        let (p, n) = fit_images(&[&a, &b], &cfg).unwrap();
        assert!(matches!(p, StainParams::Macenko(_)));
        assert!(n > 2000);
        let black = vec![0u8; 64 * 64 * 3];
        let e = fit_images(&[&black], &cfg).unwrap_err().to_string();
        assert!(e.contains("foreground"), "{e}");
    }
}
