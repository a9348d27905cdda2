//! `leukedge._native`: the Rust core of leukedge.
//!
//! Pure-Rust modules (each with `cargo test`s, no Python needed):
//! [`decode`], [`stain`] (mask, params, macenko, reinhard, lab), [`numeric`] (select, linalg),
//! [`resize`], [`batch`], [`config`], [`error`]; `Pipeline` (the pyclass) is in `py_pipeline`.
//! The `#[pyfunction]`s below are thin wrappers: they convert arguments while holding the GIL,
//! release it (`Python::detach`) for all pixel work, and map [`error::Error`] to Python
//! exceptions. No panic crosses into Python: batch items run under `catch_unwind`, and PyO3
//! turns any other panic into a `PanicException`.

// Numerical kernels index small fixed-size matrices explicitly, and `!(x > 0.0)` is used on
// purpose to treat NaN as failure.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

pub mod batch;
pub mod config;
pub mod cpu;
pub mod decode;
pub mod error;
pub mod gate;
pub mod resize;
pub mod numeric;
pub mod stain;

mod py_pipeline;

/// mimalloc (as pydantic-core uses): every image is a fresh ~600 KB buffer, which glibc's malloc
/// serves with mmap/munmap and page faults per item; that cost serialised the worker threads
/// (1.3x on 2 cores with glibc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use half::f16;
use numpy::ndarray::{Array2, Array3, IxDyn};
use numpy::{
    dtype, Element, IntoPyArray, PyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use crate::batch::{OutBuf, Pipeline, Source};
use crate::config::{Config, DType, Filter, StainConfig};
use crate::decode::{channels_to_rgb, decode_bytes, decode_path, Rgb8, DEFAULT_MAX_PIXELS};
use crate::error::Error;
use crate::stain::{MaskRule, StainParams};

create_exception!(
    leukedge._native,
    DecodeError,
    PyValueError,
    "An image could not be decoded (zero-byte, truncated, not an image, too large, unsupported). The message names the file."
);
create_exception!(
    leukedge._native,
    StainError,
    PyValueError,
    "Stain parameters could not be fitted."
);
create_exception!(
    leukedge._native,
    ConfigError,
    PyValueError,
    "The preprocessing configuration is invalid."
);

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Decode { .. } => DecodeError::new_err(msg),
        Error::Stain(_) => StainError::new_err(msg),
        Error::Config(_) => ConfigError::new_err(msg),
        Error::Input(_) => PyValueError::new_err(msg),
    }
}

// ---------------------------------------------------------------------------------------------
// Argument conversion
// ---------------------------------------------------------------------------------------------

/// A uint8 image array borrowed from Python (or copied when not C-contiguous).
enum HeldPixels<'py> {
    Borrowed(PyReadonlyArrayDyn<'py, u8>),
    Owned(Vec<u8>),
}

struct Pixels<'py> {
    held: HeldPixels<'py>,
    width: usize,
    height: usize,
    channels: usize,
}

impl Pixels<'_> {
    fn data(&self) -> &[u8] {
        match &self.held {
            HeldPixels::Borrowed(a) => a.as_slice().expect("checked contiguous"),
            HeldPixels::Owned(v) => v,
        }
    }

    fn to_rgb(&self) -> Result<Rgb8, Error> {
        channels_to_rgb(self.data(), self.width, self.height, self.channels)
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Accept a uint8 array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
fn pixels_from<'py>(obj: &Bound<'py, PyAny>, what: &str, allow_two: bool) -> PyResult<Pixels<'py>> {
    let py = obj.py();
    let arr = obj
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("{what}: expected a numpy uint8 array, got {}", type_name(obj))))?;
    if !arr.dtype().is_equiv_to(&dtype::<u8>(py)) {
        return Err(PyValueError::new_err(format!(
            "{what}: array dtype {} is not supported; images must be uint8 (convert with .astype(np.uint8) after scaling to 0..255)",
            arr.dtype()
        )));
    }
    let shape = arr.shape().to_vec();
    let (h, w, c) = match shape.as_slice() {
        [h, w] => (*h, *w, 1),
        [h, w, c] if [1, 3, 4].contains(c) || (allow_two && *c == 2) => (*h, *w, *c),
        _ => {
            return Err(PyValueError::new_err(format!(
                "{what}: array shape {shape:?} is not an image; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
            )))
        }
    };
    if h == 0 || w == 0 {
        return Err(PyValueError::new_err(format!("{what}: empty image of shape {shape:?}")));
    }
    let typed = arr.cast::<PyArrayDyn<u8>>()?;
    let ro = typed
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    let held = if ro.as_slice().is_ok() {
        HeldPixels::Borrowed(ro)
    } else {
        HeldPixels::Owned(ro.as_array().iter().copied().collect())
    };
    Ok(Pixels {
        held,
        width: w,
        height: h,
        channels: c,
    })
}

fn parse_config(config_json: &str) -> PyResult<Config> {
    Config::from_json(config_json).map_err(to_py)
}

