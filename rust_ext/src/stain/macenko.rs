//! Macenko (torchstain's `NumpyMacenkoNormalizer`): fit on foreground pixels, table-driven recomposition.

#[cfg(test)]
use super::mask::MaskRule;
use super::params::MacenkoParams;
use crate::config::StainConfig;
use crate::numeric::linalg::{pinv_3x2, sym_eigen3};
use crate::numeric::select::{percentile_mut, percentiles, rank_bracket, sorted_sample, RankPlan};

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

/// Optical densities of a list of pixels, one plane per channel: `c[ch][i] = lut[px[i][ch]]`.
///
/// A projection on a direction `k` is then `proj(k, od)` = `k[0] * od[0] + k[1] * od[1] +
/// k[2] * od[2]`, the same roundings in the same order as [`tdot`] on `dot_tables(k, lut)`
/// (every table entry is that same product), so the values are bit-identical; but the passes
/// over all pixels become plain SIMD loads and products instead of table gathers, which are
/// slow on some CPUs (on this project's AMD Zen 4 test machine the two gather passes took about
/// a quarter of a whole batch).
///
/// Memory: 24 bytes per pixel. Foregrounds up to [`WHOLE_PLANES_MAX`] pixels get planes of all
/// their pixels, written by the fit's first pass; bigger ones go through the counting passes in
/// chunks of [`PLANE_CHUNK`] pixels (each chunk's planes filled just before it is counted), so
/// the scratch stays bounded whatever the image.
#[derive(Debug, Default)]
pub(crate) struct OdPlanes {
    pub c: [Vec<f64>; 3],
}

impl OdPlanes {
    pub(crate) fn len(&self) -> usize {
        self.c[0].len()
    }

    /// The planes of `px` (tests; the fit fuses this with its first pass).
    #[cfg(test)]
    pub(crate) fn of(px: &[[u8; 3]], lut: &[f64; 256]) -> OdPlanes {
        let mut od = OdPlanes::default();
        od.fill(lut, px);
        od
    }

    /// Replace the planes by those of `px`.
    fn fill(&mut self, lut: &[f64; 256], px: &[[u8; 3]]) {
        for (ch, c) in self.c.iter_mut().enumerate() {
            c.clear();
            c.extend(px.iter().map(|p| lut[p[ch] as usize]));
        }
    }
}

/// Largest foreground (pixels) whose planes are kept whole (24 MiB); see [`OdPlanes`].
const WHOLE_PLANES_MAX: usize = 1 << 20;
/// Pixels per chunk of planes for bigger foregrounds (96 KiB of planes).
const PLANE_CHUNK: usize = 4096;
/// Plane scratch above this many pixels is released after the fit.
const KEEP_PLANES: usize = 1 << 18;

thread_local! {
    /// Per-thread scratch of [`macenko_fit_pixels`] (reused across images).
    static PLANES: std::cell::RefCell<OdPlanes> = std::cell::RefCell::new(OdPlanes::default());
}

/// The optical densities of one pixel.
#[inline(always)]
pub(crate) fn od_of(lut: &[f64; 256], p: [u8; 3]) -> [f64; 3] {
    [lut[p[0] as usize], lut[p[1] as usize], lut[p[2] as usize]]
}

/// Projection of optical densities `o` on `k` (same value as [`tdot`] on `dot_tables(k, lut)`).
#[inline(always)]
pub(crate) fn proj(k: [f64; 3], o: [f64; 3]) -> f64 {
    k[0] * o[0] + k[1] * o[1] + k[2] * o[2]
}

/// `out[i] = tdot(t, px[i])` for every pixel (the general paths; the fit's passes use [`OdPlanes`]).
pub fn tdot_all(t: &[[f64; 256]; 3], px: &[[u8; 3]], out: &mut Vec<f64>) {
    out.clear();
    out.extend(px.iter().map(|&p| tdot(t, p)));
}

/// What one fused counting pass ([`fused_count`]) found.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FusedCount {
    /// Values below each bracket.
    pub below: [usize; 2],
    /// The values inside each bracket (in no particular order).
    pub inside: [Vec<f64>; 2],
    /// True when every `w` was `> 0` (false for NaN).
    pub all_pos: bool,
    /// The pass stopped early: far more values fell inside a bracket than it reserves room for
    /// (the brackets missed; the counts are incomplete).
    pub overflow: bool,
}

