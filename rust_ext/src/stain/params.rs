//! Stain parameters (`HERef`/`maxCRef`, Reinhard mean/std) and their JSON form.

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
