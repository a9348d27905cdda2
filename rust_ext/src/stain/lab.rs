//! CIE L*a*b* conversion (sRGB, D65), with torchstain's / skimage's formulas.

use crate::numeric::linalg::inv3;

const RGB2XYZ: [[f64; 3]; 3] = [
    [0.412453, 0.357580, 0.180423],
    [0.212671, 0.715160, 0.072169],
    [0.019334, 0.119193, 0.950227],
];
const WHITE: [f64; 3] = [0.95047, 1.0, 1.08883];

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

