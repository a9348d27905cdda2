//! The cell quality gate: is a decoded frame one whole segmented cell on a black background?
//!
//! Run on every image after decoding, before any pixel work, from the foreground bounding box that
//! the crop needs anyway: the foreground pixels are counted inside the box only (everything outside
//! it is background by definition) and the border pixels only along the edges the box touches. So a
//! C-NMC cell (a box of about 200 x 200 in 450 x 450) costs one pass over 40,000 pixels.
//!
//! Three rejections, each with a reason a user can read (the item is *rejected*, not an error: the
//! file decoded fine, it is just not something the model may be asked about):
//! * no cell: fewer than `min_pixels` foreground pixels (black frame, a speck of debris, a 1x1 image);
//! * foreground area out of range: less than `min_area` or more than `max_area` of the frame (an empty
//!   or debris field; a white, grey, noisy or unsegmented frame is almost all foreground);
//! * the cell touches the frame border: more than `max_border` of the frame's border pixels are
//!   foreground (a cell cut by the edge of the field).
//!
//! The gate never changes pixels, so it is not part of the preprocessing's pixel hash.

use crate::config::GateConfig;
use crate::stain::MaskRule;

/// What the gate measured on one frame (also used to choose the default bounds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateStats {
    pub pixels: u64,
    pub foreground: u64,
    pub border: u64,
    pub border_foreground: u64,
}

impl GateStats {
    pub fn area(&self) -> f64 {
        if self.pixels == 0 {
            0.0
        } else {
            self.foreground as f64 / self.pixels as f64
        }
    }

    pub fn border_share(&self) -> f64 {
        if self.border == 0 {
            0.0
        } else {
            self.border_foreground as f64 / self.border as f64
        }
    }
}

/// Measure the foreground of a packed RGB8 frame whose foreground bounding box is `bbox`
/// (end-exclusive `(x0, y0, x1, y1)`, `None` = no foreground).
pub fn measure(
    rgb: &[u8],
    width: usize,
    height: usize,
    bbox: Option<(usize, usize, usize, usize)>,
    rule: MaskRule,
) -> GateStats {
    let pixels = (width * height) as u64;
    // perimeter pixels, each counted once (a 1-pixel-wide frame is all border)
    let border = if width <= 2 || height <= 2 {
        pixels
    } else {
        (2 * width + 2 * (height - 2)) as u64
    };
    let Some((x0, y0, x1, y1)) = bbox else {
        return GateStats {
            pixels,
            foreground: 0,
            border,
            border_foreground: 0,
        };
    };
    let fg = |x: usize, y: usize| -> bool {
        let i = (y * width + x) * 3;
        !rule.is_background(&rgb[i..i + 3])
    };
    let mut foreground = 0u64;
    for y in y0..y1 {
        let row = &rgb[(y * width + x0) * 3..(y * width + x1) * 3];
        foreground += row.chunks_exact(3).filter(|p| !rule.is_background(p)).count() as u64;
    }
    let mut border_foreground = 0u64;
    if width <= 2 || height <= 2 {
        border_foreground = foreground;
    } else {
        // top and bottom rows (whole width), then the left and right columns between them
        if y0 == 0 {
            border_foreground += (x0..x1).filter(|&x| fg(x, 0)).count() as u64;
        }
        if y1 == height {
            border_foreground += (x0..x1).filter(|&x| fg(x, height - 1)).count() as u64;
        }
        let (ya, yb) = (y0.max(1), y1.min(height - 1));
        if x0 == 0 {
            border_foreground += (ya..yb).filter(|&y| fg(0, y)).count() as u64;
        }
        if x1 == width {
            border_foreground += (ya..yb).filter(|&y| fg(width - 1, y)).count() as u64;
        }
    }
    GateStats {
        pixels,
        foreground,
        border,
        border_foreground,
    }
}

/// The reason to reject a frame with these statistics, or `None` when it passes.
pub fn verdict(s: &GateStats, g: &GateConfig) -> Option<String> {
    if !g.enabled {
        return None;
    }
    let pct = |v: f64| format!("{:.1} %", 100.0 * v);
    if s.foreground < g.min_pixels {
        return Some(format!(
            "no cell found: {} foreground pixel(s), fewer than {} (an empty field, debris or a tiny image)",
            s.foreground, g.min_pixels
        ));
    }
    let area = s.area();
    if area < g.min_area || area > g.max_area {
        let what = if area > g.max_area {
            "not a segmented cell on black (a blank, grey, noisy or unsegmented frame?)"
        } else {
            "too little foreground for a cell (debris?)"
        };
        return Some(format!(
            "foreground area {} of the frame is outside [{}, {}]: {what}",
            pct(area),
            pct(g.min_area),
            pct(g.max_area)
        ));
    }
    if s.border_share() > g.max_border {
        return Some(format!(
            "the cell touches the frame border ({} of the border pixels are foreground, at most {} allowed): \
             a cell cut by the edge of the field",
            pct(s.border_share()),
            pct(g.max_border)
        ));
    }
    None
}