/// One pass over the pixels of `od` with `u = proj(ka, o)` and `w = proj(kb, o)` per pixel,
/// counting values against the brackets `br` (`(lo, hi)`, inclusive) without storing them:
/// with `KEYS` the value is the angle key `-u / w` for both brackets, otherwise `u` is counted
/// against `br[0]` and `w` against `br[1]`. With `beta = Some(b)` only the pixels whose optical
/// density is `>= b` in every channel take part (the Macenko OD pixels: `!(o < b)`, as the
/// selection of the fit). The values are exactly those of [`tdot`] and the key loop (same
/// operations in the same order), so selection on the gathered values gives the same order
/// statistics as on the stored arrays. AVX2 (4 pixels per step) when available.
pub(crate) fn fused_count<const KEYS: bool>(
    ka: [f64; 3],
    kb: [f64; 3],
    od: &OdPlanes,
    beta: Option<f64>,
    br: [(f64, f64); 2],
) -> FusedCount {
    let mut out = FusedCount {
        all_pos: true,
        ..Default::default()
    };
    let n = od.len();
    assert!(od.c.iter().all(|c| c.len() == n), "planes of different lengths");
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2() {
            // SAFETY: the CPU supports AVX2; the planes have the same length (asserted).
            done = unsafe { fused_count_avx2::<KEYS>(ka, kb, od, beta, br, &mut out) };
        }
    }
    let [c0, c1, c2] = &od.c;
    for i in done..n {
        let o = [c0[i], c1[i], c2[i]];
        if let Some(b) = beta {
            if o.iter().any(|&x| x < b) {
                continue;
            }
        }
        let (u, w) = (proj(ka, o), proj(kb, o));
        out.all_pos &= w > 0.0;
        let vals = if KEYS {
            let k = -u / w;
            [k, k]
        } else {
            [u, w]
        };
        for b in 0..2 {
            let (lo, hi) = br[b];
            out.below[b] += (vals[b] < lo) as usize;
            if vals[b] >= lo && vals[b] <= hi {
                out.inside[b].push(vals[b]);
            }
        }
    }
    out
}

/// `(k[0] * o[0] + k[1] * o[1]) + k[2] * o[2]` on 4 lanes (no FMA: the roundings of [`proj`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn proj4(
    k: &[std::arch::x86_64::__m256d; 3],
    o: &[std::arch::x86_64::__m256d; 3],
) -> std::arch::x86_64::__m256d {
    use std::arch::x86_64::*;
    _mm256_add_pd(
        _mm256_add_pd(_mm256_mul_pd(k[0], o[0]), _mm256_mul_pd(k[1], o[1])),
        _mm256_mul_pd(k[2], o[2]),
    )
}

/// AVX2 body of [`fused_count`]; returns the number of pixels handled (the rest is scalar).
///
/// Long on purpose: one unsafe SIMD loop whose raw output pointers, reserved capacities and
/// lengths are tied together; split up, those invariants would span functions.
///
/// # Safety
/// The CPU supports AVX2 and the three planes of `od` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fused_count_avx2<const KEYS: bool>(
    ka: [f64; 3],
    kb: [f64; 3],
    od: &OdPlanes,
    beta: Option<f64>,
    br: [(f64, f64); 2],
    out: &mut FusedCount,
) -> usize {
    use std::arch::x86_64::*;
    let n = od.len();
    let planes = [od.c[0].as_ptr(), od.c[1].as_ptr(), od.c[2].as_ptr()];
    let kav = ka.map(|x| _mm256_set1_pd(x));
    let kbv = kb.map(|x| _mm256_set1_pd(x));
    let bv = _mm256_set1_pd(beta.unwrap_or(f64::NEG_INFINITY));
    let nan = _mm256_set1_pd(f64::NAN);
    let lo = [_mm256_set1_pd(br[0].0), _mm256_set1_pd(br[1].0)];
    let hi = [_mm256_set1_pd(br[0].1), _mm256_set1_pd(br[1].1)];
    let zero = _mm256_setzero_pd();
    let sign = _mm256_set1_pd(-0.0);
    let mut pos = 0xF;
    let mut below = [0u32; 2];
    // no allocation (no call) inside the loop, so nothing is spilled around one: a bracket of a
    // 512-value sample holds about 17/512 of the values; a quarter plus slack is plenty
    let cap = [n / 4 + 64; 2];
    out.inside[0].reserve(cap[0]);
    out.inside[1].reserve(cap[1]);
    let dst = [
        out.inside[0].spare_capacity_mut().as_mut_ptr() as *mut f64,
        out.inside[1].spare_capacity_mut().as_mut_ptr() as *mut f64,
    ];
    let mut len = [0usize; 2];
    let mut full = false;
    let mut j = 0;
    while j + 4 <= n {
        // SAFETY: j + 4 <= n = the length of every plane.
        let o = unsafe { planes.map(|p| _mm256_loadu_pd(p.add(j))) };
        let (u, w) = (proj4(&kav, &o), proj4(&kbv, &o));
        // the OD pixels: !(o < beta) in every channel (all lanes without a beta)
        let okm = _mm256_and_pd(
            _mm256_and_pd(_mm256_cmp_pd::<_CMP_NLT_UQ>(o[0], bv), _mm256_cmp_pd::<_CMP_NLT_UQ>(o[1], bv)),
            _mm256_cmp_pd::<_CMP_NLT_UQ>(o[2], bv),
        );
        let okbits = _mm256_movemask_pd(okm);
        pos &= _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(w, zero)) | (!okbits & 0xF);
        let vals = if KEYS {
            // -u / w: negation (sign flip) then the division, as the scalar `-u / w`
            let k = _mm256_div_pd(_mm256_xor_pd(u, sign), w);
            [k, k]
        } else {
            [u, w]
        };
        for b in 0..2 {
            // pixels that take no part become NaN: neither below nor inside a bracket
            let v = _mm256_blendv_pd(nan, vals[b], okm);
            below[b] += (_mm256_movemask_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(v, lo[b])) as u32).count_ones();
            let ins = _mm256_movemask_pd(_mm256_and_pd(
                _mm256_cmp_pd::<_CMP_GE_OQ>(v, lo[b]),
                _mm256_cmp_pd::<_CMP_LE_OQ>(v, hi[b]),
            ));
            if ins != 0 {
                if len[b] + 4 > cap[b] {
                    full = true;
                    break;
                }
                let mut t = [0.0f64; 4];
                // SAFETY: 4 x f64 store into a 32-byte array; len + 4 <= cap slots of spare capacity.
                unsafe {
                    _mm256_storeu_pd(t.as_mut_ptr(), v);
                    for (l, &x) in t.iter().enumerate() {
                        dst[b].add(len[b]).write(x);
                        len[b] += (ins >> l & 1) as usize;
                    }
                }
            }
        }
        if full {
            break;
        }
        j += 4;
    }
    // SAFETY: slots 0..len of each spare capacity were written.
    unsafe {
        out.inside[0].set_len(len[0]);
        out.inside[1].set_len(len[1]);
    }
    out.all_pos &= pos == 0xF;
    out.below[0] += below[0] as usize;
    out.below[1] += below[1] as usize;
    if full {
        // more values inside a bracket than reserved: the sample bracket is far off (a miss)
        out.overflow = true;
        return n;
    }
    j
}

