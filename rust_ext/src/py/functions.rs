//! The module's `#[pyfunction]`s: argument conversion (see [`super::convert`]), then the pure-Rust
//! work with the GIL released, errors mapped by [`super::to_py`].

use std::path::PathBuf;

use numpy::ndarray::{Array2, Array3};
use numpy::{IntoPyArray, PyArray, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::convert::{image_list, parse_config, pixels_from, rgb_to_py, type_name};
use super::pipeline::run_items;
use super::{to_py, ConfigError, StainError};
use crate::batch::Pipeline;
use crate::config::{Filter, StainConfig};
use crate::decode::{decode_bytes, decode_path, Rgb8, DEFAULT_MAX_PIXELS};
use crate::stain::{MaskRule, StainParams};
use crate::{batch, cpu, decode, resize, stain};

// The text signatures spell the default out for Python's inspect / stubtest.
const _: () = assert!(DEFAULT_MAX_PIXELS == 64_000_000);

/// decode(source, max_pixels=64_000_000) -> ndarray[uint8] (H, W, 3)
#[pyfunction(name = "decode")]
#[pyo3(signature = (source, max_pixels = DEFAULT_MAX_PIXELS), text_signature = "(source, max_pixels=64000000)")]
pub fn py_decode<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    max_pixels: u64,
) -> PyResult<Bound<'py, PyArray<u8, numpy::Ix3>>> {
    if max_pixels == 0 {
        return Err(PyValueError::new_err("max_pixels must be positive"));
    }
    let img = if let Ok(b) = source.cast::<PyBytes>() {
        let bytes = b.as_bytes();
        py.detach(|| decode_bytes(bytes, "<bytes>", max_pixels))
    } else {
        let path: PathBuf = source.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "decode: expected a path (str / os.PathLike) or bytes, got {}",
                type_name(source)
            ))
        })?;
        py.detach(|| decode_path(&path, max_pixels))
    }
    .map_err(to_py)?;
    rgb_to_py(py, img)
}

/// fit_stain(images, config_json) -> str (JSON parameters)
#[pyfunction]
pub fn fit_stain(py: Python<'_>, images: &Bound<'_, PyAny>, config_json: &str) -> PyResult<String> {
    let cfg = parse_config(config_json)?;
    let pix = image_list(images)?;
    if pix.is_empty() {
        return Err(StainError::new_err("fit_stain: no reference images given"));
    }
    let rgbs: Vec<Rgb8> = pix
        .iter()
        .map(|p| p.to_rgb())
        .collect::<Result<_, _>>()
        .map_err(to_py)?;
    let stain: StainConfig = cfg.stain.clone();
    let n_images = rgbs.len();
    let (params, n_px) = py
        .detach(|| {
            let refs: Vec<&[u8]> = rgbs.iter().map(|r| r.data.as_slice()).collect();
            stain::fit_images(&refs, &stain)
        })
        .map_err(to_py)?;
    Ok(params.to_json(Some(n_images), Some(n_px)))
}

/// normalize_stain(image, config_json) -> (ndarray uint8 (H, W, 3), fallback: bool)
#[pyfunction]
pub fn normalize_stain<'py>(
    py: Python<'py>,
    image: &Bound<'py, PyAny>,
    config_json: &str,
) -> PyResult<(Bound<'py, PyArray<u8, numpy::Ix3>>, bool)> {
    let cfg = parse_config(config_json)?;
    let params = StainParams::from_config(&cfg.stain).map_err(to_py)?;
    let mut img = pixels_from(image, "image", false)?.to_rgb().map_err(to_py)?;
    let outcome = py.detach(|| stain::normalize_in_place(&mut img.data, &cfg.stain, &params));
    Ok((rgb_to_py(py, img)?, outcome.fallback))
}

/// reference_params(method) -> str: the built-in reference parameters as JSON.
#[pyfunction]
pub fn reference_params(method: &str) -> PyResult<String> {
    let cfg: StainConfig = serde_json::from_value(serde_json::json!({ "method": method }))
        .map_err(|_| ConfigError::new_err(format!("method={method:?} is not one of macenko, reinhard, none")))?;
    Ok(StainParams::from_config(&cfg).map_err(to_py)?.to_json(None, None))
}