fn rgb_to_py<'py>(py: Python<'py>, img: Rgb8) -> PyResult<Bound<'py, PyArray<u8, numpy::Ix3>>> {
    let a = Array3::from_shape_vec((img.height, img.width, 3), img.data)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(a.into_pyarray(py))
}

// ---------------------------------------------------------------------------------------------
// Python functions
// ---------------------------------------------------------------------------------------------

// The text signatures spell the default out for Python's inspect / stubtest.
const _: () = assert!(DEFAULT_MAX_PIXELS == 64_000_000);

/// decode(source, max_pixels=64_000_000) -> ndarray[uint8] (H, W, 3)
#[pyfunction(name = "decode")]
#[pyo3(signature = (source, max_pixels = DEFAULT_MAX_PIXELS), text_signature = "(source, max_pixels=64000000)")]
fn py_decode<'py>(
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

/// Collect one or more images from a list / tuple / 4-D array / single image.
fn image_list<'py>(images: &Bound<'py, PyAny>) -> PyResult<Vec<Pixels<'py>>> {
    if let Ok(arr) = images.cast::<PyUntypedArray>() {
        if arr.ndim() <= 3 {
            return Ok(vec![pixels_from(images, "images", false)?]);
        }
    }
    let mut out = Vec::new();
    for (i, item) in images.try_iter()?.enumerate() {
        out.push(pixels_from(&item?, &format!("images[{i}]"), false)?);
    }
    Ok(out)
}

/// fit_stain(images, config_json) -> str (JSON parameters)
#[pyfunction]
fn fit_stain(py: Python<'_>, images: &Bound<'_, PyAny>, config_json: &str) -> PyResult<String> {
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
fn normalize_stain<'py>(
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
fn reference_params(method: &str) -> PyResult<String> {
    let cfg: StainConfig = serde_json::from_value(serde_json::json!({ "method": method }))
        .map_err(|_| ConfigError::new_err(format!("method={method:?} is not one of macenko, reinhard, none")))?;
    Ok(StainParams::from_config(&cfg).map_err(to_py)?.to_json(None, None))
}

/// resize(image, width, height, filter="bilinear") -> ndarray uint8 (same channels)
#[pyfunction(name = "resize")]
#[pyo3(signature = (image, width, height, filter = "bilinear"))]
fn py_resize<'py>(
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
fn foreground_mask<'py>(
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
fn foreground_bbox(
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

/// One batch item, held while the GIL is released.
enum HeldItem<'py> {
    Path(PathBuf),
    Bytes(Bound<'py, PyBytes>),
    Pixels(Pixels<'py>),
}

fn make_out<'py, T: Element>(py: Python<'py>, shape: &[usize]) -> Bound<'py, PyArrayDyn<T>> {
    PyArrayDyn::<T>::zeros(py, IxDyn(shape), false)
}

/// Validate a user-supplied output array.
fn check_out<'py>(out: &Bound<'py, PyAny>, cfg: &Config, shape: &[usize]) -> PyResult<()> {
    let py = out.py();
    let arr = out
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("out must be a numpy array, got {}", type_name(out))))?;
    let want = match cfg.dtype {
        DType::Uint8 => dtype::<u8>(py),
        DType::Float32 => dtype::<f32>(py),
        DType::Float16 => dtype::<f16>(py),
    };
    if !arr.dtype().is_equiv_to(&want) {
        return Err(PyValueError::new_err(format!(
            "out has dtype {} but the config asks for {} (dtype={:?}, layout={:?})",
            arr.dtype(),
            cfg.dtype.name(),
            cfg.dtype.name(),
            format!("{:?}", cfg.layout).to_lowercase()
        )));
    }
    if arr.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "out has shape {:?} but {} items with size={} and layout={} need shape {:?}",
            arr.shape(),
            shape[0],
            cfg.size,
            format!("{:?}", cfg.layout).to_lowercase(),
            shape
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "out must be C-contiguous (use np.ascontiguousarray or np.empty)",
        ));
    }
    Ok(())
}