/// A counting pass ([`fused_count`]) over the pixels `px`: on the planes `od` of all of them when
/// `whole` (with the OD-pixel mask `beta`), otherwise chunk by chunk with `od` as scratch (`px`
/// is then already the list of pixels that take part). The same counts either way (a chunk can
/// only report `overflow` sooner, which sends the caller to its general path, same result).
#[allow(clippy::too_many_arguments)]
fn count_pass<const KEYS: bool>(
    ka: [f64; 3],
    kb: [f64; 3],
    lut: &[f64; 256],
    od: &mut OdPlanes,
    whole: bool,
    px: &[[u8; 3]],
    beta: Option<f64>,
    br: [(f64, f64); 2],
) -> FusedCount {
    if whole {
        return fused_count::<KEYS>(ka, kb, od, beta, br);
    }
    let mut total = FusedCount {
        all_pos: true,
        ..Default::default()
    };
    for chunk in px.chunks(PLANE_CHUNK) {
        od.fill(lut, chunk);
        let c = fused_count::<KEYS>(ka, kb, od, None, br);
        for b in 0..2 {
            total.below[b] += c.below[b];
            total.inside[b].extend_from_slice(&c.inside[b]);
        }
        total.all_pos &= c.all_pos;
        if c.overflow {
            total.overflow = true;
            break;
        }
    }
    total
}

/// The Macenko angle percentiles `(phi(alpha), phi(100 - alpha))` of the OD pixels `od_px` (the
/// pixels of `od` with optical density `>= beta` in every channel) by one fused counting pass
/// (no key arrays), when every projection on `e2` is positive and the sampled brackets hold;
/// `None` otherwise (the caller then takes the general path, same result).
/// `whole`: `od` holds the planes of all the foreground (see [`count_pass`]).
#[allow(clippy::too_many_arguments)]
fn angle_percentiles_fused(
    e: [[f64; 3]; 2],
    lut: &[f64; 256],
    od: &mut OdPlanes,
    whole: bool,
    od_px: &[[u8; 3]],
    beta: f64,
    alpha: f64,
) -> Option<(f64, f64)> {
    let n = od_px.len();
    let sample = sorted_sample(n, |i| {
        let o = od_of(lut, od_px[i]);
        -proj(e[0], o) / proj(e[1], o)
    })?;
    let plans = [RankPlan::new(n, alpha), RankPlan::new(n, 100.0 - alpha)];
    let br = plans.map(|p| rank_bracket(&sample, n, p.k));
    let mut c = count_pass::<true>(e[0], e[1], lut, od, whole, od_px, Some(beta), br);
    if !c.all_pos || c.overflow {
        return None;
    }
    let phi = |k: f64| 1.0f64.atan2(-k);
    let [i0, i1] = &mut c.inside;
    let a = plans[0].pair_from_counts(c.below[0], i0)?;
    let b = plans[1].pair_from_counts(c.below[1], i1)?;
    Some((plans[0].finish(a.0, a.1, phi), plans[1].finish(b.0, b.1, phi)))
}

/// The `pct` percentiles of the concentrations `proj(k[0], o)` and `proj(k[1], o)` over the
/// pixels `px` by one fused counting pass (`od`, `whole`: see [`count_pass`]); `None` when a
/// sampled bracket misses (or the input is small).
fn concentration_percentiles_fused(
    k: [[f64; 3]; 2],
    lut: &[f64; 256],
    od: &mut OdPlanes,
    whole: bool,
    px: &[[u8; 3]],
    pct: f64,
) -> Option<[f64; 2]> {
    let n = px.len();
    let s0 = sorted_sample(n, |i| proj(k[0], od_of(lut, px[i])))?;
    let s1 = sorted_sample(n, |i| proj(k[1], od_of(lut, px[i])))?;
    let plan = RankPlan::new(n, pct);
    let br = [rank_bracket(&s0, n, plan.k), rank_bracket(&s1, n, plan.k)];
    let mut c = count_pass::<false>(k[0], k[1], lut, od, whole, px, None, br);
    if c.overflow {
        return None;
    }
    let [i0, i1] = &mut c.inside;
    let a = plan.pair_from_counts(c.below[0], i0)?;
    let b = plan.pair_from_counts(c.below[1], i1)?;
    Some([plan.finish(a.0, a.1, |v| v), plan.finish(b.0, b.1, |v| v)])
}

