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
    #[inline(always)]
    fn one(
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
    let mut i = 0;
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
                    one(rgb, j, rule, idx_out, px_out, &mut cnt);
                }
            }
        }
        i += 8;
    }
    for j in i..n {
        one(rgb, j, rule, idx_out, px_out, &mut cnt);
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
