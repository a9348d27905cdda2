//! Background masking: which pixels are foreground, their bounding box, gathering them.

use crate::config::StainConfig;

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

/// True when any of 32 bytes is non-zero (four 64-bit words).
#[inline(always)]
fn any32(w: &[u8]) -> bool {
    let q = |o: usize| u64::from_ne_bytes(w[o..o + 8].try_into().unwrap());
    q(0) | q(8) | q(16) | q(24) != 0
}

/// Index of the first non-zero byte (32 bytes per step).
pub fn first_nonzero(b: &[u8]) -> Option<usize> {
    let mut blocks = b.chunks_exact(32);
    let mut i = 0;
    for w in &mut blocks {
        if any32(w) {
            return w.iter().position(|&v| v != 0).map(|k| i + k);
        }
        i += 32;
    }
    blocks.remainder().iter().position(|&v| v != 0).map(|k| i + k)
}

/// Index of the last non-zero byte (32 bytes per step).
pub fn last_nonzero(b: &[u8]) -> Option<usize> {
    let mut blocks = b.rchunks_exact(32);
    let mut end = b.len();
    for w in &mut blocks {
        if any32(w) {
            return w.iter().rposition(|&v| v != 0).map(|k| end - 32 + k);
        }
        end -= 32;
    }
    blocks.remainder().iter().rposition(|&v| v != 0)
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
        // pure black pixels (all-zero bytes) are background whatever the thresholds: start
        // the per-pixel tests at the first / last non-zero byte
        let lead = first_nonzero(row).unwrap_or(row.len()) / 3;
        let first = row[3 * lead..].chunks_exact(3).position(|p| !rule.is_background(p)).map(|f| f + lead);
        if let Some(f) = first {
            let tail = last_nonzero(row).map_or(0, |b| b / 3 + 1);
            let last = row[..3 * tail].chunks_exact(3).rposition(|p| !rule.is_background(p)).unwrap();
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

/// One pixel of [`gather_foreground`], branch-free: the slot `cnt` is always written and kept only
/// for foreground (`cnt <= j < n`, so it is in bounds); background pixels are stored back as black.
#[inline(always)]
fn gather_one(
    rgb: &mut [u8],
    j: usize,
    rule: MaskRule,
    idx_out: &mut [std::mem::MaybeUninit<u32>],
    px_out: &mut [std::mem::MaybeUninit<[u8; 3]>],
    cnt: &mut usize,
) {
    let q = &mut rgb[3 * j..3 * j + 3];
    let p = [q[0], q[1], q[2]];
    let fg = !rule.is_background(&p);
    let m = if fg { 0xFF } else { 0 };
    q[0] = p[0] & m;
    q[1] = p[1] & m;
    q[2] = p[2] & m;
    idx_out[*cnt].write(j as u32);
    px_out[*cnt].write(p);
    *cnt += fg as usize;
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
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2() {
            // SAFETY: the CPU supports AVX2; the spare capacities hold n slots each.
            (i, cnt) = unsafe { gather_blocks_avx2(rgb, rule, idx_out, px_out) };
        }
    }
    while i + 8 <= n {
        let c: &[u8; 24] = rgb[3 * i..3 * i + 24].try_into().unwrap();
        let a = u64::from_ne_bytes(c[0..8].try_into().unwrap());
        let b = u64::from_ne_bytes(c[8..16].try_into().unwrap());
        let d = u64::from_ne_bytes(c[16..24].try_into().unwrap());
        if a | b | d != 0 {
            let mut all_fg = true;
            for k in 0..8 {
                all_fg &= !rule.is_background(&c[3 * k..3 * k + 3]);
            }
            if all_fg {
                // the common case inside a cell: pixels stay as they are, all 8 are appended
                // (`cnt + 8 <= i + 8 <= n`, in bounds)
                let (io, po) = (&mut idx_out[cnt..cnt + 8], &mut px_out[cnt..cnt + 8]);
                for k in 0..8 {
                    io[k].write((i + k) as u32);
                    po[k].write([c[3 * k], c[3 * k + 1], c[3 * k + 2]]);
                }
                cnt += 8;
            } else {
                for j in i..i + 8 {
                    gather_one(rgb, j, rule, idx_out, px_out, &mut cnt);
                }
            }
        }
        i += 8;
    }
    for j in i..n {
        gather_one(rgb, j, rule, idx_out, px_out, &mut cnt);
    }
    // SAFETY: slots `0..cnt` of both spare capacities were written above.
    unsafe {
        idx.set_len(start + cnt);
        px.set_len(start + cnt);
    }
}

/// Foreground mask (bit k = pixel k) of 8 packed RGB pixels at `p` (24 readable bytes):
/// `max(R,G,B) > black` and not (`white` set and `min(R,G,B) >= white`), as
/// [`MaskRule::is_background`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn fg_mask8(p: *const u8, black: std::arch::x86_64::__m128i, white: Option<std::arch::x86_64::__m128i>) -> u32 {
    use std::arch::x86_64::*;
    // SAFETY: bytes 0..16 and 8..24 are readable (caller).
    let (v, w) = unsafe {
        (
            _mm_loadu_si128(p as *const __m128i),
            _mm_loadu_si128(p.add(8) as *const __m128i),
        )
    };
    // channel c of pixels 0..4 from v (bytes c + 3k), of pixels 4..8 from w (bytes c + 3k - 8)
    let ch = |c: i8| {
        let lo = _mm_setr_epi8(c, c + 3, c + 6, c + 9, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        let hi = _mm_setr_epi8(
            -1,
            -1,
            -1,
            -1,
            c + 4,
            c + 7,
            c + 10,
            c + 13,
            -1,
            -1,
            -1,
            -1,
            -1,
            -1,
            -1,
            -1,
        );
        _mm_or_si128(_mm_shuffle_epi8(v, lo), _mm_shuffle_epi8(w, hi))
    };
    let (r, g, b) = (ch(0), ch(1), ch(2));
    let zero = _mm_setzero_si128();
    // max > black  <=>  saturating (max - black) != 0
    let dark = _mm_cmpeq_epi8(_mm_subs_epu8(_mm_max_epu8(_mm_max_epu8(r, g), b), black), zero);
    let bg = match white {
        // min >= white  <=>  saturating (white - min) == 0
        Some(wt) => _mm_or_si128(
            dark,
            _mm_cmpeq_epi8(_mm_subs_epu8(wt, _mm_min_epu8(_mm_min_epu8(r, g), b)), zero),
        ),
        None => dark,
    };
    !(_mm_movemask_epi8(bg) as u32) & 0xFF
}

/// The block loop of [`gather_foreground`] with AVX2: 32 pure black pixels skipped per
/// three 32-byte loads, an 8-pixel foreground mask in a few vector instructions, whole
/// foreground blocks appended with three stores. Returns `(pixels done, foreground count)`;
/// the caller finishes the tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_blocks_avx2(
    rgb: &mut [u8],
    rule: MaskRule,
    idx_out: &mut [std::mem::MaybeUninit<u32>],
    px_out: &mut [std::mem::MaybeUninit<[u8; 3]>],
) -> (usize, usize) {
    use std::arch::x86_64::*;
    let n = rgb.len() / 3;
    assert!(idx_out.len() >= n && px_out.len() >= n);
    let black = _mm_set1_epi8(rule.black_threshold as i8);
    let white = rule.white_threshold.map(|w| _mm_set1_epi8(w as i8));
    let step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let base = rgb.as_mut_ptr();
    let (io, po) = (idx_out.as_mut_ptr() as *mut u32, px_out.as_mut_ptr() as *mut u8);
    let mut cnt = 0usize;
    let mut i = 0usize;
    while i + 8 <= n {
        // SAFETY: every access below stays inside pixels i..i+32 (or i..i+8) of `rgb`, and
        // inside slots cnt..cnt+8 of the spare capacities (cnt <= i, i + 8 <= n).
        unsafe {
            let p = base.add(3 * i);
            if i + 32 <= n {
                let a = _mm256_loadu_si256(p as *const __m256i);
                let b = _mm256_loadu_si256(p.add(32) as *const __m256i);
                let c = _mm256_loadu_si256(p.add(64) as *const __m256i);
                if _mm256_testz_si256(_mm256_or_si256(_mm256_or_si256(a, b), c), _mm256_set1_epi8(-1)) != 0 {
                    i += 32;
                    continue;
                }
            }
            let lo = _mm_loadu_si128(p as *const __m128i);
            let hi = _mm_loadl_epi64(p.add(16) as *const __m128i);
            if _mm_testz_si128(_mm_or_si128(lo, hi), _mm_set1_epi8(-1)) != 0 {
                i += 8;
                continue;
            }
            let m = fg_mask8(p, black, white);
            if m == 0xFF {
                _mm256_storeu_si256(
                    io.add(cnt) as *mut __m256i,
                    _mm256_add_epi32(_mm256_set1_epi32(i as i32), step),
                );
                _mm_storeu_si128(po.add(3 * cnt) as *mut __m128i, lo);
                _mm_storel_epi64(po.add(3 * cnt + 16) as *mut __m128i, hi);
                cnt += 8;
            } else if m == 0 {
                std::ptr::write_bytes(p, 0, 24);
            } else {
                for k in 0..8 {
                    let q = p.add(3 * k);
                    if m >> k & 1 != 0 {
                        io.add(cnt).write((i + k) as u32);
                        std::ptr::copy_nonoverlapping(q, po.add(3 * cnt), 3);
                        cnt += 1;
                    } else {
                        std::ptr::write_bytes(q, 0, 3);
                    }
                }
            }
        }
        i += 8;
    }
    (i, cnt)
}

/// Set every background pixel to black.
pub fn blacken_background(rgb: &mut [u8], rule: MaskRule) {
    for p in rgb.chunks_exact_mut(3) {
        if rule.is_background(p) {
            p.copy_from_slice(&[0, 0, 0]);
        }
    }
}