/// One pass over `px`: its optical densities into the planes `pl` (`pl[c][i] = lut[px[i][c]]`),
/// the OD pixels (all channels `ok`) into `spare` (in order) and their shifted OD sums:
/// `sum[i] += d[i]`, `sxx[i][j] += d[i] * d[j]` (`j >= i`), `d[c] = lut[p[c]] - shift[c]`, pixel
/// by pixel. Returns the number of OD pixels. Without `PLANES` the planes are not written (`pl`
/// may be empty). Compiled for AVX2 when available (three-operand forms; no FMA, so every
/// product and sum is rounded as in the plain loop: same bits).
///
/// Long on purpose: the plain loop, its AVX2-compiled twin and the dispatch, each with the same
/// parameter list; the twin must stay next to the body it recompiles.
#[allow(clippy::too_many_arguments)]
fn od_select_and_sums<const PLANES: bool>(
    px: &[[u8; 3]],
    ok: &[bool; 256],
    lut: &[f64; 256],
    shift: [f64; 3],
    pl: [&mut [std::mem::MaybeUninit<f64>]; 3],
    spare: &mut [std::mem::MaybeUninit<[u8; 3]>],
    sum: &mut [f64; 3],
    sxx: &mut [[f64; 3]; 3],
) -> usize {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn body<const PLANES: bool>(
        px: &[[u8; 3]],
        ok: &[bool; 256],
        lut: &[f64; 256],
        shift: [f64; 3],
        pl: [&mut [std::mem::MaybeUninit<f64>]; 3],
        spare: &mut [std::mem::MaybeUninit<[u8; 3]>],
        sum: &mut [f64; 3],
        sxx: &mut [[f64; 3]; 3],
    ) -> usize {
        let n = px.len();
        assert!(spare.len() >= n && (!PLANES || pl.iter().all(|c| c.len() >= n)));
        let [p0, p1, p2] = pl;
        let (mut s, mut q) = (*sum, *sxx);
        let mut cnt = 0usize;
        for (i, p) in px.iter().enumerate() {
            let o = od_of(lut, *p);
            if PLANES {
                p0[i].write(o[0]);
                p1[i].write(o[1]);
                p2[i].write(o[2]);
            }
            // branch-free selection (cnt <= i, in bounds); the sums only for OD pixels
            spare[cnt.min(i)].write(*p);
            if ok[p[0] as usize] & ok[p[1] as usize] & ok[p[2] as usize] {
                cnt += 1;
                let d = [o[0] - shift[0], o[1] - shift[1], o[2] - shift[2]];
                for i in 0..3 {
                    s[i] += d[i];
                    for j in i..3 {
                        q[i][j] += d[i] * d[j];
                    }
                }
            }
        }
        (*sum, *sxx) = (s, q);
        cnt
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2<const PLANES: bool>(
            px: &[[u8; 3]],
            ok: &[bool; 256],
            lut: &[f64; 256],
            shift: [f64; 3],
            pl: [&mut [std::mem::MaybeUninit<f64>]; 3],
            spare: &mut [std::mem::MaybeUninit<[u8; 3]>],
            sum: &mut [f64; 3],
            sxx: &mut [[f64; 3]; 3],
        ) -> usize {
            body::<PLANES>(px, ok, lut, shift, pl, spare, sum, sxx)
        }
        if crate::cpu::avx2() {
            // SAFETY: the CPU supports AVX2.
            return unsafe { avx2::<PLANES>(px, ok, lut, shift, pl, spare, sum, sxx) };
        }
    }
    body::<PLANES>(px, ok, lut, shift, pl, spare, sum, sxx)
}