/// resize(image, width, height, filter="bilinear") -> ndarray uint8 (same channels)
#[pyfunction(name = "resize")]
#[pyo3(signature = (image, width, height, filter = "bilinear"))]
pub fn py_resize<'py>(
    py: Python<'py>,
    image: &Bound<'py, PyAny>,
    width: usize,
    height: usize,
    filter: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let f = Filter::parse(filter).map_err(to_py)?;
    if width == 0 || height == 0 || width > 65_535 || height > 65_535 {
        return Err(PyValueError::new_err(format!(
            "resize: target size {width}x{height} must be between 1 and 65535"
        )));
    }
    if (width as u64) * (height as u64) > DEFAULT_MAX_PIXELS {
        return Err(PyValueError::new_err(format!(
            "resize: target size {width}x{height} exceeds {DEFAULT_MAX_PIXELS} pixels"
        )));
    }
    let two_d = image.cast::<PyUntypedArray>().map(|a| a.ndim() == 2).unwrap_or(false);
    let p = pixels_from(image, "image", true)?;
    let (w, h, c) = (p.width, p.height, p.channels);
    let data = p.data();
    let out = py
        .detach(|| resize::resize_image(data, w, h, c, width, height, f))
        .map_err(to_py)?;
    if two_d {
        Ok(Array2::from_shape_vec((height, width), out)
            .expect("sized")
            .into_pyarray(py)
            .into_any())
    } else {
        Ok(Array3::from_shape_vec((height, width, c), out)
            .expect("sized")
            .into_pyarray(py)
            .into_any())
    }
}

fn mask_rule(black_threshold: u8, white_threshold: Option<u8>) -> MaskRule {
    MaskRule {
        black_threshold,
        white_threshold,
    }
}

/// foreground_mask(image, black_threshold=10, white_threshold=None) -> ndarray bool (H, W)
#[pyfunction]
#[pyo3(signature = (image, black_threshold = 10, white_threshold = None))]
pub fn foreground_mask<'py>(
    py: Python<'py>,
    image: &Bound<'py, PyAny>,
    black_threshold: u8,
    white_threshold: Option<u8>,
) -> PyResult<Bound<'py, PyArray<bool, numpy::Ix2>>> {
    let img = pixels_from(image, "image", false)?.to_rgb().map_err(to_py)?;
    let m = py.detach(|| stain::foreground_mask(&img.data, mask_rule(black_threshold, white_threshold)));
    Ok(Array2::from_shape_vec((img.height, img.width), m)
        .expect("sized")
        .into_pyarray(py))
}

/// foreground_bbox(image, black_threshold=10, white_threshold=None) -> (x0, y0, x1, y1) | None
#[pyfunction]
#[pyo3(signature = (image, black_threshold = 10, white_threshold = None))]
pub fn foreground_bbox(
    image: &Bound<'_, PyAny>,
    black_threshold: u8,
    white_threshold: Option<u8>,
) -> PyResult<Option<(usize, usize, usize, usize)>> {
    let img = pixels_from(image, "image", false)?.to_rgb().map_err(to_py)?;
    Ok(stain::foreground_bbox(
        &img.data,
        img.width,
        img.height,
        mask_rule(black_threshold, white_threshold),
    ))
}

/// preprocess_batch(items, config_json, out=None, threads=0) -> (ndarray, list[dict])
///
/// One-shot form of `Pipeline(config_json).run(...)` (parses the config on every call).
#[pyfunction]
#[pyo3(signature = (items, config_json, out = None, threads = 0))]
pub fn preprocess_batch<'py>(
    py: Python<'py>,
    items: &Bound<'py, PyAny>,
    config_json: &str,
    out: Option<&Bound<'py, PyAny>>,
    threads: usize,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyList>)> {
    let pipeline = Pipeline::from_json(config_json).map_err(to_py)?;
    run_items(py, &pipeline, items, out, threads)
}

/// Number of threads used for `threads=0`.
#[pyfunction]
pub fn default_threads() -> usize {
    batch::default_threads()
}

/// max_file_bytes(max_pixels=64_000_000) -> int: the largest file `decode` / `preprocess_batch`
/// read for this pixel limit (bigger files are refused unread).
#[pyfunction(name = "max_file_bytes")]
#[pyo3(signature = (max_pixels = DEFAULT_MAX_PIXELS), text_signature = "(max_pixels=64000000)")]
pub fn py_max_file_bytes(max_pixels: u64) -> u64 {
    decode::max_file_bytes(max_pixels)
}

/// cpu_paths() -> dict[str, bool]: which SIMD paths run in this process (``portable`` is True when
/// ``LEUKEDGE_PORTABLE`` forces the portable fallbacks; read once, at the first image).
#[pyfunction]
pub fn cpu_paths() -> std::collections::BTreeMap<&'static str, bool> {
    cpu::paths().into_iter().collect()
}

