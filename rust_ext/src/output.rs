//! Writing one processed item (a packed RGB `size x size` image) into its slice of the batch
//! output, in the config's layout and dtype.
//!
//! One generic path over the output element ([`OutElem`]: `u8`, `f32`, `f16`): the batch runner,
//! the Python wrapper and the tests are written once for any `T: OutElem`; the only place a
//! [`DType`] picks a Rust type is the Python wrapper's single dispatch.

use half::f16;

use crate::config::{Config, DType, Layout};

/// What writing an item needs from the config: layout, side, and the float tables.
#[derive(Debug, Clone)]
pub struct OutputTables {
    layout: Layout,
    /// Pixels per plane (`size * size`).
    s2: usize,
    /// Read by the x86 SIMD path only (the portable path uses `lut`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    mean: [f32; 3],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    std: [f32; 3],
    /// `lut[c][v] = (v/255 - mean[c]) / std[c]` computed in float32 exactly like
    /// `leukedge.config.normalize_uint8`.
    pub lut: [[f32; 256]; 3],
    /// `lut` rounded to float16 (built once, not per item).
    pub lut16: [[f16; 256]; 3],
}

impl OutputTables {
    pub fn new(cfg: &Config) -> OutputTables {
        let lut = std::array::from_fn(|c| std::array::from_fn(|v| ((v as f32) / 255.0f32 - cfg.mean[c]) / cfg.std[c]));
        let lut16 = std::array::from_fn(|c| std::array::from_fn(|v| f16::from_f32(lut[c][v])));
        OutputTables {
            layout: cfg.layout,
            s2: (cfg.size as usize).pow(2),
            mean: cfg.mean,
            std: cfg.std,
            lut,
            lut16,
        }
    }
}

/// An element type of the batch output.
pub trait OutElem: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    /// The config dtype this element type serves.
    const DTYPE: DType;
    const ZERO: Self;
    /// Write the packed RGB image `rgb` (`3 * size * size` bytes) into one item's slice `out`.
    fn write(t: &OutputTables, rgb: &[u8], out: &mut [Self]);
}

impl OutElem for u8 {
    const DTYPE: DType = DType::Uint8;
    const ZERO: u8 = 0;
    fn write(t: &OutputTables, rgb: &[u8], out: &mut [u8]) {
        match t.layout {
            Layout::Nhwc => out.copy_from_slice(rgb),
            Layout::Nchw => planar(rgb, out, t.s2, |_, v| v),
        }
    }
}

impl OutElem for f32 {
    const DTYPE: DType = DType::Float32;
    const ZERO: f32 = 0.0;
    fn write(t: &OutputTables, rgb: &[u8], out: &mut [f32]) {
        match t.layout {
            Layout::Nhwc => interleaved(rgb, out, |c, v| t.lut[c][v as usize]),
            Layout::Nchw => {
                #[cfg(target_arch = "x86_64")]
                if crate::cpu::avx2() {
                    // SAFETY: the CPU supports AVX2 (crate::cpu::avx2); no F16C instruction is
                    // reached for float32 planes.
                    unsafe { planar_normalized_avx2(rgb, t, PlanarOut::F32(out)) };
                    return;
                }
                planar(rgb, out, t.s2, |c, v| t.lut[c][v as usize])
            }
        }
    }
}

impl OutElem for f16 {
    const DTYPE: DType = DType::Float16;
    const ZERO: f16 = f16::ZERO;
    fn write(t: &OutputTables, rgb: &[u8], out: &mut [f16]) {
        match t.layout {
            Layout::Nhwc => interleaved(rgb, out, |c, v| t.lut16[c][v as usize]),
            Layout::Nchw => {
                #[cfg(target_arch = "x86_64")]
                if crate::cpu::avx2_f16c() {
                    // SAFETY: the CPU supports AVX2 and F16C.
                    unsafe { planar_normalized_avx2(rgb, t, PlanarOut::F16(out)) };
                    return;
                }
                planar(rgb, out, t.s2, |c, v| t.lut16[c][v as usize])
            }
        }
    }
}

/// Interleaved RGB -> interleaved HWC with a per-channel mapping.
#[inline]
fn interleaved<T: Copy>(rgb: &[u8], out: &mut [T], f: impl Fn(usize, u8) -> T) {
    for (d, s) in out.chunks_exact_mut(3).zip(rgb.chunks_exact(3)) {
        for c in 0..3 {
            d[c] = f(c, s[c]);
        }
    }
}