/// The stain vectors `he` and the OD pixel count; with `whole`, fills `od` with the planes of
/// `fg` (otherwise uses it as chunk scratch). Returns `Err(reason)` when degenerate.
#[inline(never)]
fn macenko_stain_vectors(
    fg: &[[u8; 3]],
    lut: &[f64; 256],
    s: &MacenkoSettings,
    od: &mut OdPlanes,
    whole: bool,
) -> std::result::Result<([[f64; 2]; 3], usize), String> {
    // Pixels whose OD is >= beta in every channel (torchstain: ~np.any(OD < beta, axis=1)).
    // OD is decreasing in the value, so this is a per-channel threshold on the value.
    let ok: [bool; 256] = std::array::from_fn(|v| !(lut[v] < s.beta));
    let is_od = |p: &[u8; 3]| ok[p[0] as usize] & ok[p[1] as usize] & ok[p[2] as usize];
    // Covariance (np.cov: centred, ddof = 1) in one pass over data shifted by the first OD
    // pixel's OD (shifted sums avoid the cancellation of the naive formula), fused with the
    // selection of the OD pixels and the optical density planes (one pass over the foreground;
    // the pixels before the first OD pixel add nothing, so the sums are the same in the same order).
    let n_fg = fg.len();
    let shift = fg.iter().position(is_od).map_or([0.0; 3], |f| od_of(lut, fg[f]));
    let mut od_px: Vec<[u8; 3]> = Vec::with_capacity(n_fg);
    let mut sum = [0.0f64; 3];
    let mut sxx = [[0.0f64; 3]; 3];
    let n_pl = if whole { n_fg } else { 0 };
    for c in od.c.iter_mut() {
        c.clear();
        c.reserve(n_pl);
    }
    let [c0, c1, c2] = &mut od.c;
    let pl = [
        &mut c0.spare_capacity_mut()[..n_pl],
        &mut c1.spare_capacity_mut()[..n_pl],
        &mut c2.spare_capacity_mut()[..n_pl],
    ];
    let spare = &mut od_px.spare_capacity_mut()[..n_fg];
    let cnt = if whole {
        od_select_and_sums::<true>(fg, &ok, lut, shift, pl, spare, &mut sum, &mut sxx)
    } else {
        od_select_and_sums::<false>(fg, &ok, lut, shift, pl, spare, &mut sum, &mut sxx)
    };
    // SAFETY: slots 0..cnt of od_px were written (each OD pixel at its final slot), and all
    // n_pl slots of every plane.
    unsafe {
        od_px.set_len(cnt);
        for c in od.c.iter_mut() {
            c.set_len(n_pl);
        }
    }
    let n = od_px.len();
    if n < MIN_OD_PIXELS {
        return Err(format!(
            "only {n} pixels have optical density >= beta={} (need {MIN_OD_PIXELS})",
            s.beta
        ));
    }
    let [e1, e2] = principal_plane(shifted_covariance(n, &sum, &sxx)?)?;
    // phi = atan2(y, x). When every y > 0, phi = atan2(1, x/y) is increasing in -x/y, so the
    // percentiles can be selected on that key and only the two neighbours need an atan2.
    let (min_phi, max_phi) = match angle_percentiles_fused([e1, e2], lut, od, whole, &od_px, s.beta, s.alpha) {
        Some(phis) => phis,
        None => angle_percentiles_stored(&dot_tables(e1, lut), &dot_tables(e2, lut), &od_px, s.alpha),
    };
    Ok((stain_matrix([e1, e2], min_phi, max_phi)?, n))
}

/// The covariance (`np.cov`: centred, `ddof = 1`) of `n` samples from their shifted sums
/// (`sum[i]`, `sxx[i][j]` for `j >= i`, as [`od_select_and_sums`] gives them).
fn shifted_covariance(n: usize, sum: &[f64; 3], sxx: &[[f64; 3]; 3]) -> std::result::Result<[[f64; 3]; 3], String> {
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
    Ok(cov)
}

/// `[e1, e2]`: the middle and the largest eigenvector of `cov` (columns 1 and 2 as in
/// torchstain). The result does not depend on their signs (see module docs); `e2` is oriented so
/// that projections are positive, which keeps all angles inside (0, pi) and lets the angle
/// percentiles work on the cheaper key -x/y.
fn principal_plane(cov: [[f64; 3]; 3]) -> std::result::Result<[[f64; 3]; 2], String> {
    let (vals, vecs) = sym_eigen3(cov);
    if !(vals[2] > 0.0) {
        return Err("optical density has zero variance (uniform colour)".into());
    }
    let e1 = [vecs[0][1], vecs[1][1], vecs[2][1]];
    let mut e2 = [vecs[0][2], vecs[1][2], vecs[2][2]];
    if e2.iter().sum::<f64>() < 0.0 {
        e2 = e2.map(|x| -x);
    }
    if !e1.iter().chain(e2.iter()).all(|x| x.is_finite()) {
        return Err("non-finite eigenvectors".into());
    }
    Ok([e1, e2])
}

/// The stain matrix (rows R, G, B; columns H, E) from the angle percentiles in the plane
/// `[e1, e2]`: the direction with the larger red component is haematoxylin (torchstain's order).
fn stain_matrix([e1, e2]: [[f64; 3]; 2], min_phi: f64, max_phi: f64) -> std::result::Result<[[f64; 2]; 3], String> {
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
    Ok(he)
}

/// The angle percentiles from stored keys (or, when some projection on `e2` is not positive,
/// from the angles themselves): the general path of [`angle_percentiles_fused`].
fn angle_percentiles_stored(t1: &[[f64; 256]; 3], t2: &[[f64; 256]; 3], od_px: &[[u8; 3]], alpha: f64) -> (f64, f64) {
    let mut ys = Vec::new();
    tdot_all(t2, od_px, &mut ys);
    let mut keys = Vec::new();
    tdot_all(t1, od_px, &mut keys);
    let mut all_pos = true;
    for (k, &y) in keys.iter_mut().zip(&ys) {
        all_pos &= y > 0.0;
        *k = -*k / y;
    }
    if all_pos {
        let phis = percentiles(&mut keys, &[alpha, 100.0 - alpha], |k| 1.0f64.atan2(-k));
        (phis[0], phis[1])
    } else {
        let mut phi: Vec<f64> = od_px.iter().map(|p| tdot(t2, *p).atan2(tdot(t1, *p))).collect();
        (percentile_mut(&mut phi, alpha), percentile_mut(&mut phi, 100.0 - alpha))
    }
}

/// Fit Macenko on foreground pixels: stain vectors from OD pixels, concentrations over all
/// given pixels, `max_c` = 99th percentile. `Err(reason)` when degenerate.
pub fn macenko_fit_pixels(fg: &[[u8; 3]], s: &MacenkoSettings) -> std::result::Result<MacenkoFit, String> {
    if fg.is_empty() {
        return Err("no foreground pixels".into());
    }
    PLANES.with(|cell| {
        let mut od = cell.borrow_mut();
        let fit = fit_with_planes(fg, s, &mut od, fg.len() <= WHOLE_PLANES_MAX);
        if od.c[0].capacity() > KEEP_PLANES {
            *od = OdPlanes::default();
        }
        fit
    })
}