/// Measure and judge one frame.
pub fn check(
    rgb: &[u8],
    width: usize,
    height: usize,
    bbox: Option<(usize, usize, usize, usize)>,
    rule: MaskRule,
    g: &GateConfig,
) -> Option<String> {
    if !g.enabled {
        return None;
    }
    verdict(&measure(rgb, width, height, bbox, rule), g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stain::foreground_bbox;
    use crate::stain::tests::synthetic_cell;

    const RULE: MaskRule = MaskRule {
        black_threshold: 10,
        white_threshold: None,
    };

    fn run(rgb: &[u8], w: usize, h: usize) -> Option<String> {
        let bbox = foreground_bbox(rgb, w, h, RULE);
        check(rgb, w, h, bbox, RULE, &GateConfig::default())
    }

    fn stats(rgb: &[u8], w: usize, h: usize) -> GateStats {
        measure(rgb, w, h, foreground_bbox(rgb, w, h, RULE), RULE)
    }

    /// A disc of colour on black, centre (cx, cy), radius r.
    fn disc(w: usize, h: usize, cx: f64, cy: f64, r: f64) -> Vec<u8> {
        let mut v = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                if (x as f64 + 0.5 - cx).hypot(y as f64 + 0.5 - cy) < r {
                    v[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&[150, 90, 190]);
                }
            }
        }
        v
    }

    #[test]
    fn measure_counts_exactly() {
        let (w, h) = (40, 30);
        let img = disc(w, h, 20.0, 15.0, 8.0);
        let s = stats(&img, w, h);
        let want = img.chunks_exact(3).filter(|p| p[0] > 10).count() as u64;
        assert_eq!(s.foreground, want);
        assert_eq!(s.border_foreground, 0);
        assert_eq!(s.border, 2 * 40 + 2 * 28);
        // a full frame: every border pixel counted once
        let full = vec![200u8; w * h * 3];
        let s = stats(&full, w, h);
        assert_eq!((s.foreground, s.border_foreground), (1200, 136));
        assert_eq!(s.border_share(), 1.0);
        // no foreground at all
        let s = stats(&vec![0u8; w * h * 3], w, h);
        assert_eq!((s.foreground, s.area()), (0, 0.0));
    }

    #[test]
    fn a_centred_cell_passes() {
        let (w, h) = (450, 450);
        // C-NMC cells cover about 9 to 25 % of the frame
        for r in [80.0, 110.0, 130.0] {
            assert_eq!(run(&disc(w, h, 225.0, 225.0, r), w, h), None, "radius {r}");
        }
        let c = synthetic_cell(450, 450, 3);
        assert_eq!(run(&c, 450, 450), None);
    }

    #[test]
    fn junk_is_rejected_with_a_reason() {
        let (w, h) = (450, 450);
        let black = vec![0u8; w * h * 3];
        assert!(run(&black, w, h).unwrap().starts_with("no cell found"));
        let white = vec![255u8; w * h * 3];
        assert!(run(&white, w, h).unwrap().contains("outside"), "white");
        let grey = vec![128u8; w * h * 3];
        assert!(run(&grey, w, h).unwrap().contains("blank, grey, noisy"), "grey");
        let mut x = 12345u64;
        let noise: Vec<u8> = (0..w * h * 3)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(run(&noise, w, h).is_some(), "noise");
        assert!(run(&[200, 100, 150], 1, 1).unwrap().starts_with("no cell found"), "1x1");
        // a speck of debris (radius 5: 78 pixels) in an empty field
        let debris = disc(w, h, 225.0, 225.0, 5.0);
        assert!(run(&debris, w, h).unwrap().starts_with("no cell found"), "debris");
        // a small clump (radius 30: 0.6 % of the frame)
        let clump = disc(w, h, 225.0, 225.0, 30.0);
        assert!(run(&clump, w, h).unwrap().contains("too little foreground"), "clump");
        // half a cell cut by the left edge
        let half = disc(w, h, 0.0, 225.0, 110.0);
        assert!(run(&half, w, h).unwrap().contains("touches the frame border"), "half");
        // ... by a corner
        let corner = disc(w, h, 450.0, 450.0, 150.0);
        assert!(run(&corner, w, h).unwrap().contains("touches the frame border"), "corner");
    }

    #[test]
    fn disabled_gate_passes_everything() {
        let g = GateConfig {
            enabled: false,
            ..GateConfig::default()
        };
        assert_eq!(check(&[0, 0, 0], 1, 1, None, RULE, &g), None);
    }
}
