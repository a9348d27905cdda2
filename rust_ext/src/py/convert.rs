//! Argument and result conversion between Python objects and the pure-Rust core (all of it
//! while holding the GIL; nothing here touches pixels beyond copying a non-contiguous array).

use std::path::PathBuf;

use numpy::ndarray::Array3;
use numpy::{
    dtype, Element, IntoPyArray, PyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use super::to_py;
use crate::batch::{ItemStatus, Source};
use crate::config::Config;
use crate::decode::{channels_to_rgb, Rgb8};
use crate::error::Error;
use crate::output::OutElem;

/// A uint8 image array borrowed from Python (or copied when not C-contiguous).
enum HeldPixels<'py> {
    Borrowed(PyReadonlyArrayDyn<'py, u8>),
    Owned(Vec<u8>),
}

pub struct Pixels<'py> {
    held: HeldPixels<'py>,
    pub width: usize,
    pub height: usize,
    pub channels: usize,
}

impl Pixels<'_> {
    pub fn data(&self) -> &[u8] {
        match &self.held {
            HeldPixels::Borrowed(a) => a.as_slice().expect("checked contiguous"),
            HeldPixels::Owned(v) => v,
        }
    }

    pub fn to_rgb(&self) -> Result<Rgb8, Error> {
        channels_to_rgb(self.data(), self.width, self.height, self.channels)
    }
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Accept a uint8 array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
pub fn pixels_from<'py>(obj: &Bound<'py, PyAny>, what: &str, allow_two: bool) -> PyResult<Pixels<'py>> {
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

pub fn parse_config(config_json: &str) -> PyResult<Config> {
    Config::from_json(config_json).map_err(to_py)
}

pub fn rgb_to_py<'py>(py: Python<'py>, img: Rgb8) -> PyResult<Bound<'py, PyArray<u8, numpy::Ix3>>> {
    let a = Array3::from_shape_vec((img.height, img.width, 3), img.data)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(a.into_pyarray(py))
}

/// Collect one or more images from a list / tuple / 4-D array / single image.
pub fn image_list<'py>(images: &Bound<'py, PyAny>) -> PyResult<Vec<Pixels<'py>>> {
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

/// One batch item, held while the GIL is released.
pub enum HeldItem<'py> {
    Path(PathBuf),
    Bytes(Bound<'py, PyBytes>),
    Pixels(Pixels<'py>),
}

impl HeldItem<'_> {
    /// The item as the batch runner sees it.
    pub fn source(&self) -> Source<'_> {
        match self {
            HeldItem::Path(p) => Source::Path(p.clone()),
            HeldItem::Bytes(b) => Source::Bytes(b.as_bytes()),
            HeldItem::Pixels(p) => Source::Pixels {
                data: p.data(),
                width: p.width,
                height: p.height,
                channels: p.channels,
            },
        }
    }
}

/// The batch items (paths, encoded bytes or uint8 arrays) and their names in statuses and errors.
pub fn batch_items<'py>(items: &Bound<'py, PyAny>) -> PyResult<(Vec<HeldItem<'py>>, Vec<String>)> {
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
    Ok((held, names))
}

/// A user-supplied output array, validated against the config (dtype `T`, `shape`, C order).
pub fn check_out<'py, T: OutElem + Element>(
    out: &Bound<'py, PyAny>,
    cfg: &Config,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let py = out.py();
    let arr = out
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("out must be a numpy array, got {}", type_name(out))))?;
    let layout = format!("{:?}", cfg.layout).to_lowercase();
    if !arr.dtype().is_equiv_to(&dtype::<T>(py)) {
        return Err(PyValueError::new_err(format!(
            "out has dtype {} but the config asks for {} (dtype={:?}, layout={:?})",
            arr.dtype(),
            cfg.dtype.name(),
            cfg.dtype.name(),
            layout
        )));
    }
    if arr.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "out has shape {:?} but {} items with size={} and layout={} need shape {:?}",
            arr.shape(),
            shape[0],
            cfg.size,
            layout,
            shape
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "out must be C-contiguous (use np.ascontiguousarray or np.empty)",
        ));
    }
    Ok(out.cast::<PyArrayDyn<T>>()?.clone())
}

/// The per-item status dicts of a batch (`_ItemStatus` in the stub).
pub fn status_list<'py>(py: Python<'py>, statuses: &[ItemStatus], names: &[String]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for (i, (st, name)) in statuses.iter().zip(names).enumerate() {
        let d = PyDict::new(py);
        d.set_item("index", i)?;
        d.set_item("source", name)?;
        d.set_item("ok", st.ok)?;
        d.set_item("error", st.error.as_deref())?;
        d.set_item("stain_fallback", st.stain_fallback)?;
        d.set_item("stain_reason", st.stain_reason.as_deref())?;
        d.set_item("rejected", st.rejected.as_deref())?;
        d.set_item("note", st.note.as_deref())?;
        list.append(d)?;
    }
    Ok(list)
}