/// Interleaved RGB -> planar CHW with a per-channel mapping.
#[inline]
fn planar<T: Copy>(rgb: &[u8], out: &mut [T], s2: usize, f: impl Fn(usize, u8) -> T) {
    let (r, rest) = out.split_at_mut(s2);
    let (g, b) = rest.split_at_mut(s2);
    let b = &mut b[..s2];
    for (((p, r), g), b) in rgb
        .chunks_exact(3)
        .zip(r.iter_mut())
        .zip(g.iter_mut())
        .zip(b.iter_mut())
    {
        *r = f(0, p[0]);
        *g = f(1, p[1]);
        *b = f(2, p[2]);
    }
}

/// Byte-shuffle masks that gather channel `c` of 8 packed RGB pixels (24 bytes) into bytes 0..8:
/// `[0][c]` picks from the first 16 bytes, `[1][c]` from bytes 16..24 (`-1`: a zero byte); the
/// two shuffles OR-ed give the 8 values. Used by the x86 SIMD path; tested on every target.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn rgb8_channel_masks() -> [[[i8; 16]; 3]; 2] {
    let pick = |c: usize, k: usize, from: usize| -> i8 {
        let b = c + 3 * k;
        if k < 8 && (from..from + 16).contains(&b) && b < 24 {
            (b - from) as i8
        } else {
            -1
        }
    };
    [0, 16].map(|from| std::array::from_fn(|c| std::array::from_fn(|k| pick(c, k, from))))
}

/// Destination planes of [`planar_normalized_avx2`].
#[cfg(target_arch = "x86_64")]
enum PlanarOut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