/// Run a validated pipeline over `items` (paths, encoded bytes or uint8 arrays): the shared body of
/// `Pipeline.run` and `preprocess_batch`.
fn run_items<'py>(
    py: Python<'py>,
    pipeline: &Pipeline,
    items: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    threads: usize,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyList>)> {
    let cfg = &pipeline.cfg;
    if items.is_instance_of::<PyString>() || items.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(
            "items must be a list of paths / arrays, not a single str or bytes",
        ));
    }

    let mut held: Vec<HeldItem<'py>> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, item) in items.try_iter()?.enumerate() {
        let item = item?;
        if item.cast::<PyUntypedArray>().is_ok() {
            held.push(HeldItem::Pixels(pixels_from(&item, &format!("items[{i}]"), false)?));
            names.push(format!("<array #{i}>"));
        } else if let Ok(b) = item.cast::<PyBytes>() {
            held.push(HeldItem::Bytes(b.clone()));
            names.push(format!("<bytes #{i}>"));
        } else {
            let p: PathBuf = item.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "items[{i}]: expected a path (str / os.PathLike), encoded image bytes or a uint8 numpy array, got {}",
                    type_name(&item)
                ))
            })?;
            names.push(p.display().to_string());
            held.push(HeldItem::Path(p));
        }
    }
    let n = held.len();
    let shape = cfg.output_shape(n);

    let out_obj: Bound<'py, PyAny> = match out {
        Some(o) => {
            check_out(o, cfg, &shape)?;
            o.clone()
        }
        None => match cfg.dtype {
            DType::Uint8 => make_out::<u8>(py, &shape).into_any(),
            DType::Float32 => make_out::<f32>(py, &shape).into_any(),
            DType::Float16 => make_out::<f16>(py, &shape).into_any(),
        },
    };

    let sources: Vec<Source<'_>> = held
        .iter()
        .map(|h| match h {
            HeldItem::Path(p) => Source::Path(p.clone()),
            HeldItem::Bytes(b) => Source::Bytes(b.as_bytes()),
            HeldItem::Pixels(p) => Source::Pixels {
                data: p.data(),
                width: p.width,
                height: p.height,
                channels: p.channels,
            },
        })
        .collect();

    fn writable<'py, T: Element>(o: &Bound<'py, PyAny>) -> PyResult<numpy::PyReadwriteArrayDyn<'py, T>> {
        o.cast::<PyArrayDyn<T>>()?
            .try_readwrite()
            .map_err(|e| PyValueError::new_err(format!("out is not writeable: {e}")))
    }
    let statuses = match cfg.dtype {
        DType::Uint8 => {
            let mut rw = writable::<u8>(&out_obj)?;
            let buf = rw.as_slice_mut().map_err(|e| PyValueError::new_err(e.to_string()))?;
            py.detach(|| pipeline.run_batch(&sources, &names, OutBuf::U8(buf), threads))
        }
        DType::Float32 => {
            let mut rw = writable::<f32>(&out_obj)?;
            let buf = rw.as_slice_mut().map_err(|e| PyValueError::new_err(e.to_string()))?;
            py.detach(|| pipeline.run_batch(&sources, &names, OutBuf::F32(buf), threads))
        }
        DType::Float16 => {
            let mut rw = writable::<f16>(&out_obj)?;
            let buf = rw.as_slice_mut().map_err(|e| PyValueError::new_err(e.to_string()))?;
            py.detach(|| pipeline.run_batch(&sources, &names, OutBuf::F16(buf), threads))
        }
    }
    .map_err(to_py)?;

    let list = PyList::empty(py);
    for (i, (st, name)) in statuses.iter().zip(&names).enumerate() {
        let d = PyDict::new(py);
        d.set_item("index", i)?;
        d.set_item("source", name)?;
        d.set_item("ok", st.ok)?;
        d.set_item("error", st.error.as_deref())?;
        d.set_item("stain_fallback", st.stain_fallback)?;
        d.set_item("stain_reason", st.stain_reason.as_deref())?;
        d.set_item("rejected", st.rejected.as_deref())?;
        list.append(d)?;
    }
    Ok((out_obj, list))
}

/// preprocess_batch(items, config_json, out=None, threads=0) -> (ndarray, list[dict])
///
/// One-shot form of `Pipeline(config_json).run(...)` (parses the config on every call).
#[pyfunction]
#[pyo3(signature = (items, config_json, out = None, threads = 0))]
fn preprocess_batch<'py>(
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
fn default_threads() -> usize {
    batch::default_threads()
}

/// max_file_bytes(max_pixels=64_000_000) -> int: the largest file `decode` / `preprocess_batch`
/// read for this pixel limit (bigger files are refused unread).
#[pyfunction(name = "max_file_bytes")]
#[pyo3(signature = (max_pixels = DEFAULT_MAX_PIXELS), text_signature = "(max_pixels=64000000)")]
fn py_max_file_bytes(max_pixels: u64) -> u64 {
    decode::max_file_bytes(max_pixels)
}

/// cpu_paths() -> dict[str, bool]: which SIMD paths run in this process (``portable`` is True when
/// ``LEUKEDGE_PORTABLE`` forces the portable fallbacks; read once, at the first image).
#[pyfunction]
fn cpu_paths() -> std::collections::BTreeMap<&'static str, bool> {
    cpu::paths().into_iter().collect()
}

#[pymodule]
#[pyo3(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("DecodeError", py.get_type::<DecodeError>())?;
    m.add("StainError", py.get_type::<StainError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("DEFAULT_MAX_PIXELS", DEFAULT_MAX_PIXELS)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(py_decode, m)?)?;
    m.add_function(wrap_pyfunction!(fit_stain, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_stain, m)?)?;
    m.add_function(wrap_pyfunction!(reference_params, m)?)?;
    m.add_function(wrap_pyfunction!(py_resize, m)?)?;
    m.add_function(wrap_pyfunction!(foreground_mask, m)?)?;
    m.add_function(wrap_pyfunction!(foreground_bbox, m)?)?;
    m.add_function(wrap_pyfunction!(preprocess_batch, m)?)?;
    m.add_class::<py_pipeline::PyPipeline>()?;
    m.add_function(wrap_pyfunction!(default_threads, m)?)?;
    m.add_function(wrap_pyfunction!(py_max_file_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_paths, m)?)?;
    Ok(())
}
