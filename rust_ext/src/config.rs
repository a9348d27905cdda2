//! The preprocessing configuration as consumed from `PreprocessConfig.to_native_json()`.
//!
//! Every field has the same default as the Python dataclass, so `{}` is a valid config.
//! Unknown fields are refused (a setting the core does not understand must not be silently
//! ignored: it could change pixels on the Python side only).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StainMethod {
    Macenko,
    Reinhard,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    Bbox,
    None,
    /// A fixed `crop_window` x `crop_window` window of native pixels centred on the cell: the
    /// cell keeps its size (relative to the frame) and shape after resizing.
    Window,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SquareMode {
    Pad,
    Crop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    Bilinear,
    Lanczos3,
    Box,
    Nearest,
    Catmullrom,
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter> {
        match s {
            "bilinear" => Ok(Filter::Bilinear),
            "lanczos3" | "lanczos" => Ok(Filter::Lanczos3),
            "box" | "area" => Ok(Filter::Box),
            "nearest" => Ok(Filter::Nearest),
            "catmullrom" | "bicubic" => Ok(Filter::Catmullrom),
            other => Err(Error::Input(format!(
                "filter={other:?} is not one of bilinear, lanczos3, box, nearest, catmullrom"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Nchw,
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Float32,
    Float16,
    Uint8,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Float16 => "float16",
            DType::Uint8 => "uint8",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StainConfig {
    pub method: StainMethod,
    pub io: f64,
    pub alpha: f64,
    pub beta: f64,
    pub black_threshold: u8,
    pub white_threshold: Option<u8>,
    pub min_foreground: usize,
    /// Fit the per-image stain model on at most this many foreground pixels (a fixed, evenly
    /// strided subsample, in image order); the transform is still applied to every foreground
    /// pixel. `None` = every foreground pixel (torchstain's arithmetic, the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fit_pixels: Option<usize>,
    /// Apply the fitted stain transform after resizing, to the non-black pixels of the output
    /// (about 4x fewer at 224 px from 450 px), instead of to every foreground pixel before
    /// resizing. The fit is unchanged; the result differs from torchstain's order (transform,
    /// then resize) because the transform is not linear (see the Python `StainConfig`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub apply_at_output: bool,
    /// Fitted parameters (as produced by `fit_stain`); `None` = built-in reference.
    pub params: Option<serde_json::Value>,
}

impl Default for StainConfig {
    fn default() -> Self {
        StainConfig {
            method: StainMethod::Macenko,
            io: 240.0,
            alpha: 1.0,
            beta: 0.15,
            black_threshold: 10,
            white_threshold: None,
            min_foreground: 500,
            fit_pixels: None,
            apply_at_output: false,
            params: None,
        }
    }
}

/// The cell quality gate (see `gate.rs`): which decoded frames are whole segmented cells. It never
/// changes pixels (not in the pixel hash) but travels with the model's preprocessing. Foreground is
/// the stain mask's (`stain.black_threshold` / `stain.white_threshold`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    pub enabled: bool,
    /// Fewest foreground pixels of a cell.
    pub min_pixels: u64,
    /// Foreground share of the frame: at least `min_area`, at most `max_area`.
    pub min_area: f64,
    pub max_area: f64,
    /// Largest share of the frame's border pixels that may be foreground.
    pub max_border: f64,
}

/// Default bounds, chosen from the 3,527 real cells of C-NMC fold 0 and the 52 sample cells
/// (450 x 450; `benchmarks/gate_bounds.py`): their foreground covers 4.8 % to 25.0 % of the frame
/// (at least 9,711 pixels); 9 of them (0.26 %) touch the border, with at most 64 border pixels
/// (3.6 % of the border). Each bound sits at least twice as far out: a real cell is not rejected, while
/// black, white, grey and noise frames, 1x1 images, specks of debris and half cells cut by the edge
/// are. `min_pixels` is small on purpose (images of any size): it only catches "nothing there".
pub const GATE_DEFAULT: GateConfig = GateConfig {
    enabled: true,
    min_pixels: 100,
    min_area: 0.015,
    max_area: 0.5,
    max_border: 0.08,
};

impl Default for GateConfig {
    fn default() -> Self {
        GATE_DEFAULT
    }
}

impl GateConfig {
    pub fn is_default(&self) -> bool {
        *self == GATE_DEFAULT
    }

    pub fn validate(&self) -> Result<()> {
        let share = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        if !(share(self.min_area) && share(self.max_area) && share(self.max_border)) || self.min_area > self.max_area {
            return Err(Error::Config(format!(
                "gate: min_area={}, max_area={}, max_border={} must be shares in [0, 1] with min_area <= max_area",
                self.min_area, self.max_area, self.max_border
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub max_pixels: u64,
    /// Left out of the serialised config while at its defaults (like `stain.fit_pixels`).
    #[serde(skip_serializing_if = "GateConfig::is_default")]
    pub gate: GateConfig,
    pub stain: StainConfig,
    pub crop: CropMode,
    pub crop_margin: u32,
    /// Side of the native-scale window of `crop = "window"`, in source pixels.
    pub crop_window: u32,
    pub square: SquareMode,
    pub size: u32,
    pub filter: Filter,
    pub layout: Layout,
    pub dtype: DType,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_pixels: 64_000_000,
            gate: GateConfig::default(),
            stain: StainConfig::default(),
            crop: CropMode::Bbox,
            crop_margin: 8,
            crop_window: 384,
            square: SquareMode::Pad,
            size: 224,
            filter: Filter::Bilinear,
            layout: Layout::Nchw,
            dtype: DType::Float32,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

impl Config {
    /// Parse and validate the JSON produced by `PreprocessConfig.to_native_json()`.
    pub fn from_json(text: &str) -> Result<Config> {
        let cfg: Config = serde_json::from_str(text).map_err(|e| Error::Config(name_the_field(text, e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.max_pixels == 0 {
            return bad("max_pixels must be positive (--max-pixels)".into());
        }
        if !(8..=4096).contains(&self.size) {
            return bad(format!("size={} must be between 8 and 4096 (--size)", self.size));
        }
        if !(8..=4096).contains(&self.crop_window) {
            return bad(format!("crop_window={} must be between 8 and 4096 (--crop-window)", self.crop_window));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || self.mean.iter().any(|m| !m.is_finite()) {
            return bad(format!(
                "mean={:?} / std={:?}: need finite values, std > 0 (--mean / --std)",
                self.mean, self.std
            ));
        }
        self.gate.validate()?;
        self.stain.validate()
    }

    /// Number of output elements per item (3 * size * size).
    pub fn item_len(&self) -> usize {
        3 * self.size as usize * self.size as usize
    }

    /// Output shape for `n` items, following `layout`.
    pub fn output_shape(&self, n: usize) -> [usize; 4] {
        let s = self.size as usize;
        match self.layout {
            Layout::Nchw => [n, 3, s, s],
            Layout::Nhwc => [n, s, s, 3],
        }
    }
}

/// A serde error names the line and column; name the setting instead: the first top-level (or
/// `stain.`) field that fails on its own. Runs on the error path only.
fn name_the_field(text: &str, err: serde_json::Error) -> String {
    let Ok(serde_json::Value::Object(top)) = serde_json::from_str::<serde_json::Value>(text) else {
        return err.to_string();
    };
    let fails = |obj: serde_json::Value| serde_json::from_value::<Config>(obj).err();
    for (k, v) in &top {
        match (k.as_str(), v) {
            (sect @ ("stain" | "gate"), serde_json::Value::Object(st)) => {
                for (sk, sv) in st {
                    if let Some(e) = fails(serde_json::json!({ sect: { sk.clone(): sv.clone() } })) {
                        return format!("{sect}.{sk}: {e}");
                    }
                }
            }
            _ => {
                if let Some(e) = fails(serde_json::json!({ k.clone(): v.clone() })) {
                    return format!("{k}: {e}");
                }
            }
        }
    }
    err.to_string()
}

/// Smallest accepted `stain.fit_pixels`.
pub const MIN_FIT_PIXELS: usize = 256;

impl StainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(self.io.is_finite() && self.io > 0.0) {
            return bad(format!("stain.io={} must be a finite number > 0 (--stain-io)", self.io));
        }
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad(format!("stain.beta={} must be a finite number > 0 (--stain-beta)", self.beta));
        }
        if !(self.alpha > 0.0 && self.alpha < 50.0) {
            return bad(format!("stain.alpha={} must be in (0, 50) (--stain-alpha)", self.alpha));
        }
        if let Some(n) = self.fit_pixels {
            if n < MIN_FIT_PIXELS {
                return bad(format!(
                    "stain.fit_pixels={n} is too few for a stable fit; use at least {MIN_FIT_PIXELS} (or null = all)"
                ));
            }
        }
        if self.black_threshold == 255 {
            return bad("stain.black_threshold=255 would make every pixel background; it must be in [0, 255) (--black-threshold)".into());
        }
        if self.white_threshold == Some(0) {
            return bad("stain.white_threshold=0 must be in (0, 255] (--white-threshold)".into());
        }
        if let Some(w) = self.white_threshold {
            if w <= self.black_threshold {
                return bad(format!(
                    "stain.white_threshold={w} must be above stain.black_threshold={} (--white-threshold / \
                     --black-threshold): otherwise every grey level counts as background and the images come out black",
                    self.black_threshold
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_json_gives_defaults() {
        let c = Config::from_json("{}").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.output_shape(2), [2, 3, 224, 224]);
    }

    #[test]
    fn parses_python_json() {
        let j = r#"{"crop":"none","crop_margin":8,"dtype":"float16","filter":"lanczos3","layout":"nhwc","max_pixels":1000,"mean":[0.5,0.5,0.5],"size":64,"square":"crop","std":[0.25,0.25,0.25],"stain":{"alpha":1.0,"beta":0.15,"black_threshold":10,"io":240.0,"method":"reinhard","min_foreground":500,"params":null,"white_threshold":230}}"#;
        let c = Config::from_json(j).unwrap();
        assert_eq!(c.crop, CropMode::None);
        assert_eq!(c.dtype, DType::Float16);
        assert_eq!(c.filter, Filter::Lanczos3);
        assert_eq!(c.stain.method, StainMethod::Reinhard);
        assert_eq!(c.stain.white_threshold, Some(230));
        assert_eq!(c.output_shape(1), [1, 64, 64, 3]);
    }

    #[test]
    fn refuses_unknown_and_bad_values() {
        assert!(matches!(Config::from_json(r#"{"sise":3}"#), Err(Error::Config(_))));
        assert!(matches!(Config::from_json(r#"{"size":3}"#), Err(Error::Config(_))));
        assert!(matches!(
            Config::from_json(r#"{"filter":"cubic"}"#),
            Err(Error::Config(_))
        ));
        assert!(matches!(Config::from_json(r#"{"std":[1,0,1]}"#), Err(Error::Config(_))));
        assert!(matches!(
            Config::from_json(r#"{"stain":{"alpha":60}}"#),
            Err(Error::Config(_))
        ));
        assert!(matches!(Config::from_json("not json"), Err(Error::Config(_))));
        let e = Config::from_json(r#"{"size":64,"crop":"round"}"#).unwrap_err().to_string();
        assert!(e.contains("crop: unknown variant"), "{e}");
        let e = Config::from_json(r#"{"stain":{"alpha":1,"black_threshold":300}}"#).unwrap_err().to_string();
        assert!(e.contains("stain.black_threshold:"), "{e}");
        assert!(matches!(
            Config::from_json(r#"{"stain":{"black_threshold":100,"white_threshold":50}}"#),
            Err(Error::Config(_))
        ));
        assert!(Config::from_json(r#"{"stain":{"black_threshold":10,"white_threshold":230}}"#).is_ok());
    }

    #[test]
    fn gate_settings_parse_validate_and_stay_out_of_default_json() {
        let c = Config::from_json(r#"{"gate":{"enabled":false,"max_area":0.9}}"#).unwrap();
        assert!(!c.gate.enabled);
        assert_eq!(c.gate.max_area, 0.9);
        assert_eq!(c.gate.min_pixels, GATE_DEFAULT.min_pixels);
        assert!(serde_json::to_string(&c).unwrap().contains("\"gate\""));
        assert!(!serde_json::to_string(&Config::default()).unwrap().contains("gate"));
        let e = Config::from_json(r#"{"gate":{"min_area":0.5,"max_area":0.1}}"#).unwrap_err().to_string();
        assert!(e.contains("min_area"), "{e}");
        let e = Config::from_json(r#"{"gate":{"max_border":"x"}}"#).unwrap_err().to_string();
        assert!(e.contains("gate.max_border"), "{e}");
        assert!(Config::from_json(r#"{"gate":{"colour":1}}"#).is_err());
    }

    #[test]
    fn filter_parse() {
        assert_eq!(Filter::parse("box").unwrap(), Filter::Box);
        assert!(Filter::parse("cubic").is_err());
    }
}