/// Interleaved RGB -> planar CHW `(v/255 - mean[c]) / std[c]`, 8 pixels per step: the same
/// float32 operations as the lookup tables (IEEE division and subtraction are exact-rounded in
/// SIMD too), and for float16 the hardware conversion (round to nearest even, as `f16::from_f32`),
/// so the output is bit-identical to the table path (tested for all values); the tail uses the
/// tables.
///
/// # Safety
/// AVX2 must be available, and F16C for [`PlanarOut::F16`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn planar_normalized_avx2(rgb: &[u8], t: &OutputTables, out: PlanarOut<'_>) {
    use std::arch::x86_64::*;
    let s2 = t.s2;
    assert!(rgb.len() >= 3 * s2);
    let n8 = s2 / 8 * 8;
    let [lo, hi] = rgb8_channel_masks();
    let load = |m: &[i8; 16]| unsafe { _mm_loadu_si128(m.as_ptr() as *const __m128i) };
    let (ml, mh) = (lo.each_ref().map(load), hi.each_ref().map(load));
    let d255 = _mm256_set1_ps(255.0);
    let mv = t.mean.map(|m| _mm256_set1_ps(m));
    let sv = t.std.map(|s| _mm256_set1_ps(s));
    let p = rgb.as_ptr();
    let (f32_out, f16_out): (Option<[*mut f32; 3]>, Option<[*mut u16; 3]>) = match out {
        PlanarOut::F32(o) => {
            assert!(o.len() >= 3 * s2);
            let b = o.as_mut_ptr();
            // SAFETY: planes start inside `o` (length checked).
            (Some(unsafe { [b, b.add(s2), b.add(2 * s2)] }), None)
        }
        PlanarOut::F16(o) => {
            assert!(o.len() >= 3 * s2);
            let b = o.as_mut_ptr() as *mut u16;
            // SAFETY: as above; f16 is a transparent u16.
            (None, Some(unsafe { [b, b.add(s2), b.add(2 * s2)] }))
        }
    };
    for j in (0..n8).step_by(8) {
        // SAFETY: pixels j..j+8 are inside `rgb` (24 bytes at 3j, j + 8 <= s2), stores of 8
        // values at plane offset j < s2 - 7.
        unsafe {
            let a = _mm_loadu_si128(p.add(3 * j) as *const __m128i);
            let b = _mm_loadl_epi64(p.add(3 * j + 16) as *const __m128i);
            for c in 0..3 {
                let bytes = _mm_or_si128(_mm_shuffle_epi8(a, ml[c]), _mm_shuffle_epi8(b, mh[c]));
                let x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                let y = _mm256_div_ps(_mm256_sub_ps(_mm256_div_ps(x, d255), mv[c]), sv[c]);
                if let Some(o) = f32_out {
                    _mm256_storeu_ps(o[c].add(j), y);
                } else if let Some(o) = f16_out {
                    _mm_storeu_si128(o[c].add(j) as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y));
                }
            }
        }
    }
    for j in n8..s2 {
        for c in 0..3 {
            let v = rgb[3 * j + c] as usize;
            // SAFETY: j < s2, inside plane c.
            unsafe {
                if let Some(o) = f32_out {
                    o[c].add(j).write(t.lut[c][v]);
                } else if let Some(o) = f16_out {
                    o[c].add(j).write(t.lut16[c][v].to_bits());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(json: &str) -> OutputTables {
        OutputTables::new(&Config::from_json(json).unwrap())
    }

    #[test]
    fn float_lut_matches_formula() {
        let t = tables("{}");
        // (200/255 - 0.485) / 0.229 in float32
        let v = ((200.0f32 / 255.0f32) - 0.485f32) / 0.229f32;
        assert_eq!(t.lut[0][200], v);
        for c in 0..3 {
            for v in 0..256 {
                assert_eq!(t.lut16[c][v], f16::from_f32(t.lut[c][v]));
            }
        }
    }

    #[test]
    fn channel_masks_gather_each_channel_of_8_pixels() {
        let bytes: Vec<u8> = (100..124).collect();
        let shuffle = |src: &[u8], m: &[i8; 16]| -> Vec<u8> {
            m.iter().map(|&i| if i < 0 { 0 } else { src[i as usize] }).collect()
        };
        let [lo, hi] = rgb8_channel_masks();
        let mut second = bytes[16..24].to_vec();
        second.resize(16, 0xEE); // the upper half of the 64-bit load is never picked
        for c in 0..3 {
            let got: Vec<u8> = shuffle(&bytes[..16], &lo[c])
                .iter()
                .zip(shuffle(&second, &hi[c]))
                .map(|(a, b)| a | b)
                .collect();
            let want: Vec<u8> = (0..8).map(|k| bytes[c + 3 * k]).chain([0; 8]).collect();
            assert_eq!(got, want, "channel {c}");
        }
    }

    /// Checks `write` of `T` against the tables for every byte value of every channel, comparing
    /// `bits` (float16 and float32 by their bit patterns).
    fn check_every_value<T: OutElem>(json: &str, want: impl Fn(&OutputTables, usize, u8) -> T, bits: fn(T) -> u32) {
        let t = tables(json);
        let s2 = t.s2;
        let rgb: Vec<u8> = (0..3 * s2).map(|i| (i / 3 * 5 + 91 * (i % 3)) as u8).collect();
        let mut o = vec![T::ZERO; 3 * s2];
        T::write(&t, &rgb, &mut o);
        let mut seen = [[false; 256]; 3];
        for j in 0..s2 {
            for c in 0..3 {
                let v = rgb[3 * j + c];
                seen[c][v as usize] = true;
                let at = match t.layout {
                    Layout::Nchw => c * s2 + j,
                    Layout::Nhwc => 3 * j + c,
                };
                assert_eq!(bits(o[at]), bits(want(&t, c, v)), "{json} {j} {c}");
            }
        }
        assert!(seen.iter().all(|s| s.iter().all(|&b| b)), "test data covers every value");
    }

    #[test]
    fn every_dtype_and_layout_equals_the_tables_for_every_value() {
        // odd size (scalar tail of the SIMD path), several means/stds; f16 compared by bits
        let extra = [
            "",
            r#", "mean": [0.1, 0.9, 0.5], "std": [0.01, 3.0, 0.3]"#,
            r#", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]"#,
        ];
        for layout in ["nchw", "nhwc"] {
            for e in extra {
                let json = |dtype: &str| format!(r#"{{"size": 37, "dtype": "{dtype}", "layout": "{layout}"{e}}}"#);
                check_every_value::<f32>(&json("float32"), |t, c, v| t.lut[c][v as usize], f32::to_bits);
                check_every_value::<f16>(&json("float16"), |t, c, v| t.lut16[c][v as usize], |x| x.to_bits().into());
                check_every_value::<u8>(&json("uint8"), |_, _, v| v, u32::from);
            }
        }
    }
}