/// [`macenko_fit_pixels`] with the plane scratch `od`, whole or in chunks (same result).
fn fit_with_planes(
    fg: &[[u8; 3]],
    s: &MacenkoSettings,
    od: &mut OdPlanes,
    whole: bool,
) -> std::result::Result<MacenkoFit, String> {
    let lut = od_lut(s.io);
    let (he, n_od) = macenko_stain_vectors(fg, &lut, s, od, whole)?;
    let pinv = pinv_3x2(&he).ok_or_else(|| "stain vectors are collinear".to_string())?;
    let max_c = concentration_percentiles_fused(pinv, &lut, od, whole, fg, 99.0).unwrap_or_else(|| {
        let mut c: Vec<f64> = Vec::new();
        tdot_all(&dot_tables(pinv[0], &lut), fg, &mut c);
        let c0 = percentiles(&mut c, &[99.0], |v| v)[0];
        tdot_all(&dot_tables(pinv[1], &lut), fg, &mut c);
        let c1 = percentiles(&mut c, &[99.0], |v| v)[0];
        [c0, c1]
    });
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
        if crate::cpu::avx2() {
            // SAFETY: the CPU supports AVX2.
            unsafe { macenko_apply_foreground_avx2(rgb, idx, px, tables) };
            return;
        }
    }
    macenko_apply_foreground_scalar(rgb, idx, px, tables);
}

pub(crate) fn macenko_apply_foreground_scalar(
    rgb: &mut [u8],
    idx: &[u32],
    px: &[[u8; 3]],
    tables: &[[[f64; 256]; 3]; 3],
) {
    for (&i, &p) in idx.iter().zip(px) {
        let i = i as usize * 3;
        rgb[i..i + 3].copy_from_slice(&macenko_pixel(tables, p));
    }
}

/// Four pixels per step: the 12 table entries by plain loads (the AVX2 gather instruction is
/// about 2x slower than this on the AMD Zen 4 test machine: 0.137 vs 0.068 ms a cell), then the
/// products, clamps and narrowing in AVX2; the same float operations in the same order as
/// [`macenko_pixel`] (`(t0 * t1) * t2`, then `max(.,0)`, `min(.,255)`, truncation = the
/// saturating `as u8`, NaN -> 0), so the output is bit-identical to the scalar path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn macenko_apply_foreground_avx2(rgb: &mut [u8], idx: &[u32], px: &[[u8; 3]], tables: &[[[f64; 256]; 3]; 3]) {
    use std::arch::x86_64::*;
    let n = px.len();
    let zero = _mm256_setzero_pd();
    let max = _mm256_set1_pd(255.0);
    let mut j = 0;
    while j + 4 <= n {
        let q = [px[j], px[j + 1], px[j + 2], px[j + 3]];
        let mut out = [[0i32; 4]; 3];
        for k in 0..3 {
            let l = |c: usize| {
                let t = &tables[k][c];
                _mm256_setr_pd(t[q[0][c] as usize], t[q[1][c] as usize], t[q[2][c] as usize], t[q[3][c] as usize])
            };
            let v = _mm256_mul_pd(_mm256_mul_pd(l(0), l(1)), l(2));
            // max(v, 0) returns 0 for NaN (second operand), like `as u8`
            let v = _mm256_min_pd(_mm256_max_pd(v, zero), max);
            // SAFETY: 4 x i32 store into a 16-byte array.
            unsafe { _mm_storeu_si128(out[k].as_mut_ptr() as *mut __m128i, _mm256_cvttpd_epi32(v)) };
        }
        let i0 = idx[j] as usize;
        if idx[j + 3] as usize == i0 + 3 && 3 * i0 + 12 <= rgb.len() {
            // four neighbouring pixels (indices are increasing): one 12-byte store of the
            // interleaved values (all in 0..=255 already, so the saturating packs only narrow)
            // SAFETY: 16-byte loads from the 3 x 16-byte array, 12 bytes stored in bounds (checked).
            unsafe {
                let r = _mm_loadu_si128(out[0].as_ptr() as *const __m128i);
                let g = _mm_loadu_si128(out[1].as_ptr() as *const __m128i);
                let b = _mm_loadu_si128(out[2].as_ptr() as *const __m128i);
                let bytes = _mm_packus_epi16(_mm_packus_epi32(r, g), _mm_packus_epi32(b, b));
                let rgb12 = _mm_shuffle_epi8(
                    bytes,
                    _mm_setr_epi8(0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11, -1, -1, -1, -1),
                );
                let dst = rgb.as_mut_ptr().add(3 * i0);
                _mm_storel_epi64(dst as *mut __m128i, rgb12);
                (dst.add(8) as *mut i32).write_unaligned(_mm_extract_epi32::<2>(rgb12));
            }
        } else {
            for (l, &i) in idx[j..j + 4].iter().enumerate() {
                let i = i as usize * 3;
                rgb[i..i + 3].copy_from_slice(&[out[0][l] as u8, out[1][l] as u8, out[2][l] as u8]);
            }
        }
        j += 4;
    }
    macenko_apply_foreground_scalar(rgb, &idx[j..], &px[j..], tables);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stain::tests::{synthetic_tissue, Rng};

    #[test]
    fn shifted_covariance_equals_np_cov() {
        // samples (1,2,0), (3,1,1), (2,5,4), (0,0,2) shifted by (1,1,1)
        let xs = [[1.0, 2.0, 0.0], [3.0, 1.0, 1.0], [2.0, 5.0, 4.0], [0.0, 0.0, 2.0f64]];
        let (mut sum, mut sxx) = ([0.0; 3], [[0.0; 3]; 3]);
        for x in xs {
            let d = x.map(|v| v - 1.0);
            for i in 0..3 {
                sum[i] += d[i];
                for j in i..3 {
                    sxx[i][j] += d[i] * d[j];
                }
            }
        }
        let cov = shifted_covariance(4, &sum, &sxx).unwrap();
        let mean: [f64; 3] = std::array::from_fn(|i| xs.iter().map(|x| x[i]).sum::<f64>() / 4.0);
        for i in 0..3 {
            for j in 0..3 {
                let want = xs.iter().map(|x| (x[i] - mean[i]) * (x[j] - mean[j])).sum::<f64>() / 3.0;
                assert!((cov[i][j] - want).abs() < 1e-12, "{i} {j}: {} vs {want}", cov[i][j]);
            }
        }
        assert!(shifted_covariance(1, &sum, &sxx).is_err(), "one sample: ddof=1 divides by zero");
    }

    #[test]
    fn principal_plane_and_stain_matrix() {
        // variance mostly along (1,1,1)/sqrt3, some along (1,-1,0)/sqrt2
        let (a, b) = ([1.0, 1.0, 1.0f64].map(|v| v / 3f64.sqrt()), [1.0, -1.0, 0.0f64].map(|v| v / 2f64.sqrt()));
        let cov: [[f64; 3]; 3] = std::array::from_fn(|i| std::array::from_fn(|j| 4.0 * a[i] * a[j] + b[i] * b[j]));
        let [e1, e2] = principal_plane(cov).unwrap();
        for k in 0..3 {
            assert!((e2[k] - a[k]).abs() < 1e-9, "e2 = {e2:?}, oriented positive");
            assert!((e1[k].abs() - b[k].abs()).abs() < 1e-9, "e1 = {e1:?}");
        }
        assert!(principal_plane([[0.0; 3]; 3]).unwrap_err().contains("zero variance"));
        // phi = pi/2 is e2, phi = 0 is e1; H is the one with the larger red component
        let he = stain_matrix([e1, e2], 0.0, std::f64::consts::FRAC_PI_2).unwrap();
        let (h, e) = if e1[0] > e2[0] { (e1, e2) } else { (e2, e1) };
        for k in 0..3 {
            assert!((he[k][0] - h[k]).abs() < 1e-12 && (he[k][1] - e[k]).abs() < 1e-12, "{he:?}");
        }
        assert!(stain_matrix([e1, e2], f64::NAN, 0.0).is_err());
    }

    fn pixels(n: usize, seed: u64) -> Vec<[u8; 3]> {
        synthetic_tissue(n, 1, seed)
            .chunks_exact(3)
            .map(|p| [p[0], p[1], p[2]])
            .collect()
    }

    /// `!(o < beta)` in every channel: the OD pixels of the fit.
    fn is_od(lut: &[f64; 256], p: [u8; 3], beta: f64) -> bool {
        od_of(lut, p).iter().all(|&x| !(x < beta))
    }

    #[test]
    fn fused_count_equals_scalar_definition() {
        let lut = od_lut(240.0);
        let mut rng = Rng::new(3);
        let (ka, kb) = ([0.3, -0.8, 0.5], [0.6, 0.4, 0.7]);
        let (ta, tb) = (dot_tables(ka, &lut), dot_tables(kb, &lut));
        for n in [0usize, 1, 5, 6, 7, 1000, 3001] {
            let all_px: Vec<[u8; 3]> = (0..n).map(|_| rng.pixel()).collect();
            let od = OdPlanes::of(&all_px, &lut);
            for beta in [None, Some(0.15), Some(1.2)] {
                // the definition: table dot products over the pixels that take part
                let px: Vec<[u8; 3]> =
                    all_px.iter().copied().filter(|&p| beta.is_none_or(|b| is_od(&lut, p, b))).collect();
                let u: Vec<f64> = px.iter().map(|&p| tdot(&ta, p)).collect();
                let w: Vec<f64> = px.iter().map(|&p| tdot(&tb, p)).collect();
                // a bracket around the 30-35 % values, and an open one below the 10 % value
                let at = |v: &[f64], q: f64| {
                    let mut s = v.to_vec();
                    s.sort_by(f64::total_cmp);
                    s.get((q * s.len() as f64) as usize).copied().unwrap_or(0.0)
                };
                for keys in [false, true] {
                    let vals: [Vec<f64>; 2] = if keys {
                        let k: Vec<f64> = u.iter().zip(&w).map(|(a, b)| -a / b).collect();
                        [k.clone(), k]
                    } else {
                        [u.clone(), w.clone()]
                    };
                    let br = [
                        (at(&vals[0], 0.30), at(&vals[0], 0.35)),
                        (f64::NEG_INFINITY, at(&vals[1], 0.1)),
                    ];
                    let got = if keys {
                        fused_count::<true>(ka, kb, &od, beta, br)
                    } else {
                        fused_count::<false>(ka, kb, &od, beta, br)
                    };
                    assert!(!got.overflow);
                    for b in 0..2 {
                        let (lo, hi) = br[b];
                        assert_eq!(
                            got.below[b],
                            vals[b].iter().filter(|&&v| v < lo).count(),
                            "n={n} beta={beta:?} keys={keys}"
                        );
                        let mut want: Vec<f64> = vals[b].iter().copied().filter(|&v| v >= lo && v <= hi).collect();
                        let mut have = got.inside[b].clone();
                        want.sort_by(f64::total_cmp);
                        have.sort_by(f64::total_cmp);
                        // bit-identical values (proj on the planes = tdot on the tables)
                        assert_eq!(have, want, "n={n} beta={beta:?} keys={keys} bracket {b}");
                    }
                    assert_eq!(got.all_pos, w.iter().all(|&v| v > 0.0), "n={n} beta={beta:?}");
                }
            }
            // a bracket holding everything overflows the reserved room of the SIMD path (big
            // inputs); the scalar path (portable builds, Arm) stores every value and never overflows
            let all = fused_count::<false>(ka, kb, &od, None, [(f64::NEG_INFINITY, f64::INFINITY); 2]);
            assert_eq!(all.overflow, n >= 1000 && crate::cpu::avx2(), "n={n}");
            if !all.overflow {
                assert_eq!(all.inside[0].len() + all.inside[1].len(), 2 * n, "n={n}");
            }
            let scalar = crate::cpu::with_portable(|| {
                fused_count::<false>(ka, kb, &od, None, [(f64::NEG_INFINITY, f64::INFINITY); 2])
            });
            assert!(!scalar.overflow && scalar.inside[0].len() == n, "n={n}");
        }
    }

    #[test]
    fn fused_percentiles_equal_stored_ones() {
        let lut = od_lut(240.0);
        let beta = 0.15;
        let (e1, e2) = ([0.2, -0.7, 0.6], [0.6, 0.5, 0.6]);
        let (t1, t2) = (dot_tables(e1, &lut), dot_tables(e2, &lut));
        for (n, seed) in [(3000usize, 1u64), (5000, 2), (35_000, 3), (40_001, 4)] {
            let fg = pixels(n, seed);
            // the OD pixels (OD >= beta > 0 everywhere, so their projections on e2 are positive)
            let od_px: Vec<[u8; 3]> = fg.iter().copied().filter(|&p| is_od(&lut, p, beta)).collect();
            assert!(od_px.len() < fg.len() && od_px.len() > 2048, "n={n}: {} OD pixels", od_px.len());
            // planes of the whole foreground (masked by beta), or chunks of the pixel lists
            for whole in [true, false] {
                let mut od = if whole { OdPlanes::of(&fg, &lut) } else { OdPlanes::default() };
                for alpha in [1.0, 0.0, 5.0, 50.0] {
                    let Some(fused) = angle_percentiles_fused([e1, e2], &lut, &mut od, whole, &od_px, beta, alpha)
                    else {
                        assert!(
                            alpha > 1.0,
                            "n={n} alpha={alpha}: the 0 and 1 % brackets (>= 3.5 sigma) hold"
                        );
                        continue;
                    };
                    assert_eq!(
                        fused,
                        angle_percentiles_stored(&t1, &t2, &od_px, alpha),
                        "n={n} whole={whole} alpha={alpha}"
                    );
                }
                let got = concentration_percentiles_fused([e1, e2], &lut, &mut od, whole, &fg, 99.0).unwrap();
                for (k, t) in [&t1, &t2].into_iter().enumerate() {
                    let mut c = Vec::new();
                    tdot_all(t, &fg, &mut c);
                    assert_eq!(got[k], percentiles(&mut c, &[99.0], |v| v)[0], "n={n} whole={whole}");
                }
            }
        }
        // small inputs and non-positive projections take the general path
        let px = pixels(100, 5);
        let mut od = OdPlanes::of(&px, &lut);
        assert!(angle_percentiles_fused([e1, e2], &lut, &mut od, true, &px, 0.0, 1.0).is_none());
        let px = pixels(5000, 6);
        let mut od = OdPlanes::of(&px, &lut);
        let neg = [-0.6, 0.5, 0.6];
        let all_pos = px.iter().all(|&p| proj(neg, od_of(&lut, p)) > 0.0);
        assert!(
            angle_percentiles_fused([e1, neg], &lut, &mut od, true, &px, f64::NEG_INFINITY, 1.0).is_none() || all_pos
        );
    }

    #[test]
    fn fit_with_chunked_planes_equals_whole_planes() {
        // the path of foregrounds above WHOLE_PLANES_MAX gives the same fit, to the bit
        let s = MacenkoSettings::default();
        for (n, seed) in [(3 * PLANE_CHUNK + 7, 8u64), (40_000, 9)] {
            let fg = pixels(n, seed);
            let whole = fit_with_planes(&fg, &s, &mut OdPlanes::default(), true).unwrap();
            let mut scratch = OdPlanes::default();
            let chunked = fit_with_planes(&fg, &s, &mut scratch, false).unwrap();
            assert_eq!(whole, chunked, "n={n}");
            // the chunk scratch holds at most one chunk
            assert!(scratch.len() <= PLANE_CHUNK, "n={n}: {} planes", scratch.len());
        }
    }
}
